"""Which attention each model runs: torch's scaled_dot_product_attention (SDPA) or a slower one.

    used(model)             {"AttnProcessor2_0": "sdpa"}: each attention kind in a loaded or meta-built
                            model -> its implementation ("sdpa", "eager", "flash_attention_2", ...)
    summary(used(model))    Attention("sdpa", {...}); str() is "sdpa (AttnProcessor2_0)", or each
                            class with its implementation when they differ ("mixed")
    prefer_sdpa(model)      a transformers model switched to SDPA where it supports it and runs another
    remembered(store, key, find)   find()'s report, kept in the JSON file `store` under `key`: doctor
                            builds the models (importing diffusers takes seconds) once per state of
                            their files and libraries

How each library says what it runs:
  diffusers     each attention module's processor. The attention dispatcher's processors (Flux,
                Z-Image) run its default backend, DIFFUSERS_ATTN_BACKEND: "native" and torch's
                other "_native_*" backends are SDPA.
                AttnProcessor2_0 and the other "..2_0" processors (the UNet's) call SDPA themselves;
                AttnProcessor is the eager one.
  transformers  config._attn_implementation of each innermost PreTrainedModel (the VLM's vision
                tower and its language model each have one); transformers has no public getter.
  open_clip     nn.MultiheadAttention, which open_clip calls with need_weights=False: torch then runs
                SDPA in F.multi_head_attention_forward (or its fused fast path in eval, also SDPA);
                open_clip's own Attention runs SDPA unless it uses scaled cosine attention.

Nothing here loads weights or imports torch at import time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SDPA = "sdpa"
NOT_HERE = "not here"


@dataclass(frozen=True)
class Attention:
    implementation: str  # the one every attention module runs, "mixed", or NOT_HERE
    via: dict[str, str] = field(default_factory=dict)  # class -> implementation, in the order met

    def __str__(self) -> str:
        if self.implementation == "mixed":
            return "mixed (" + ", ".join(f"{cls} {impl}" for cls, impl in self.via.items()) + ")"
        return self.implementation + (f" ({', '.join(self.via)})" if self.via else "")

    def as_dict(self) -> dict[str, Any]:
        return {"implementation": self.implementation, "via": dict(self.via)}


def summary(via: dict[str, str]) -> Attention:
    """One Attention for one model or several (a pipeline's text encoders): the implementation they
    share, or "mixed"."""
    kinds = set(via.values())
    if not kinds:
        return Attention("none", {})  # a model without attention layers
    return Attention(kinds.pop() if len(kinds) == 1 else "mixed", dict(via))


def used(model: Any) -> dict[str, str]:
    """Each kind of attention in `model` (a diffusers, transformers or open_clip model, loaded or
    on the meta device) -> the implementation it runs."""
    import torch

    from transformers import PreTrainedModel

    found: dict[str, str] = {}
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            # Only the innermost: an outer model's config is the union of its parts'.
            if not any(isinstance(m, PreTrainedModel) for m in list(module.modules())[1:]):
                found[type(module).__name__] = str(module.config._attn_implementation)
        elif isinstance(module, torch.nn.MultiheadAttention):
            found["nn.MultiheadAttention"] = SDPA
        elif hasattr(module, "set_processor") and getattr(module, "processor", None) is not None:
            found[type(module.processor).__name__] = _processor_implementation(module.processor)
        elif type(module).__module__.startswith("open_clip") and type(module).__name__ == "Attention":
            cosine = getattr(module, "logit_scale", None) is not None
            found["open_clip Attention"] = SDPA if module.use_fsdpa and not cosine else "eager"
    return found


def _processor_implementation(processor: Any) -> str:
    name = type(processor).__name__
    if hasattr(type(processor), "_attention_backend"):  # a dispatcher processor declares it (its value: private)
        return _dispatcher_implementation()
    if name.endswith("2_0"):
        return SDPA
    if "XFormers" in name:
        return "xformers"
    if name == "AttnProcessor":
        return "eager"
    return name  # a processor this module does not know: named as it is


def _dispatcher_implementation() -> str:
    """What the attention dispatcher's processors (Flux's, Z-Image's) run: the process's default
    backend, DIFFUSERS_ATTN_BACKEND ("native": torch's SDPA). A model's set_attention_backend()
    would override it per processor; localora never calls it, and diffusers has no public getter."""
    from diffusers.utils.constants import DIFFUSERS_ATTN_BACKEND

    return SDPA if DIFFUSERS_ATTN_BACKEND == "native" or DIFFUSERS_ATTN_BACKEND.startswith("_native") \
        else DIFFUSERS_ATTN_BACKEND


def prefer_sdpa(model: Any) -> Any:
    """`model` (a transformers model; anything else is returned as it is) running SDPA where it
    supports it. diffusers loads a pipeline's text encoders without passing attn_implementation,
    so they get transformers' default; this makes SDPA explicit, also for a quantized encoder (only
    its config changes). A model that cannot run SDPA keeps what it has."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel) and model.config._attn_implementation != SDPA:
        try:
            model.set_attn_implementation(SDPA)
        except (ValueError, ImportError):
            pass  # not supported by this architecture: doctor reports what it runs instead
    return model



def remembered(store: Path, key: str, find: Callable[[], dict]) -> dict:
    """find()'s result for `key`, from `store` when it holds one; otherwise found and kept there
    (one entry: a newer state of the models or libraries replaces it). A damaged or read-only
    store only costs the finding."""
    try:
        kept = json.loads(store.read_text(encoding="utf-8"))
        if isinstance(kept, dict) and kept.get("key") == key and isinstance(kept.get("report"), dict):
            return kept["report"]
    except (OSError, ValueError):
        pass
    report = find()
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f".tmp-{os.getpid()}-{store.name}")
        tmp.write_text(json.dumps({"key": key, "report": report}, indent=1), encoding="utf-8")
        tmp.replace(store)
    except OSError:
        pass
    return report
