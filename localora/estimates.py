"""How much accelerator memory a profile's models need, before and after they load.

    measured(key)              bytes a model of this source and precision took when it last
                               loaded here ($LOCALORA_HOME/footprints.json), else None
    remember(key, bytes)       kept after each first load, so later runs plan from the truth
    vlm_breakdown(config)      a Qwen2-VL-family config -> its weights by what bitsandbytes does
                               with them (linear weights quantized; embeddings, lm_head, norms,
                               biases and the vision patch embedding left in the compute dtype)
    weight_bytes(source, ...)  one model's weights on the card: measured, else counted from its
                               config (VLMs), else parameters x bytes per parameter
    reserve(bytes)             working memory a model needs on top of its weights while it runs
    estimate_gib(profile)      each model's weights and peak, for `doctor` and the plan

Parameter counts are the published ones for the hub models models.toml names, else read from
the local safetensors headers (no weights read). VLM configs come from the local model, else
from the published configs shipped in localora/configs/.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from localora import paths, profiles

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
# The transformer bases per component (counted from the published configs in scripts/fullsize/ on
# the meta device: scripts/fullsize_flow.py checks these), so that a quantized spec counts only
# its denoiser and large text encoder (archs.Arch.quantize) at 4 or 8 bits.
COMPONENT_PARAMS = {
    "black-forest-labs/FLUX.1-dev": {"transformer": 11_901_408_320, "text_encoder_2": 4_762_310_656,
                                     "text_encoder": 123_060_480, "vae": 83_819_683},
    "black-forest-labs/FLUX.1-schnell": {"transformer": 11_891_178_560, "text_encoder_2": 4_762_310_656,
                                         "text_encoder": 123_060_480, "vae": 83_819_683},
    "Tongyi-MAI/Z-Image-Turbo": {"transformer": 6_154_908_736, "text_encoder": 4_022_468_096, "vae": 83_819_683},
}
PARAMS.update({source: float(sum(parts.values())) for source, parts in COMPONENT_PARAMS.items()})
# Bytes per parameter where a model's layers are not counted one by one (no config): nf4/int8
# include quantization constants and a share of 16-bit layers (embeddings, lm_head, norms).
BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.1, "nf4": 0.6}
# Working memory a model needs on top of its weights while it runs (activations, the VAE decode,
# the KV cache): a fraction of its size plus a floor. The device manager keeps it free.
RESERVE_FRACTION = 0.25
RESERVE_BYTES = GIB
CUDA_CONTEXT_GIB = 0.5  # the CUDA context and cuBLAS workspace: taken before any model loads
# bitsandbytes' 4-bit layout (nf4, double quantization, as vlm/model.py asks for): two weights a
# byte, one 8-bit absmax per block of 64, one float32 absmax per 256 of those, and per tensor the
# 16-entry nf4 code, an offset and the 256-entry code of the second level (float32 each).
NF4_BLOCK, NF4_BLOCK2, NF4_PER_TENSOR = 64, 256, 16 * 4 + 4 + 256 * 4
CONFIGS = Path(__file__).resolve().parent / "configs"
BASIS = (f"weights: measured at the model's last load here, else counted from its config (VLMs: "
         f"linear layers in 4/8 bits, embeddings, lm_head, norms and biases in the compute dtype), "
         f"else published parameters x bytes per parameter (fp16/bf16 2, fp32 4; CLIP in fp32); "
         f"peak: weights + {RESERVE_FRACTION:g} x weights + {RESERVE_BYTES / GIB:g} GiB working memory, "
         f"+{CUDA_CONTEXT_GIB} GiB CUDA context")


def reserve(size: int) -> int:
    """Working memory, in bytes, a model of `size` bytes needs beside its weights while it runs."""
    return int(RESERVE_FRACTION * size) + RESERVE_BYTES


# ------------------------------------------------------------------ measured footprints

def _store() -> Path:
    return paths.home() / "footprints.json"


def measured(key: str) -> int | None:
    """Bytes the model `key` took at its last load on this machine, if it was loaded here before."""
    try:
        value = json.loads(_store().read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None  # never written, or damaged: the estimate stands until the next load
    return value if isinstance(value, int) and value > 0 else None


def remember(key: str, size: int) -> None:
    """Keep a model's measured footprint for later runs (one small JSON file in the home)."""
    path = _store()
    try:
        known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    if known.get(key) == size:
        return
    known[key] = size
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True), encoding="utf-8")
        tmp.replace(path)  # concurrent runs each write a whole file; the last one wins
    except OSError:
        pass  # a read-only home only loses the head start, never the run


def footprint_key(source: str, weights: str) -> str:
    """The store's key: a model source and the precision it loads in ("nf4/bfloat16", "float16")."""
    return f"{source.removeprefix('hf-hub:')} {weights}"


# ------------------------------------------------------------------ counting from a config

@dataclass(frozen=True)
class Breakdown:
    """A VLM's parameters by what bitsandbytes does with them."""

    linear: tuple[int, ...]  # parameters of each linear weight it quantizes (all but lm_head)
    kept: int  # parameters it leaves in the compute dtype: embeddings, lm_head, norms, biases, patch conv
    embeddings: int  # of `kept`: the token embedding and an untied lm_head

    @property
    def total(self) -> int:
        return sum(self.linear) + self.kept


def _linear(rows: int, cols: int, bias: bool, out: list[int]) -> int:
    out.append(rows * cols)
    return rows if bias else 0


def vlm_breakdown(config: dict) -> Breakdown | None:
    """Qwen2-VL and Qwen2.5-VL, from their config.json (flat or with a text_config); None for
    another family, whose weights are then estimated from its parameter count."""
    kind = config.get("model_type")
    if kind not in ("qwen2_vl", "qwen2_5_vl"):
        return None
    text = {**config, **config.get("text_config", {})}
    vis = config["vision_config"]
    h, inter, vocab = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    kv = h // text["num_attention_heads"] * text["num_key_value_heads"]
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    linear: list[int] = []
    embeddings = vocab * h * (1 if tied else 2)
    kept = embeddings + h  # + the final norm
    for _ in range(text["num_hidden_layers"]):
        kept += _linear(h, h, True, linear) + _linear(kv, h, True, linear) + _linear(kv, h, True, linear)
        kept += _linear(h, h, False, linear)  # q, k, v (with biases), o
        for rows, cols in ((inter, h), (inter, h), (h, inter)):  # gate, up, down
            kept += _linear(rows, cols, False, linear)
        kept += 2 * h  # two RMSNorms
    merge = vis["spatial_merge_size"] ** 2
    if kind == "qwen2_vl":
        e, mlp, out, norm = vis["embed_dim"], vis["embed_dim"] * vis["mlp_ratio"], vis["hidden_size"], 2
        block = ((mlp, e), (e, mlp))  # fc1, fc2
    else:
        e, mlp, out, norm = vis["hidden_size"], vis["intermediate_size"], vis["out_hidden_size"], 1
        block = ((mlp, e), (mlp, e), (e, mlp))  # gate, up, down
    channels = vis.get("in_chans", vis.get("in_channels", 3))
    kept += e * channels * vis["temporal_patch_size"] * vis["patch_size"] ** 2  # the patch Conv3d, no bias
    for _ in range(vis["depth"]):
        kept += 2 * norm * e  # LayerNorm (weight, bias) or RMSNorm (weight)
        kept += _linear(3 * e, e, True, linear) + _linear(e, e, True, linear)
        for rows, cols in block:
            kept += _linear(rows, cols, True, linear)
    kept += norm * e  # the merger's ln_q
    kept += _linear(e * merge, e * merge, True, linear) + _linear(out, e * merge, True, linear)
    return Breakdown(tuple(linear), kept, embeddings)


def quantized_bytes(b: Breakdown, quantization: str, compute: str) -> int:
    """Bytes of a VLM's weights as bitsandbytes holds them (its quantization state included)."""
    per = BYTES[compute]
    if quantization == "nf4":
        blocks = [math.ceil(n / NF4_BLOCK) for n in b.linear]
        q = sum(n // 2 + k + 4 * math.ceil(k / NF4_BLOCK2) + NF4_PER_TENSOR for n, k in zip(b.linear, blocks))
    elif quantization == "int8":
        q = sum(b.linear) + 4 * len(b.linear) * 1024  # int8 weights and a float32 scale per row (rows ~1k)
    else:
        q = int(sum(b.linear) * per)
    return int(q + b.kept * per)


def vlm_config(source: str) -> dict | None:
    """The model's config.json: the local one if the model is here, else the published one shipped
    in localora/configs/, else None."""
    if profiles.availability(source) == "ok":
        path = profiles.locate(source, source)
        if (path / "config.json").is_file():
            return json.loads((path / "config.json").read_text(encoding="utf-8"))
    shipped = CONFIGS / (source.removeprefix("hf-hub:").replace("/", "--") + ".json")
    return json.loads(shipped.read_text(encoding="utf-8")) if shipped.is_file() else None


# ------------------------------------------------------------------ parameter counts

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
                total += math.prod(t["shape"])
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


def vlm_bytes(source: str, quantization: str, compute: str) -> int | None:
    """A VLM's weights on the card, before it loads: counted layer by layer from its config where
    the family is known, else its parameter count x bytes per parameter."""
    config = vlm_config(source)
    b = vlm_breakdown(config) if config else None
    if b is not None:
        return quantized_bytes(b, quantization, compute)
    return estimate_bytes(source, compute if quantization == "none" else quantization)


# ------------------------------------------------------------------ a profile's models

def _precision(spec: profiles.DiffusionSpec, dtype: str) -> str:
    quantization = getattr(spec, "quantization", "none")
    return dtype if quantization == "none" else quantization


def diffusion_key(spec: profiles.DiffusionSpec, dtype: str) -> str:
    precision = _precision(spec, dtype)
    return footprint_key(spec.source + (f"+{spec.vae}" if spec.vae else ""),
                         precision if precision == dtype else f"{precision}/{dtype}")


def diffusion_bytes(spec: profiles.DiffusionSpec, dtype: str) -> int | None:
    """A diffusion pipeline's weights before it loads (None: unknown): its parameters (and a
    separate VAE's) x bytes per parameter of its dtype, or of its quantization where the spec sets
    one (which applies to the denoiser and the large text encoder: archs.py)."""
    per = _precision(spec, dtype)
    parts = COMPONENT_PARAMS.get(spec.source.removeprefix("hf-hub:"))
    if parts is not None:
        from localora import archs

        quantized = archs.arch(spec.arch).quantize if per != dtype else ()
        return int(sum(n * BYTES[per if part in quantized else dtype] for part, n in parts.items()))
    if estimate_bytes(spec.source, per) is None:
        return None
    return sum(estimate_bytes(s, per if s == spec.source else dtype) or 0 for s in (spec.source, spec.vae) if s)


def vlm_key(spec: profiles.VLMSpec, dtype: str) -> str:
    return footprint_key(spec.source, f"{spec.quantization}/{dtype}")


def clip_key(spec: profiles.ClipSpec) -> str:
    return footprint_key(spec.source, "float32")


def profile_keys(profile: profiles.Profile) -> dict[str, str]:
    """The footprint store's key of each model of `profile`, in the precision it runs in on a GPU
    (the registrars use the same functions with the precision they load in)."""
    return {"diffusion": diffusion_key(profile.diffusion, profile.diffusion.dtype),
            "vlm": vlm_key(profile.vlm, profile.vlm.dtype), "clip": clip_key(profile.clip)}


def weights(profile: profiles.Profile) -> dict[str, int | None]:
    """Bytes of each model's weights on a GPU (None: unknown): measured here before, else estimated."""
    d, v = profile.diffusion, profile.vlm
    keys = profile_keys(profile)
    counted = {
        "diffusion": diffusion_bytes(d, d.dtype),
        "vlm": vlm_bytes(v.source, v.quantization, v.dtype),
        "clip": estimate_bytes(profile.clip.source, "float32"),
    }
    return {n: measured(keys[n]) or counted[n] for n in counted}


def estimate_gib(profile: profiles.Profile) -> dict[str, float | None]:
    """Peak GPU memory of each model of `profile` while it runs (weights and working memory), GiB."""
    return {n: None if b is None else (b + reserve(b)) / GIB for n, b in weights(profile).items()}
