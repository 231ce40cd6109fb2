"""Bake chosen weights into one LoRA file: the Merge of k LoRAs at weights w as a single LoRA.

    LoRA 1 (A1: r1 x in, B1: out x r1, scale s1)  ┐
    ...                                           ├─> A = [A1; ...; Ak]               (r1+...+rk) x in
    LoRA k (Ak, Bk, sk), weights w1..wk           ┘   B = [w1 s1 B1 | ... | wk sk Bk]  out x (r1+...+rk)
                                                      loaded at weight 1.0, scale 1    (one alpha per file:
                                                                                        see concatenate)

so B A x = sum_k w_k s_k B_k A_k x: what Merge adds to every layer, exactly (no SVD, no loss),
for linear and conv layers alike (a conv LoRA's rank is A's out-channels and B's in-channels).
A layer that only some LoRAs touch gets only their blocks. The factors and scales are read from
the loaded pipeline through peft's public LoraLayer attributes (lora_A, lora_B, scaling), so
every file format diffusers can load bakes the same way; the result is a kohya-format
.safetensors with the key names kohya's sd-scripts writes (export/keys.py), which A1111,
ComfyUI and diffusers all load, with kohya and modelspec metadata in its header.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from localora import __version__, archs
from localora.diffusion import loras as loralib
from localora.diffusion.loras import Lora
from localora.diffusion.pipeline import set_weights
from localora.errors import LocaloraError
from localora.export.keys import SDXL_LAYERS_PER_BLOCK, SDXL_UP_BLOCKS, kohya_name, kohya_transformer_tensors
from localora.files import atomic_write, file_hash, storage_error

if TYPE_CHECKING:  # torch loads with the pipeline, so that importing this module stays cheap
    import torch

    from localora.diffusion.render import Renderer

ATTENTION_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
# What sd-scripts writes as modelspec.implementation, per base.
IMPLEMENTATIONS = {"sdxl": "https://github.com/Stability-AI/generative-models",
                   "sd15": "https://github.com/Stability-AI/generative-models",
                   "flux": "https://github.com/black-forest-labs/flux", "zimage": "https://github.com/Tongyi-MAI/Z-Image"}


@dataclass(frozen=True)
class BakeResult:
    path: Path
    arch: str
    modules: int  # LoRA layers in the file
    ranks: dict[str, int]  # kohya module name -> its rank (the sum of the source ranks there)
    max_rank: int
    metadata: dict[str, str]


@dataclass(frozen=True)
class Factors:
    """One source LoRA's factors on one layer, in float32: the layer adds scale * B (A x)."""

    down: torch.Tensor  # A: (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # B: (out, r) or (out, r, 1, 1)
    scale: float


def bake_lora(renderer: Renderer, loras: Sequence[Lora], weights: Sequence[float], out: Path, *,
              title: str | None = None, blocks: Sequence = ()) -> BakeResult:
    """Write `out`: one kohya LoRA that at weight 1.0 renders what Merge renders of `loras` at
    `weights` (and per-LoRA block vectors `blocks`: each layer's factors scaled by its block's
    multiplier, diffusion/blocks.py). Refuses, in one line, what cannot be baked exactly."""
    loras, weights, out = list(loras), [float(w) for w in weights], Path(out)
    arch = renderer.profile.diffusion.arch
    check_bakeable(loras, weights, arch, out)
    pipe = renderer.pipeline()
    names = renderer.adapters_for(loras)
    factors = read_factors(pipe, names, loras)
    add_out_projections(pipe, factors)
    tensors, ranks = concatenate(factors, weights, arch, getattr(pipe, archs.arch(arch).denoiser).config,
                                 layer_multipliers(pipe, arch, blocks, factors))
    title = title or "+".join(lora.name for lora in loras)
    metadata = describe(renderer, loras, weights, arch, title, out, max(ranks.values()), blocks)
    _write(out, tensors, metadata)
    return BakeResult(out, arch, len(ranks), ranks, max(ranks.values()), metadata)


def check_bakeable(loras: list[Lora], weights: list[float], arch: str, out: Path) -> None:
    """Refuse, before any work, what cannot be baked; the output folder is checked on writing."""
    if out.suffix.lower() != ".safetensors":
        raise LocaloraError(f"bake: {out}: the output must be a .safetensors file; name it NAME.safetensors")
    if not loras:
        raise LocaloraError("bake: no LoRAs given; pass the LoRAs whose weights to bake")
    if len(weights) != len(loras):
        raise LocaloraError(f"bake: {len(loras)} LoRAs but {len(weights)} weights; give one weight per LoRA")
    bad = [f"{lora.path} ({w})" for lora, w in zip(loras, weights) if not math.isfinite(w)]
    if bad:
        raise LocaloraError(f"bake: the weights of {', '.join(bad)} are not finite numbers; give finite weights")
    bases = {lora.path: loralib.inspect(lora.path).arch for lora in loras}
    known = {a for a in bases.values() if a}
    if len(known) > 1 or (known and known != {arch}):
        told = ", ".join(f"{path} ({archs.label(a)})" for path, a in bases.items())
        ours = archs.arch(arch).label
        raise LocaloraError(f"bake: LoRAs of different base models: {told}, on {archs.article(ours)} {ours} "
                            f"profile; bake only LoRAs of the profile's base model together")


def read_factors(pipe, names: list[str], loras: list[Lora]) -> dict[tuple[str, str], list[Factors | None]]:
    """(component, module) -> one Factors per adapter (None where that LoRA does not touch it)."""
    from peft.tuners.lora import LoraLayer

    from localora.diffusion.methods import arch_of

    # peft's scaling is weight * alpha / r after set_adapters: weight 1 leaves the LoRA's own scale.
    try:
        set_weights(pipe, names, [1.0] * len(names))
    except ValueError as e:  # diffusers: an adapter with no UNet layer cannot be activated (nor merged)
        raise LocaloraError(f"bake: {', '.join(str(lora.path) for lora in loras)} cannot be active together "
                            f"({str(e).splitlines()[0][:160]}); bake only LoRAs that Merge can render") from None
    found: dict[tuple[str, str], list[Factors | None]] = {}
    base = archs.arch(arch_of(pipe))
    for component in (base.denoiser, *base.text_encoders):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for module_name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            for i, name in enumerate(names):
                if name in layer.lora_A:
                    _check_plain(layer, name, loras[i], f"{component}.{module_name}")
                    entry = found.setdefault((component, module_name), [None] * len(names))
                    entry[i] = Factors(layer.lora_A[name].weight.detach().float().cpu(),
                                       layer.lora_B[name].weight.detach().float().cpu(), float(layer.scaling[name]))
    if not found:
        raise LocaloraError(f"bake: none of {', '.join(str(lora.path) for lora in loras)} has a LoRA layer "
                            f"in the pipeline; check the files are LoRAs for this base model")
    return found


def add_out_projections(pipe, factors: dict[tuple[str, str], list[Factors | None]]) -> None:
    """Give a text encoder whose baked attention layers lack every out_proj one zero LoRA there.

    diffusers 0.42 tells the layout of a kohya text-encoder LoRA by its `out_proj` layers (as
    `to_out_lora`): without one it refuses the file ("Could not automatically infer state dict
    type"), or, beside MLP layers, drops the q/k/v layers without a word. kohya's trainer always
    writes all four projections; a peft LoRA on q_proj/v_proj does not. A rank-1 block of zeros
    adds exactly nothing anywhere, and makes diffusers read the file right.
    """
    import torch

    for component in ("text_encoder", "text_encoder_2"):
        attention = [m for c, m in factors if c == component and m.endswith(ATTENTION_PROJECTIONS)]
        if not attention or any(m.endswith("self_attn.out_proj") for m in attention):
            continue
        module = attention[0].rsplit(".", 1)[0] + ".out_proj"
        linear = getattr(pipe, component).get_submodule(module)
        linear = getattr(linear, "base_layer", linear)  # peft wraps it when another LoRA touches it
        zero = Factors(torch.zeros(1, linear.in_features), torch.zeros(linear.out_features, 1), 1.0)
        k = len(next(iter(factors.values())))
        factors[(component, module)] = [zero] + [None] * (k - 1)


def _check_plain(layer, name: str, lora: Lora, where: str) -> None:
    """Only plain LoRA bakes exactly into lora_down/lora_up; anything else is refused."""
    import torch

    what = None
    if getattr(layer, "use_dora", {}).get(name):
        what = "DoRA (a magnitude vector)"
    elif name in getattr(layer, "lora_variant", {}):
        what = f"a LoRA variant ({type(layer.lora_variant[name]).__name__})"
    elif getattr(layer, "lora_bias", {}).get(name) or getattr(layer.lora_B[name], "bias", None) is not None:
        what = "a LoRA bias"
    elif type(layer.lora_A[name]) not in (torch.nn.Linear, torch.nn.Conv2d):
        what = f"a {type(layer.lora_A[name]).__name__} LoRA layer"
    elif isinstance(layer.lora_B[name], torch.nn.Conv2d) and tuple(layer.lora_B[name].kernel_size) != (1, 1):
        what = "a conv LoRA whose up factor is not 1x1"
    if what:
        raise LocaloraError(f"bake: {lora.path} has {what} at {where}; only plain LoRA layers can be baked "
                            f"into a kohya LoRA, bake without this file")


def layer_multipliers(pipe, arch: str, blocks: Sequence, factors: dict) -> dict[tuple[str, str], list[float]] | None:
    """(component, module) -> each LoRA's block multiplier there (BlockMap.slot's rule), or None
    without block vectors: the same rule Merge renders with."""
    from localora.diffusion import blocks as blocklib

    if not blocklib.any_blocks(blocks):
        return None
    bmap = blocklib.BlockMap.of(pipe.unet, arch)
    mult = [blocklib.multipliers(b, arch) for b in blocks]
    return {(c, m): [x[0 if c != "unet" else bmap.slot(m)] for x in mult] for c, m in factors}


def concatenate(factors: dict[tuple[str, str], list[Factors | None]], weights: list[float], arch: str,
                unet_config, multipliers: dict[tuple[str, str], list[float]] | None = None,
                ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """kohya tensors (lora_down, lora_up, alpha per module) and each module's rank.

    Every module gets the same alpha, the largest rank R, and a module of rank r has its B
    multiplied by r / R, so that kohya's scale alpha / r brings it back: scale * B A is the
    weighted sum exactly (up to one float rounding). Why not alpha = r per module (scale 1)?
    diffusers 0.42 drops per-module alphas of attention projections (its kohya converter names
    them `...attn1.processor.to_q_lora.down.weight.alpha`, which matches no module), so such a
    file would load there at the wrong scale; one alpha for the file loads right everywhere.
    """
    import torch

    if archs.arch(arch).denoiser == "transformer":
        return _concatenate_transformer(factors, weights, arch)
    layers_per_block = getattr(unet_config, "layers_per_block", SDXL_LAYERS_PER_BLOCK)
    up_blocks = tuple(getattr(unet_config, "up_block_types", SDXL_UP_BLOCKS))
    blocks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for (component, module), per_lora in sorted(factors.items()):
        scaled = [w * m for w, m in zip(weights, multipliers[(component, module)])] if multipliers else weights
        used = [(f, w) for f, w in zip(per_lora, scaled) if f is not None]
        down = torch.cat([f.down for f, _ in used], dim=0)
        # The weight and the LoRA's own scale go into B: B A is what Merge adds to this layer.
        up = torch.cat([f.up * (w * f.scale) for f, w in used], dim=1)
        key = kohya_name(component, module, arch, layers_per_block, up_blocks)
        if key in blocks:
            raise LocaloraError(f"bake: two layers would share the kohya name {key}; this model's layout cannot be "
                                f"written in kohya format")
        blocks[key] = (down, up)
    ranks = {key: int(down.shape[0]) for key, (down, _) in blocks.items()}
    alpha = max(ranks.values())
    tensors: dict[str, torch.Tensor] = {}
    for key, (down, up) in blocks.items():
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = (up * (ranks[key] / alpha)).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    return tensors, ranks


def _concatenate_transformer(factors: dict[tuple[str, str], list[Factors | None]], weights: list[float],
                             arch: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """As concatenate, for a transformer base: kohya's names (Flux: BFL's fused qkv / linear1, whose
    slots diffusers' converter splits again), an alpha per module equal to its rank (scale 1):
    diffusers' Flux and Z-Image converters read each module's alpha, so no common alpha is needed."""
    import torch

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for (component, module), per_lora in sorted(factors.items()):
        used = [(f, w) for f, w in zip(per_lora, weights) if f is not None]
        down = torch.cat([f.down for f, _ in used], dim=0)
        up = torch.cat([f.up * (w * f.scale) for f, w in used], dim=1)
        if component == "transformer":
            layers[module] = (down, up)
        else:
            key = kohya_name(component, module, arch)
            tensors.update({f"{key}.lora_down.weight": down.contiguous(), f"{key}.lora_up.weight": up.contiguous(),
                            f"{key}.alpha": torch.tensor(float(down.shape[0]))})
    tensors.update(kohya_transformer_tensors(layers, arch, scale=1.0))
    ranks = {k.removesuffix(".lora_down.weight"): int(t.shape[0]) for k, t in tensors.items()
             if k.endswith(".lora_down.weight")}
    return tensors, ranks


def describe(renderer: Renderer, loras: list[Lora], weights: list[float], arch: str, title: str, out: Path,
             max_rank: int, blocks: Sequence = ()) -> dict[str, str]:
    """The header: kohya's ss_* keys, SAI modelspec keys and where the file came from."""
    triggers = ", ".join(lora.triggers.strip() for lora in loras if lora.triggers.strip())
    sources = [{"name": lora.name, "file": str(lora.path), "sha256": file_hash(lora.path), "weight": w,
                "triggers": lora.triggers} for lora, w in zip(loras, weights)]
    for source, b in zip(sources, blocks or ()):
        if b is not None:
            source["lbw"] = list(b)
    mix = ", ".join(f"{lora.name} {w:g}" for lora, w in zip(loras, weights))
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max_rank),
        # every module's alpha (see concatenate); a transformer base's: its own rank
        "ss_network_alpha": str(max_rank) if archs.arch(arch).denoiser == "unet" else "rank",
        "ss_base_model_version": archs.arch(arch).kohya_base,
        "ss_output_name": out.stem,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": archs.arch(arch).modelspec,
        "modelspec.implementation": IMPLEMENTATIONS[arch],
        "modelspec.title": title,
        "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "modelspec.trigger_phrase": triggers,
        "modelspec.description": f"localora bake of {mix} (LoRA Merge at these weights, exact rank concatenation; "
                                 f"load at weight 1.0)",
        "localora": json.dumps({"version": __version__, "profile": renderer.profile.name, "sources": sources}),
    }


def _write(out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    try:
        atomic_write(out, lambda p: save_file(tensors, str(p), metadata=metadata))
    except OSError as e:
        error = storage_error(e, "choose a folder you can write to, or free space")
        if error is None:
            raise
        raise error from None
