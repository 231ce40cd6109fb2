"""ComfyUI: the API-format graph ("prompt") that redoes a Merge render with core nodes.

    workflow(info) -> {node id: {"class_type", "inputs"}}
        1 CheckpointLoaderSimple -> 10.. LoraLoader (one per LoRA, chained on MODEL and CLIP,
        strength_model = strength_clip = weight) -> 3 / 4 CLIPTextEncode (positive / negative)
        5 EmptyLatentImage -> 6 KSampler -> 7 VAEDecode -> 8 SaveImage
    sampler(info) -> (sampler_name, scheduler)

An input wired to another node is [node id, output index], as ComfyUI's API format has it. Only
Merge is a stock LoRA stack: Switch and Composite renders get no graph (LocaloraError).

The node inputs and the enum values below were read in comfyanonymous/ComfyUI on 2026-12-01:
nodes.py (INPUT_TYPES of CheckpointLoaderSimple, LoraLoader, CLIPTextEncode, EmptyLatentImage,
KSampler, VAEDecode, SaveImage) and comfy/samplers.py (KSAMPLER_NAMES / SAMPLER_NAMES,
SCHEDULER_NAMES). Keep them here, in this one place, and check them again when ComfyUI changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from localora.errors import LocaloraError
from localora.diffusion.metadata.info import RenderInfo

# The sampler names localora maps to, a subset of comfy/samplers.py SAMPLER_NAMES.
SAMPLER_NAMES = ("euler", "euler_ancestral", "dpmpp_2m", "ddim")
# comfy/samplers.py SCHEDULER_NAMES, in full.
SCHEDULER_NAMES = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                   "linear_quadratic", "kl_optimal")
# Which inputs each core node takes (nodes.py), to check a graph before it leaves localora.
NODE_INPUTS = {
    "CheckpointLoaderSimple": ("ckpt_name",),
    "LoraLoader": ("model", "clip", "lora_name", "strength_model", "strength_clip"),
    "CLIPTextEncode": ("text", "clip"),
    "EmptyLatentImage": ("width", "height", "batch_size"),
    "KSampler": ("model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                 "latent_image", "denoise"),
    "VAEDecode": ("samples", "vae"),
    "SaveImage": ("images", "filename_prefix"),
}
# Flux.1's nodes (nodes.py UNETLoader / DualCLIPLoader / VAELoader / LoraLoaderModelOnly, comfy_extras/
# nodes_flux.py FluxGuidance, nodes_sd3.py EmptySD3LatentImage, nodes_model_advanced.py
# ModelSamplingFlux; read in Comfy-Org/ComfyUI at a125cd84)
FLUX_NODE_INPUTS = {
    "UNETLoader": ("unet_name", "weight_dtype"),
    "DualCLIPLoader": ("clip_name1", "clip_name2", "type"),
    "VAELoader": ("vae_name",),
    "LoraLoaderModelOnly": ("model", "lora_name", "strength_model"),
    "FluxGuidance": ("conditioning", "guidance"),
    "ModelSamplingFlux": ("model", "max_shift", "base_shift", "width", "height"),
    "EmptySD3LatentImage": ("width", "height", "batch_size"),
}
SEED_MAX = 0xFFFFFFFFFFFFFFFF  # KSampler's seed range (nodes.py)
FLUX_GUIDANCE_RANGE = (0.0, 100.0)  # FluxGuidance's guidance range (comfy_extras/nodes_flux.py)
# The files ComfyUI's Flux.1 examples put in models/text_encoders and models/vae.
FLUX_FILES = {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "vae_name": "ae.safetensors"}
STRENGTH_RANGE = (-100.0, 100.0)  # LoraLoader's strength_model / strength_clip range (nodes.py)
# The other ranges ComfyUI's validate_inputs checks (nodes.py INPUT_TYPES, Comfy-Org/ComfyUI @
# a125cd84b054a57729b5eecab930ca9408719832): a value outside one makes it refuse the whole graph.
RANGES = {("KSampler", "cfg"): (0.0, 100.0), ("KSampler", "steps"): (1, 10000),
          ("EmptyLatentImage", "width"): (16, 16384), ("EmptyLatentImage", "height"): (16, 16384)}

_SAMPLER = {"euler": "euler", "euler_a": "euler_ancestral", "dpmpp_2m": "dpmpp_2m", "ddim": "ddim",
            "flow_euler": "euler"}
# diffusers' timestep_spacing -> the ComfyUI scheduler of the same timesteps (comfy/samplers.py
# ddim_scheduler, simple_scheduler, normal_scheduler: the same schedules as A1111's DDIM, Simple, Uniform).
_SPACING = {"leading": "ddim_uniform", "trailing": "simple", "linspace": "normal"}
_SIGMAS = {"karras": "karras", "exponential": "exponential", "beta": "beta"}


def sampler(info: RenderInfo) -> tuple[str, str]:
    name = _SAMPLER[info.scheduler]
    if info.scheduler == "flow_euler":  # evenly spaced sigmas, shifted by the model (ModelSamplingFlux)
        return name, "simple"
    # diffusers' Euler a and DDIM have no Karras/exponential/beta option: they ran the config's spacing
    sigmas = "default" if info.scheduler in ("euler_a", "ddim") else info.sigmas
    return name, _SPACING.get(info.spacing, "ddim_uniform") if sigmas == "default" else _SIGMAS[sigmas]


def checkpoint_name(info: RenderInfo) -> str:
    """What ComfyUI's checkpoint list should hold: the checkpoint's file name, or for a diffusers
    folder the model name (save that model as one .safetensors under that name)."""
    from localora.diffusion.metadata.info import CHECKPOINT_ROOTS, listed_name

    source = info.source.rstrip("/")
    if source.endswith(".safetensors"):  # below ComfyUI's / A1111's checkpoint folder, as they list it
        return listed_name(Path(source), CHECKPOINT_ROOTS)
    return f"{info.model}.safetensors"


def workflow(info: RenderInfo, where: str = "this render") -> dict[str, dict[str, Any]]:
    if not info.reproducible_elsewhere:
        raise LocaloraError(f"{where}: a {info.method} render has no ComfyUI graph (only Merge is a stock LoRA "
                            f"stack); export it --to a1111 or --to diffusers, or use a Merge render")
    if info.blocks:
        raise LocaloraError(f"{where}: a render with block weights (lbw=) has no ComfyUI graph (LoraLoader takes one "
                            f"weight per LoRA); export it --to a1111 (LoRA Block Weight reads lbw=) or --to lora")
    if info.arch == "flux":
        return flux_workflow(info, where)
    if info.arch != "sdxl" and info.arch != "sd15":
        raise LocaloraError(f"{where}: localora writes no ComfyUI graph for {info.arch} renders yet (its loader nodes "
                            f"are not checked against ComfyUI's source); export it --to a1111 or --to diffusers")
    name, schedule = sampler(info)
    graph: dict[str, dict[str, Any]] = {"1": {"class_type": "CheckpointLoaderSimple",
                                              "inputs": {"ckpt_name": checkpoint_name(info)}}}
    model, clip = ["1", 0], ["1", 1]
    for i, (lora, weight) in enumerate(zip(info.loras, info.weights)):
        node = str(10 + i)
        graph[node] = {"class_type": "LoraLoader", "inputs": {
            "model": model, "clip": clip, "lora_name": lora.file,
            "strength_model": float(weight), "strength_clip": float(weight)}}
        model, clip = [node, 0], [node, 1]
    graph["3"] = {"class_type": "CLIPTextEncode", "inputs": {"text": info.prompt, "clip": clip}}
    graph["4"] = {"class_type": "CLIPTextEncode", "inputs": {"text": info.negative_prompt, "clip": clip}}
    graph["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": info.width, "height": info.height,
                                                               "batch_size": 1}}
    graph["6"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": info.seed, "steps": info.steps, "cfg": float(info.guidance), "sampler_name": name,
        "scheduler": schedule, "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    graph["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}}
    graph["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "localora"}}
    check(graph, where)
    return graph


def flux_workflow(info: RenderInfo, where: str) -> dict[str, dict[str, Any]]:
    """Flux.1 as ComfyUI's own examples wire it: the transformer, its two text encoders and its VAE
    from their own folders, model-only LoRAs, the guidance as a FluxGuidance on the positive
    conditioning, KSampler at cfg 1 (no unconditional pass), the resolution shift of [dev]."""
    name, schedule = sampler(info)
    graph: dict[str, dict[str, Any]] = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": f"{info.model}.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": FLUX_FILES["clip_name1"],
                                                         "clip_name2": FLUX_FILES["clip_name2"], "type": "flux"}},
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": FLUX_FILES["vae_name"]}},
    }
    model = ["1", 0]
    for i, (lora, weight) in enumerate(zip(info.loras, info.weights)):
        node = str(10 + i)
        graph[node] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": model, "lora_name": lora.file, "strength_model": float(weight)}}
        model = [node, 0]
    if info.sigmas == "dynamic":
        graph["20"] = {"class_type": "ModelSamplingFlux", "inputs": {
            "model": model, "max_shift": 1.15, "base_shift": 0.5, "width": info.width, "height": info.height}}
        model = ["20", 0]
    graph["3"] = {"class_type": "CLIPTextEncode", "inputs": {"text": info.prompt, "clip": ["2", 0]}}
    graph["21"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": float(info.guidance)}}
    graph["4"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}}
    graph["5"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": info.width, "height": info.height,
                                                                  "batch_size": 1}}
    graph["6"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": info.seed, "steps": info.steps, "cfg": 1.0, "sampler_name": name,
        "scheduler": schedule, "positive": ["21", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    graph["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["9", 0]}}
    graph["8"] = {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "localora"}}
    if not FLUX_GUIDANCE_RANGE[0] <= info.guidance <= FLUX_GUIDANCE_RANGE[1]:
        raise LocaloraError(f"{where}: guidance {info.guidance} is outside ComfyUI's FluxGuidance range "
                            f"{FLUX_GUIDANCE_RANGE[0]}..{FLUX_GUIDANCE_RANGE[1]}")
    check(graph, where)
    return graph


def check(graph: dict[str, dict[str, Any]], where: str) -> None:
    """Every node a core node with exactly its inputs, wires to existing nodes, enums and ranges valid."""
    for node, spec in graph.items():
        inputs = spec["inputs"]
        if tuple(sorted(inputs)) != tuple(sorted({**NODE_INPUTS, **FLUX_NODE_INPUTS}[spec["class_type"]])):
            raise AssertionError(f"node {node} {spec['class_type']}: inputs {sorted(inputs)}")
        for value in inputs.values():
            if isinstance(value, list) and value[0] not in graph:
                raise AssertionError(f"node {node} wired to missing node {value[0]}")
        if spec["class_type"] == "KSampler":
            if inputs["sampler_name"] not in SAMPLER_NAMES or inputs["scheduler"] not in SCHEDULER_NAMES:
                raise AssertionError(f"KSampler {inputs['sampler_name']} / {inputs['scheduler']}")
            if not 0 <= inputs["seed"] <= SEED_MAX:
                raise LocaloraError(f"{where}: seed {inputs['seed']} is outside ComfyUI's range 0..{SEED_MAX}")
        for (kind, name), (lo, hi) in RANGES.items():
            if spec["class_type"] == kind and not lo <= inputs[name] <= hi:
                raise LocaloraError(f"{where}: {kind} {name} {inputs[name]:g} is outside ComfyUI's range {lo:g}..{hi:g}, "
                                    f"so ComfyUI would refuse the graph")
        if spec["class_type"] in ("LoraLoader", "LoraLoaderModelOnly") and not STRENGTH_RANGE[0] <= inputs["strength_model"] <= STRENGTH_RANGE[1]:
            raise LocaloraError(f"{where}: LoRA weight {inputs['strength_model']} is outside ComfyUI's LoraLoader "
                                f"range {STRENGTH_RANGE[0]}..{STRENGTH_RANGE[1]}")
