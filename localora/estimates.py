"""How much accelerator memory a profile's models need, estimated before anything loads.

Published parameter counts for the hub models models.toml names, else the parameter count read
from the local safetensors headers (no weights read), times bytes per parameter. `doctor` shows
it; the device manager uses it to make room before a model's first load.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from localora import profiles

GIB = 1024**3
# Published parameter counts (all sub-models together) for the hub sources models.toml names;
# anything else is counted from the safetensors headers of its local files.
PARAMS = {
    "stabilityai/stable-diffusion-xl-base-1.0": 3.47e9,  # UNet 2.57B + text encoders 0.82B + VAE 0.08B
    "cagliostrolab/animagine-xl-3.1": 3.47e9,
    "gsdf/Counterfeit-V2.5": 1.07e9,  # UNet 0.86B + text encoder 0.12B + VAE 0.08B
    "SG161222/Realistic_Vision_V5.1_noVAE": 1.07e9,
    "Qwen/Qwen2-VL-2B-Instruct": 2.21e9,
    "Qwen/Qwen2-VL-7B-Instruct": 8.29e9,
    "Qwen/Qwen2.5-VL-3B-Instruct": 3.75e9,
    "Qwen/Qwen2.5-VL-7B-Instruct": 8.29e9,
    "Qwen/Qwen3-VL-4B-Instruct": 4.44e9,
    "Qwen/Qwen3-VL-8B-Instruct": 8.77e9,
    "google/gemma-3-4b-it": 4.30e9,  # language model 3.9B + SigLIP 0.4B
    "google/gemma-3-12b-it": 12.2e9,
    "timm/vit_large_patch14_clip_224.openai": 0.43e9,
}
# Bytes per parameter on the GPU. nf4/int8 include quantization constants and the layers
# bitsandbytes leaves in 16 bits (embeddings, lm_head, norms).
BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.1, "nf4": 0.6}
ACTIVATIONS = 1.25  # working memory on top of the weights while a model runs
CUDA_CONTEXT_GIB = 0.5
BASIS = (f"parameters (published counts, or the local safetensors headers) x bytes per parameter "
         f"(fp32 4, fp16/bf16 2, int8 1.1, nf4 0.6; CLIP in fp32), x{ACTIVATIONS} for activations, "
         f"+{CUDA_CONTEXT_GIB} GiB CUDA context; swap: the largest model, resident: the sum")


def _safetensors_params(path: Path) -> int:
    """Parameters in a safetensors file or a folder of them, from the headers (no weights read);
    fp16 variants that duplicate a full-precision file are skipped."""
    total = 0
    for f in sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]:
        if ".fp16." in f.name and f.with_name(f.name.replace(".fp16.", ".")).exists():
            continue
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, t in header.items():
            if name != "__metadata__":
                n = 1
                for d in t["shape"]:
                    n *= d
                total += n
    return total


def _params(source: str) -> float | None:
    if source.removeprefix("hf-hub:") in PARAMS:
        return PARAMS[source.removeprefix("hf-hub:")]
    if profiles.availability(source) != "ok":
        return 0.0 if profiles.is_tiny(source) else None  # tiny models are a few MB at most
    path = profiles.locate(source, source)
    return float(_safetensors_params(path))


def estimate_bytes(source: str, dtype: str) -> int | None:
    """Rough bytes of one model's weights on the accelerator (None: unknown), before loading it."""
    n = _params(source)
    return None if n is None else int(n * BYTES[dtype])


def estimate_gib(profile: profiles.Profile) -> dict[str, float | None]:
    """Rough peak GPU memory of each model of `profile` while it runs, in GiB (None: unknown)."""
    vlm = profile.vlm
    parts = {
        "diffusion": (profile.diffusion.source, BYTES[profile.diffusion.dtype]),
        "vlm": (vlm.source, BYTES[vlm.dtype if vlm.quantization == "none" else vlm.quantization]),
        "clip": (profile.clip.source, BYTES["float32"]),
    }
    out: dict[str, float | None] = {}
    for name, (source, per_param) in parts.items():
        n = _params(source)
        out[name] = None if n is None else n * per_param * ACTIVATIONS / GIB
    return out
