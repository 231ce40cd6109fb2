"""Loading diffusion pipelines and LoRA adapters through diffusers' own machinery."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from localora.diffusion import loras as loralib
from localora import profiles, verbosity
from localora.errors import LocaloraError
from localora.profiles import DiffusionSpec

if TYPE_CHECKING:  # torch loads with the first pipeline, so that commands without a model start fast
    import torch


def _scheduler(name: str, config: Any):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler)

    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(config)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    return DDIMScheduler.from_config(config)


def dtype_for(spec: DiffusionSpec, device: torch.device) -> torch.dtype:
    import torch

    return getattr(torch, profiles.run_dtype(spec.dtype, device.type))


def load_pipeline(spec: DiffusionSpec, device: torch.device):
    """The diffusers pipeline for `spec`, from local files only, on `device`."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline

    verbosity.quiet_libraries()
    cls = StableDiffusionXLPipeline if spec.arch == "sdxl" else StableDiffusionPipeline
    path = profiles.locate(spec.source, f"diffusion model '{spec.name}'")
    dtype = dtype_for(spec, device)
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": True}
    if spec.arch == "sd15":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if path.is_file() and path.suffix.lower() != ".safetensors":
        loralib.check_suffix(path)
        raise LocaloraError(f"{path}: single-file checkpoints must be .safetensors")
    # use_safetensors: a folder that holds only pickled .bin weights fails instead of being unpickled.
    try:
        with verbosity.hushed():
            if spec.vae:
                vae_path = profiles.locate(spec.vae, f"VAE of '{spec.name}'")
                kwargs["vae"] = _from_pretrained(AutoencoderKL, vae_path, f"VAE of '{spec.name}'", **kwargs)
            if path.is_file():
                pipe = cls.from_single_file(str(path), **kwargs)
            else:
                pipe = _from_pretrained(cls, path, f"{spec.arch.upper()} pipeline of '{spec.name}'", **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise LocaloraError(
            f"{path}: cannot load the {spec.arch.upper()} pipeline of '{spec.name}' ({str(e).splitlines()[0][:160]}); "
            f"check the folder is a complete diffusers model or fetch it again"
        ) from None
    pipe.scheduler = _scheduler(spec.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


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
        theirs, ours = loralib.ARCH_NAMES[info.arch], loralib.ARCH_NAMES[arch]
        article = "a" if theirs == "Flux" else "an"
        fix = (f"use a profile with {article} {theirs} base" if info.arch in profiles.ARCHS
               else f"localora renders SDXL and SD1.5 only: use a LoRA trained for {ours}")
        raise LocaloraError(f"{lora.path}: this is {article} {theirs} LoRA ({info.arch_evidence}) but the "
                            f"profile's base is {ours}; {fix}")
    before = _lora_layer_count(pipe)
    try:
        with verbosity.hushed("peft"):
            pipe.load_lora_weights(str(lora.path), adapter_name=name)
    except LocaloraError:
        raise
    except Exception as e:
        _unload(pipe, name)
        raise LocaloraError(
            f"{lora.path}: does not fit the {loralib.ARCH_NAMES[arch]} base "
            f"({str(e).splitlines()[0][:160]}); check it was trained for this base model"
        ) from None
    if _lora_layer_count(pipe) == before:
        _unload(pipe, name)
        raise LocaloraError(
            f"{lora.path}: none of its layers match the {loralib.ARCH_NAMES[arch]} base; "
            f"check it was trained for this base model"
        )


def _lora_layer_count(pipe) -> int:
    from peft.tuners.lora import LoraLayer

    count = 0
    for comp in (pipe.unet, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)):
        if comp is not None:
            count += sum(len(m.lora_A) for m in comp.modules() if isinstance(m, LoraLayer))
    return count


def _unload(pipe, name: str) -> None:
    try:
        pipe.delete_adapters([name])
    except Exception:
        pass


def set_weights(pipe, names: list[str], weights: list[float]) -> None:
    """Activate exactly these adapters at these weights, unfused (W x + sum w_k B_k A_k x)."""
    pipe.set_adapters(names, adapter_weights=weights)


def set_unet_weights(pipe, names: list[str], weights: list[float]) -> None:
    """As set_weights, for the UNet only: the text was already encoded."""
    pipe.unet.set_adapters(names, weights=weights)


def model_identity(spec: DiffusionSpec, device: torch.device) -> dict[str, str]:
    """What makes renders of this model reproducible: for the render cache key."""
    from localora import tiny

    ident = {"arch": spec.arch, "source": spec.source, "vae": spec.vae or "", "scheduler": spec.scheduler,
             "dtype": str(dtype_for(spec, device)), "device": device.type}
    if profiles.is_tiny(spec.source):
        ident["build"] = f"tiny-v{tiny.VERSION}-seed{tiny.SEED}"
    else:
        # A hub snapshot's folder name is its commit; a local folder is named by path and date.
        path = profiles.locate(spec.source, spec.name)
        stamp = max((p.stat().st_mtime_ns for p in [path, *path.glob("*.json")]), default=0)
        ident["build"] = f"{Path(path).resolve()}@{stamp}"
    return ident
