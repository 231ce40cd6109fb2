"""Loading diffusion pipelines and LoRA adapters through diffusers' own machinery."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localora.diffusion import loras as loralib
from localora import archs, attention, profiles, verbosity
from localora.errors import LocaloraError
from localora.profiles import DiffusionSpec

if TYPE_CHECKING:  # torch loads with the first pipeline, so that commands without a model start fast
    import torch

log = logging.getLogger(__name__)


def _scheduler(name: str, config: Any):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler)

    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "flow_euler":
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    return DDIMScheduler.from_config(config)


def dtype_for(spec: DiffusionSpec, device: torch.device) -> torch.dtype:
    import torch

    return getattr(torch, profiles.run_dtype(spec.dtype, device.type))


# The devices diffusers' bitsandbytes quantizers run on (diffusers 0.42 quantizers/bitsandbytes/
# bnb_quantizer.py validate_environment: 4-bit on CUDA, XPU or MPS, 8-bit on CUDA or XPU; else
# "No GPU found").
QUANTIZES_ON = {"nf4": ("cuda", "xpu", "mps"), "int8": ("cuda", "xpu")}


def as_loaded(spec: DiffusionSpec, device: torch.device) -> DiffusionSpec:
    """The spec as a load on `device` gets it: a quantization diffusers cannot do there (on a CPU,
    any) loads unquantized, in its dtype. The render cache key, the memory estimate and the load
    event say what was loaded."""
    if spec.quantization != "none" and device.type not in QUANTIZES_ON[spec.quantization]:
        return replace(spec, quantization="none")
    return spec


def quantization_config(spec: DiffusionSpec, dtype: torch.dtype):
    """diffusers' pipeline quantization for a spec that asks for it: the base's denoiser and its
    large text encoder (archs.Arch.quantize) in 4-bit NF4 or 8-bit through bitsandbytes, the rest
    in the run dtype. None when the spec runs unquantized."""
    if spec.quantization == "none":
        return None
    from diffusers import PipelineQuantizationConfig

    if spec.quantization == "nf4":
        backend, kwargs = "bitsandbytes_4bit", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                                "bnb_4bit_compute_dtype": dtype}
    else:
        backend, kwargs = "bitsandbytes_8bit", {"load_in_8bit": True}
    return PipelineQuantizationConfig(quant_backend=backend, quant_kwargs=kwargs,
                                      components_to_quantize=list(archs.arch(spec.arch).quantize))


def load_pipeline(spec: DiffusionSpec, device: torch.device):
    """The diffusers pipeline for `spec`, from local files only, on `device`."""
    import diffusers
    from diffusers import AutoencoderKL

    verbosity.quiet_libraries()
    base = archs.arch(spec.arch)
    cls = getattr(diffusers, base.pipeline)
    path = profiles.locate(spec.source, f"diffusion model '{spec.name}'")
    dtype = dtype_for(spec, device)
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": True}
    if spec.arch == "sd15":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    loaded = as_loaded(spec, device)
    if loaded.quantization != spec.quantization:
        log.warning("diffusion model '%s': diffusers' bitsandbytes quantizer does no %s on %s; loading %s weights "
                    "instead", spec.name, spec.quantization, device.type.upper(), str(dtype).removeprefix("torch."))
    quantized = quantization_config(loaded, dtype)
    if quantized is not None:
        kwargs["quantization_config"] = quantized
    if path.is_file() and path.suffix.lower() != ".safetensors":
        loralib.check_suffix(path)
        raise LocaloraError(f"{path}: single-file checkpoints must be .safetensors")
    # use_safetensors: a folder that holds only pickled .bin weights fails instead of being unpickled.
    try:
        with verbosity.hushed():
            if spec.vae:
                vae_path = profiles.locate(spec.vae, f"VAE of '{spec.name}'")
                vae_kwargs = {k: v for k, v in kwargs.items() if k != "quantization_config"}
                kwargs["vae"] = _from_pretrained(AutoencoderKL, vae_path, f"VAE of '{spec.name}'", **vae_kwargs)
            if path.is_file():
                pipe = cls.from_single_file(str(path), **kwargs)
            else:
                pipe = _from_pretrained(cls, path, f"{base.label} pipeline of '{spec.name}'", **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise LocaloraError(
            f"{path}: cannot load the {base.label} pipeline of '{spec.name}' ({str(e).splitlines()[0][:160]}); "
            f"check the folder is a complete diffusers model or fetch it again"
        ) from None
    pipe.scheduler = _scheduler(spec.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for name in base.text_encoders:  # diffusers passes no attn_implementation to them
        attention.prefer_sdpa(getattr(pipe, name, None))
    # On a CPU a quantized pipeline stays where bitsandbytes put its layers at load (nothing to
    # move); on a GPU it is moved as any other (diffusers moves 4-bit pipelines; untested here).
    return pipe if quantized is not None and device.type == "cpu" else pipe.to(device)


def empty_models(spec: DiffusionSpec) -> dict[str, Any]:
    """The spec's denoiser and text encoders by pipeline attribute ("unet", "text_encoder", ...),
    built from their configs on the meta device, no weights read, with the attention load_pipeline
    gives them: what doctor asks "which attention?". A MissingError when the model is not here, a
    LocaloraError for a single-file checkpoint (its configs are not files)."""
    import importlib
    import json

    from accelerate import init_empty_weights

    base = archs.arch(spec.arch)
    path = profiles.locate(spec.source, f"diffusion model '{spec.name}'")
    if path.is_file():
        raise LocaloraError(f"{path}: a single-file checkpoint has no config files to build its models from")
    index = json.loads((path / "model_index.json").read_text())
    models: dict[str, Any] = {}
    with verbosity.hushed(), init_empty_weights():
        for name in (base.denoiser, *base.text_encoders):
            library, class_name = index[name]
            cls = getattr(importlib.import_module(library), class_name)
            if library == "diffusers":
                models[name] = cls.from_config(cls.load_config(path / name))
            else:
                from transformers import AutoConfig

                models[name] = attention.prefer_sdpa(cls(AutoConfig.from_pretrained(path / name, local_files_only=True)))
    return models


def _from_pretrained(cls, path: Path, what: str, **kwargs):
    """cls.from_pretrained from safetensors only; a folder whose weights are all pickles is one line."""
    try:
        return cls.from_pretrained(path, use_safetensors=True, **kwargs)
    except (OSError, ValueError, KeyError):
        profiles.check_no_pickled_weights(path, what)
        raise


def adapter_name(file_hash: str) -> str:
    return "lora_" + file_hash[:16]


def load_adapter(pipe, lora: loralib.Lora, name: str, arch: str) -> None:
    """Load one LoRA file as adapter `name`, or fail with one line saying why it does not fit."""
    info = loralib.inspect(lora.path)  # also refuses NaN/Inf tensors and mismatched ranks
    if info.arch and info.arch != arch:
        raise LocaloraError(base_mismatch(lora.path, info.arch, info.arch_evidence, arch))
    ours = archs.arch(arch).label
    before = _lora_layer_count(pipe, arch)
    try:
        with verbosity.hushed("peft"):
            pipe.load_lora_weights(str(lora.path), adapter_name=name)
    except LocaloraError:
        raise
    except Exception as e:
        _unload(pipe, name)
        raise LocaloraError(
            f"{lora.path}: does not fit the {ours} base ({str(e).splitlines()[0][:160]}); "
            f"check it was trained for this base model"
        ) from None
    if _lora_layer_count(pipe, arch) == before:
        _unload(pipe, name)
        raise LocaloraError(
            f"{lora.path}: none of its layers match the {ours} base; check it was trained for this base model"
        )


def base_mismatch(path, theirs: str, evidence: str, ours: str) -> str:
    """The one line for a LoRA of another base than the profile's, naming both."""
    t, o = archs.label(theirs), archs.arch(ours).label
    fix = (f"use a profile with {archs.article(t)} {t} base (localora models lists them)" if theirs in archs.ARCHS
           else f"localora renders {', '.join(a.label for a in archs.ARCHS.values())}: use a LoRA trained for {o}")
    return f"{path}: this is {archs.article(t)} {t} LoRA ({evidence}) but the profile's base is {o}; {fix}"


def _lora_layer_count(pipe, arch: str) -> int:
    from peft.tuners.lora import LoraLayer

    count = 0
    base = archs.arch(arch)
    for comp in (getattr(pipe, base.denoiser), *(getattr(pipe, e, None) for e in base.text_encoders)):
        if comp is not None:
            count += sum(len(m.lora_A) for m in comp.modules() if isinstance(m, LoraLayer))
    return count


def _unload(pipe, name: str) -> None:
    try:
        pipe.delete_adapters([name])
    except Exception:
        pass


def set_weights(pipe, names: list[str], weights: list[float], blocks=None) -> None:
    """Activate exactly these adapters at these weights, unfused (W x + sum w_k B_k A_k x); with
    per-block vectors (diffusion/blocks.py), each block's layers at weight x its multiplier."""
    from localora.diffusion import blocks as blocklib

    if blocklib.any_blocks(blocks):
        arch = next(a.name for a in archs.ARCHS.values() if type(pipe).__name__ == a.pipeline)
        blocklib.set_block_weights(getattr(pipe, archs.arch(arch).denoiser), arch, names, weights, blocks, pipe=pipe)
        return
    pipe.set_adapters(names, adapter_weights=weights)


def set_unet_weights(pipe, names: list[str], weights: list[float]) -> None:
    """As set_weights, for the denoiser (UNet or transformer) only: the text was already encoded."""
    (pipe.unet if hasattr(pipe, "unet") else pipe.transformer).set_adapters(names, weights=weights)


def model_identity(spec: DiffusionSpec, device: torch.device) -> dict[str, str]:
    """What makes renders of this model reproducible: for the render cache key."""
    from localora import tiny

    spec = as_loaded(spec, device)  # the images of the weights as loaded there
    ident = {"arch": spec.arch, "source": spec.source, "vae": spec.vae or "", "scheduler": spec.scheduler,
             "dtype": str(dtype_for(spec, device)), "device": device.type}
    if spec.quantization != "none":  # a key of its own only when set, so older cache keys stay valid
        ident["quantization"] = spec.quantization
    if profiles.is_tiny(spec.source):
        ident["build"] = f"tiny-v{tiny.VERSION}-seed{tiny.SEED}"
    else:
        # A hub snapshot's folder name is its commit; a local folder is named by path and date.
        path = profiles.locate(spec.source, spec.name)
        stamp = max((p.stat().st_mtime_ns for p in [path, *path.glob("*.json")]), default=0)
        ident["build"] = f"{Path(path).resolve()}@{stamp}"
    return ident
