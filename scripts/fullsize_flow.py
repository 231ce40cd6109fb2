"""Full-size checks of the flow-matching transformer bases (Flux.1, Z-Image), for check_fullsize.py.

    counts()           every component built from its published config (scripts/fullsize/) on the
                       meta device: parameters, beside doctor's count for the profile (within 1%)
    kohya_mapping()    a kohya Flux LoRA with every key name kohya's sd-scripts writes for all 19
                       double and 38 single blocks, read by diffusers' own converter: every
                       converted layer is a layer of the full-size transformer, of its shape, and no
                       key is left over
    methods_step(arch) one step of Merge, Switch and Composite through localora's methods on a
                       transformer of full width and published block layout but one block of each
                       kind (a whole Flux.1 transformer is 24 GB in bf16, more than this machine
                       has), with a kohya LoRA of real names (Flux's linear1 at 3072/12288 wide)
                       loaded through localora's loader; the latents must be finite

Each returns a dict for the JSON report.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent / "fullsize"
FLUX_SOURCE, ZIMAGE_SOURCE = "black-forest-labs/FLUX.1-dev", "Tongyi-MAI/Z-Image-Turbo"


def config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(name: str, **override):
    """A component from its published config, on the meta device (override: fewer blocks)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel, ZImageTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, Qwen3Config, Qwen3Model, T5Config, T5EncoderModel

    cfg = {**config(name), **override}
    with torch.device("meta"):
        if name == "flux1_dev_transformer":
            return FluxTransformer2DModel.from_config(cfg)
        if name == "zimage_turbo_transformer":
            return ZImageTransformer2DModel.from_config(cfg)
        if name == "flux_vae":
            return AutoencoderKL.from_config(cfg)
        if name == "t5_xxl_encoder":
            return T5EncoderModel(T5Config(**cfg))
        if name == "qwen3_4b":
            return Qwen3Model(Qwen3Config(**cfg))
        return CLIPTextModel(CLIPTextConfig(**cfg))


PARTS = {"flux": {"transformer": "flux1_dev_transformer", "text_encoder": "clip_vit_l_text",
                  "text_encoder_2": "t5_xxl_encoder", "vae": "flux_vae"},
         "zimage": {"transformer": "zimage_turbo_transformer", "text_encoder": "qwen3_4b", "vae": "flux_vae"}}


def counts() -> dict:
    from localora import estimates

    out = {}
    for arch, parts in PARTS.items():
        each = {part: params(build(name)) for part, name in parts.items()}
        source = FLUX_SOURCE if arch == "flux" else ZIMAGE_SOURCE
        doctor = estimates.PARAMS.get(source)
        doctor_total = sum(doctor.values()) if isinstance(doctor, dict) else doctor
        out[arch] = {"params": each, "total": sum(each.values()), "doctor": doctor_total,
                     "doctor_error": None if not doctor_total else abs(doctor_total / sum(each.values()) - 1)}
    return out


def kohya_flux_names(transformer, rank: int = 1, seed: int = 0) -> dict:
    """Every kohya Flux LoRA tensor for `transformer`'s blocks, rank 1, with small random values."""
    import torch

    from localora.export import keys

    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in transformer.named_modules():
        module = getattr(module, "base_layer", module)  # a layer that already carries a LoRA
        if not isinstance(module, torch.nn.Linear):
            continue
        try:
            keys.kohya_flux_module(name)
        except Exception:
            continue
        layers[name] = (torch.randn(rank, module.in_features, generator=g) * 0.01,
                        torch.randn(module.out_features, rank, generator=g) * 0.01)
    return keys.kohya_transformer_tensors(layers, "flux"), layers


def kohya_mapping() -> dict:
    from diffusers import FluxPipeline

    transformer = build("flux1_dev_transformer")
    tensors, layers = kohya_flux_names(transformer)
    converted = FluxPipeline.lora_state_dict(dict(tensors))
    converted = converted[0] if isinstance(converted, tuple) else converted
    modules = dict(transformer.named_modules())
    targeted = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted if k.startswith("transformer.")}
    wrong = [m for m in targeted if m not in modules]
    shapes = [m for m in targeted if m in modules and (
        converted[f"transformer.{m}.lora_A.weight"].shape[1] != modules[m].in_features
        or converted[f"transformer.{m}.lora_B.weight"].shape[0] != modules[m].out_features)]
    return {"kohya_keys": len(tensors), "kohya_modules": len({k.split(".")[0] for k in tensors}),
            "diffusers_layers": len(targeted), "layers_written": len(layers), "unknown_layers": wrong,
            "wrong_shapes": shapes, "all_mapped": not wrong and not shapes and targeted == set(layers)}


def _reduced_pipeline(arch: str, folder: Path):
    """A pipeline of full width and one block of each kind, random bf16 weights, saved and loaded
    back through localora's loader (profiles.DiffusionSpec), as a real model folder is."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, ZImagePipeline

    from localora.tiny.diffusion import clip_tokenizer
    from localora.tiny.flow import FLUX_SCHEDULER, ZIMAGE_SCHEDULER, qwen3_tokenizer, t5_tokenizer

    def real(model):
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.fill_(1.0 if "norm" in name or "scale" in name else 0.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        return model

    if arch == "flux":
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=real(build("flux_vae")),
            text_encoder=real(build("clip_vit_l_text")), tokenizer=clip_tokenizer(),
            text_encoder_2=real(build("t5_xxl_encoder", num_layers=1)), tokenizer_2=t5_tokenizer(),
            transformer=real(build("flux1_dev_transformer", num_layers=1, num_single_layers=1)))
    else:
        transformer = real(build("zimage_turbo_transformer", n_layers=1, n_refiner_layers=1))
        pipe = ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER), vae=real(build("flux_vae")),
            text_encoder=real(build("qwen3_4b", num_hidden_layers=1)), tokenizer=qwen3_tokenizer(),
            transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def methods_step(arch: str, folder: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    from localora.diffusion import loras, methods
    from localora.diffusion.pipeline import adapter_name, load_adapter, load_pipeline
    from localora.diffusion.sampling import Sampling
    from localora.profiles import DiffusionSpec
    from localora.export import keys
    from localora.files import file_hash

    start = time.perf_counter()
    path = _reduced_pipeline(arch, folder / arch)
    spec = DiffusionSpec(name=f"fullsize-{arch}", arch=arch, source=str(path), scheduler="flow_euler", steps=1,
                         guidance=3.5 if arch == "flux" else 0.0, width=128, height=128, dtype="bfloat16",
                         max_sequence_length=64)
    import os

    os.environ["LOCALORA_DTYPE"] = "bfloat16"
    pipe = load_pipeline(spec, torch.device("cpu"))
    names, lora_layers = [], 0
    for i in range(3):
        if arch == "flux":
            tensors, layers = kohya_flux_names(pipe.transformer, rank=4, seed=i)
        else:
            g = torch.Generator().manual_seed(i)
            linears = {n: getattr(m, "base_layer", m) for n, m in pipe.transformer.named_modules()
                       if n.startswith("layers.") and n.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
            layers = {n: (torch.randn(4, m.in_features, generator=g) * 0.01, torch.randn(m.out_features, 4, generator=g) * 0.01)
                      for n, m in linears.items()}
            tensors = keys.kohya_transformer_tensors(layers, "zimage")
        file = folder / f"{arch}-{i}.safetensors"
        save_file(tensors, str(file), metadata={"ss_base_model_version": "flux1" if arch == "flux" else "zimage"})
        name = adapter_name(file_hash(file))
        load_adapter(pipe, loras.Lora(file.stem, file), name, arch)
        names.append(name)
        lora_layers = len(layers)
    s = Sampling(seed=0).resolved(spec)
    out = {"load_seconds": round(time.perf_counter() - start, 1), "lora_layers_per_file": lora_layers}
    for method in ("merge", "switch", "composite"):
        t = time.perf_counter()
        latents = methods.METHODS[method].run(pipe, names, [0.8, 0.6, 1.1], "a portrait", s)
        out[method] = {"finite": bool(torch.isfinite(latents).all()), "shape": list(latents.shape),
                       "seconds": round(time.perf_counter() - t, 2)}
    out["params"] = params(pipe.transformer)
    return out


def report(folder: Path | None = None) -> dict:
    result = {"counts": counts(), "kohya_flux": kohya_mapping()}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in PARTS:
            result[f"{arch}_step"] = methods_step(arch, Path(folder or tmp))
    return result


if __name__ == "__main__":
    print(json.dumps(report(), indent=1))
