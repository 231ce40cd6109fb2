"""Per-block LoRA weights, as the LoRA Block Weight extension (hako-mikan/sd-webui-lora-block-weight)
writes them: `<lora:NAME:W:lbw=VECTOR|PRESET>`, a LoRA's weight W times one multiplier per block.

    LAYOUTS["sd15"]   BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03 .. OUT11      17 values
    LAYOUTS["sdxl"]   BASE IN04 IN05 IN07 IN08 M00 OUT00 .. OUT05                12 values
                      BASE is the text encoder(s); the others are the UNet's attention blocks
    parse("INS", "sd15", where) -> (1, 1, 1, 1, 0, ...)     a preset or a vector of the layout's length
    text(vector) -> "1,1,1,1,0,..."                         what the lbw= item says
    BlockMap.of(unet, arch)                                 every UNet module -> its slot in the layout
    set_block_weights(net, arch, names, weights, blocks)    denoiser scales through diffusers' block dict

Which layers a block covers (the extension's rule, in diffusers' names): a UNet block's attentions.j
and resnets.j share one slot (A1111's input_blocks.N / output_blocks.N hold both); an up block's
upsampler belongs with its last slot; the mid block is M00. Layers in blocks the layout does not
list (a downsampler, an SDXL block without attention, conv_in = IN00) get multiplier 0, as the
extension gives 0 to layers a short vector does not provide; layers outside every block (time
embedding, conv_out) keep W. Presets are the extension's preset file (17 SD1.5 values); on SDXL a
preset's value for an SDXL block is its value for the SD1.5 block at the same depth of the UNet
(SDXL IN04-IN08 are SD1.5's IN04-IN08, SDXL OUT00-OUT05 sit where SD1.5's OUT03-OUT08 do), so ALL
stays all ones.

Smaller UNets (the tiny profiles: two down blocks of one attention, two up blocks of two) take the
layout's blocks at the same depth counted from the deepest: their down blocks are the layout's two
deepest down blocks, their up blocks its two deepest up blocks, attention j the block's j-th entry
(tiny SDXL uses IN04, IN07, M00, OUT00, OUT01, OUT03, OUT04; tiny SD1.5 IN04, IN07, M00, OUT03,
OUT04, OUT06, OUT07). Layout values without a counterpart there change nothing.

Transformer bases (Flux.1, Z-Image) have no layout yet: block weights there are one error line.

`compose --blocks in,mid,out` (or a GROUP_PRESETS name: unet, all) searches one weight per LoRA and
group: groups_of parses the option, from_groups turns a LoRA's group weights into its lbw vector.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from localora.errors import LocaloraError

Vector = tuple[float, ...]

LAYOUTS: dict[str, tuple[str, ...]] = {
    "sd15": ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06",
             "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"),
    "sdxl": ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"),
}
# Where each layout entry sits in the full-size UNet: (path, diffusers block index, attention index).
_PLACES: dict[str, dict[str, tuple[str, int, int]]] = {
    "sd15": {"IN01": ("down", 0, 0), "IN02": ("down", 0, 1), "IN04": ("down", 1, 0), "IN05": ("down", 1, 1),
             "IN07": ("down", 2, 0), "IN08": ("down", 2, 1), "M00": ("mid", 0, 0),
             **{f"OUT{3 * b + j:02d}": ("up", b, j) for b in (1, 2, 3) for j in range(3)}},
    "sdxl": {"IN04": ("down", 1, 0), "IN05": ("down", 1, 1), "IN07": ("down", 2, 0), "IN08": ("down", 2, 1),
             "M00": ("mid", 0, 0), **{f"OUT{3 * b + j:02d}": ("up", b, j) for b in (0, 1) for j in range(3)}},
}
# The extension's preset file (DEF_WEIGHT_PRESET), SD1.5's 17 values each.
PRESETS: dict[str, Vector] = {name: tuple(float(v) for v in values.split(",")) for name, values in (
    ("NONE", "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    ("ALL", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"),
    ("INS", "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    ("IND", "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    ("INALL", "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    ("MIDD", "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"),
    ("OUTD", "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"),
    ("OUTS", "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"),
    ("OUTALL", "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
    ("ALL0.5", "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"),
)}
# An SDXL block -> the SD1.5 block at the same depth, whose preset value it takes.
_SDXL_FROM_SD15 = {"BASE": "BASE", "IN04": "IN04", "IN05": "IN05", "IN07": "IN07", "IN08": "IN08", "M00": "M00",
                   **{f"OUT{j:02d}": f"OUT{j + 3:02d}" for j in range(6)}}

# The searched groups of `compose --blocks`: each names layout blocks by their prefix.
GROUPS = {"te": ("BASE",), "in": ("IN",), "mid": ("M",), "out": ("OUT",)}
# What each group tends to change, as the VLM's prompts say it (LoRA Block Weight users' lore).
GROUP_HINTS = {"te": "the text encoder: how the prompt is read", "in": "the UNet's input blocks: composition and shapes",
               "mid": "the middle block: overall content", "out": "the UNet's output blocks: details, colours, style"}
# `compose --blocks PRESET`: named group lists.
GROUP_PRESETS = {"unet": ("in", "mid", "out"), "all": ("te", "in", "mid", "out")}

# Slots past the layout: a layer outside every block (multiplier 1) and one in an unlisted block (0).
OUTSIDE, UNLISTED = "outside", "unlisted"


def layout(arch: str, what: str = "block weights") -> tuple[str, ...]:
    if arch not in LAYOUTS:
        from localora import archs

        raise LocaloraError(f"{what}: the {archs.label(arch)} base has no block layout (LoRA Block Weight defines "
                            f"17 SD1.5 and 12 SDXL blocks); give this LoRA one weight, without lbw=")
    return LAYOUTS[arch]


def slots(arch: str) -> int:
    """Multipliers per LoRA in the denoiser's per-row tables: the layout, then OUTSIDE and UNLISTED."""
    return len(LAYOUTS[arch]) + 2


def preset(name: str, arch: str) -> Vector:
    values = dict(zip(LAYOUTS["sd15"], PRESETS[name]))
    return tuple(values[_SDXL_FROM_SD15[b]] if arch == "sdxl" else values[b] for b in LAYOUTS[arch])


def parse(spec: str, arch: str, where: str) -> Vector:
    """lbw=SPEC: a preset name or comma-separated numbers, one per block of the base's layout."""
    names = layout(arch, where)
    spec = spec.strip()
    if spec.upper() in PRESETS and not _is_number(spec):
        return preset(spec.upper(), arch)
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) == 1 and not _is_number(parts[0]):
        raise LocaloraError(f"{where}: lbw={spec} is not a preset ({', '.join(PRESETS)}) nor {len(names)} numbers; "
                            f"write lbw=INS or lbw=" + ",".join(["1"] * len(names)))
    if len(parts) != len(names):
        raise LocaloraError(f"{where}: lbw= has {len(parts)} values but the {_label(arch)} layout has {len(names)} "
                            f"({' '.join(names)}); give {len(names)} values or a preset")
    values = []
    for p in parts:
        if not _is_number(p) or not math.isfinite(float(p)):
            raise LocaloraError(f"{where}: lbw= value '{p}' is not a finite number; give {len(names)} numbers")
        values.append(float(p))
    return tuple(values)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _label(arch: str) -> str:
    from localora import archs

    return archs.label(arch)


def text(vector: Sequence[float]) -> str:
    """The lbw= value localora writes: the vector's numbers, shortest exact form ("1,0,0.5")."""
    out = []
    for v in vector:
        t = repr(float(v))
        out.append(t[:-2] if t.endswith(".0") else t)
    return ",".join(out)


def ones(arch: str) -> Vector:
    return (1.0,) * len(LAYOUTS[arch])


def from_groups(values: Sequence[float], groups: Sequence[str], arch: str) -> tuple[float, Vector]:
    """A searched LoRA's (weight, lbw vector) from its group weights (`compose --blocks in,mid,out`):
    weight 1 and each block at its group's value; a block no group names (the text encoder when
    `te` is not searched) takes the mean of the group values, so equal groups equal one weight."""
    names = LAYOUTS[arch]
    mean = sum(values) / len(values)
    out = []
    for b in names:
        hit = [v for g, v in zip(groups, values) if any(b.startswith(p) for p in GROUPS[g])]
        out.append(float(hit[0]) if hit else float(mean))
    return 1.0, tuple(out)


def check_groups(groups: Sequence[str], where: str = "--blocks") -> None:
    bad = [g for g in groups if g not in GROUPS]
    if bad or not groups or len(set(groups)) != len(groups):
        raise LocaloraError(f"{where} {','.join(groups)}: give distinct groups among {', '.join(GROUPS)} "
                            f"(e.g. in,mid,out) or a preset ({', '.join(GROUP_PRESETS)})")


def groups_of(text: str | None, where: str = "--blocks") -> tuple[str, ...]:
    """--blocks GROUP,GROUP,... or a GROUP_PRESETS name -> the groups, checked; None or "" -> ()."""
    if not text:
        return ()
    text = text.strip().lower()
    groups = GROUP_PRESETS.get(text) or tuple(g.strip() for g in text.split(","))
    check_groups(groups, where)
    return groups


def multipliers(vector: Sequence[float] | None, arch: str) -> Vector:
    """The per-slot multipliers of a LoRA (layout, then OUTSIDE = 1, UNLISTED = 0); without a vector,
    every slot is 1: the LoRA's one weight everywhere."""
    if vector is None:
        return (1.0,) * slots(arch)
    return (*map(float, vector), 1.0, 0.0)


# ------------------------------------------------------------------ the UNet's modules and their slots

_IN_BLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(attentions|resnets|upsamplers|downsamplers)\.(\d+)\.")


@dataclass(frozen=True)
class BlockMap:
    """Where each layout entry lands in a UNet, and the slot of any module name."""

    arch: str
    down: dict[int, tuple[int, ...]]  # diffusers down block -> slot of its attention j
    up: dict[int, tuple[int, ...]]
    mid: int
    attentions: dict[str, int]  # "down"/"up" -> attentions per block (diffusers' transformer_per_block)

    @classmethod
    def of(cls, unet, arch: str) -> BlockMap:
        names = layout(arch)
        places = _PLACES[arch]
        config = unet.config
        per = {"down": config.layers_per_block, "up": config.layers_per_block + 1}
        if not isinstance(per["down"], int):
            raise LocaloraError(f"block weights: this UNet has layers_per_block {per['down']}; localora maps the "
                                f"layout onto UNets with one number there")
        mapped: dict[str, dict[int, tuple[int, ...]]] = {}
        for path, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
            ours = [i for i, b in enumerate(blocks) if hasattr(b, "attentions")]
            theirs = sorted({p[1] for p in places.values() if p[0] == path})
            entries = {b: [names.index(n) for n, p in sorted(places.items(), key=lambda x: x[1]) if p[:2] == (path, b)]
                       for b in theirs}
            # Deepest first: down blocks from the last, up blocks from the first.
            if path == "down":
                ours, theirs = ours[::-1], theirs[::-1]
            mapped[path] = {}
            for depth, block in enumerate(ours):
                slots_of = entries[theirs[min(depth, len(theirs) - 1)]]
                mapped[path][block] = tuple(slots_of[min(j, len(slots_of) - 1)] for j in range(per[path]))
        return cls(arch, mapped["down"], mapped["up"], names.index("M00"), per)

    @property
    def outside(self) -> int:
        return len(LAYOUTS[self.arch])

    @property
    def unlisted(self) -> int:
        return len(LAYOUTS[self.arch]) + 1

    def slot(self, module: str) -> int:
        """The slot of a UNet module (its diffusers name)."""
        if module.startswith("mid_block."):
            return self.mid
        m = _IN_BLOCK.match(module + ".")
        if m:
            path, block, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            table = (self.down if path == "down" else self.up).get(block)
            if table is None or kind == "downsamplers":
                return self.unlisted  # A1111's own input block (IN03, IN06, ...), or a block without attention
            return table[-1] if kind == "upsamplers" else table[min(j, len(table) - 1)]
        if module.startswith(("down_blocks.", "up_blocks.", "conv_in")):
            return self.unlisted
        return self.outside

    def reached_by_diffusers(self, module: str) -> bool:
        """Whether diffusers' block-scale dict sets this layer's scale: attentions.j and resnets.j of a
        block with attentions (its fallback reads attentions.j for the resnet), and the mid attention."""
        if module.startswith("mid_block.attentions.0"):
            return True
        m = _IN_BLOCK.match(module + ".")
        return bool(m and m.group(3) in ("attentions", "resnets")
                    and int(m.group(2)) in (self.down if m.group(1) == "down" else self.up)
                    and int(m.group(4)) < self.attentions[m.group(1)])

    def diffusers_scales(self, weight: float, mult: Sequence[float]) -> dict:
        """diffusers' public per-block scales for set_adapters: {"down": {"block_1": [..]}, "mid": .., "up": ..}."""
        return {"down": {f"block_{b}": [weight * mult[s] for s in t] for b, t in self.down.items()},
                "mid": weight * mult[self.mid],
                "up": {f"block_{b}": [weight * mult[s] for s in t] for b, t in self.up.items()}}


def lora_modules(net) -> list[tuple[str, object]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in net.named_modules() if isinstance(m, LoraLayer)]


def set_block_weights(net, arch: str, names: list[str], weights: Sequence[float],
                      blocks: Sequence[Sequence[float] | None], pipe=None) -> None:
    """Activate `names` on the denoiser (and, given `pipe`, its text encoders) at `weights`, each
    LoRA with a block vector at weight x its block's multiplier.

    The attention blocks' scales go through diffusers' public per-block scales in set_adapters.
    Layers that dict cannot address (a LoCon's downsampler or mid resnet, a block without
    attention) are then set with peft's public LoraLayer.set_scale to the same rule (BlockMap.slot);
    a denoiser with LoRA layers whose names diffusers' dict would fail on (conv_in) gets every
    layer set that way."""
    bmap = BlockMap.of(net, arch)
    layers = lora_modules(net)
    short = any(len(n.split(".")) < 4 for n, _ in layers)
    specs: list = []
    listed = pipe.get_list_adapters() if pipe is not None else {}
    from localora import archs

    for name, w, b in zip(names, weights, blocks):
        if b is None:
            specs.append(float(w))
            continue
        mult = multipliers(b, arch)
        if pipe is None:
            specs.append(float(w) if short else bmap.diffusers_scales(float(w), mult))
            continue
        spec = {archs.arch(arch).denoiser: float(w) if short else bmap.diffusers_scales(float(w), mult)}
        for te in archs.arch(arch).text_encoders:
            if name in listed.get(te, []):
                spec[te] = float(w) * mult[0]
        specs.append(spec)
    if pipe is not None:
        pipe.set_adapters(list(names), adapter_weights=specs)
    else:
        net.set_adapters(list(names), weights=specs)
    for name, w, b in zip(names, weights, blocks):
        if b is None:
            continue
        mult = multipliers(b, arch)
        for module, layer in layers:
            if name in layer.lora_A and (short or not bmap.reached_by_diffusers(module)):
                layer.set_scale(name, float(w) * mult[bmap.slot(module)])


def any_blocks(blocks: Sequence[Sequence[float] | None] | None) -> bool:
    return bool(blocks) and any(b is not None for b in blocks)
