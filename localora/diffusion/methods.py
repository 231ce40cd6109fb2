"""The three ways to compose LoRAs at sampling time, as ../shared/notes/methods.md defines them.

    merge(pipe, adapters, weights, prompt, sampling, on_step) -> latents     one signature for all
    METHODS["switch"].order(loras)                                          the order a method wants
    decode(pipe, latents) -> PIL image

Each method takes a loaded pipeline of any base (archs.py) whose adapters are already loaded and
a resolved Sampling, and returns the final latents (batch, channels, h, w). Merge and Switch run
the base's stock diffusers pipeline; Composite and batched Merge run their own loop on the
denoiser seam (denoisers.py), which sees a network that predicts for a batch of rows, each row with
its own LoRA weights, so they are written once for every base. METHODS is the one registry: the
renderer, the CLI's choices, the bench and the docs read it. To add a method, write its function
here and register it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from localora import archs
from localora.diffusion import denoisers
from localora.diffusion.loras import Lora, switch_order
from localora.diffusion.pipeline import set_weights
from localora.diffusion.sampling import Sampling
from localora.errors import LocaloraError

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch loads on first render, so that commands without a model start fast
    import torch
    from PIL import Image

    from localora.memory import OutOfMemory

StepCallback = Callable[[int, int], None]  # (step index, total steps)


Blocks = Sequence[Sequence[float] | None] | None  # per LoRA: its lbw vector (diffusion/blocks.py) or None


class MethodFn(Protocol):
    def __call__(self, pipe, adapters: list[str], weights: list[float], prompt: str, s: Sampling,
                 on_step: StepCallback | None = None, blocks: Blocks = None) -> torch.Tensor: ...


def _generator(seed: int) -> torch.Generator:
    return denoisers.generator(seed)


fresh_scheduler = denoisers.fresh_scheduler


def arch_of(pipe) -> str:
    """The base of a loaded pipeline, by its class (archs.ARCHS declares each one's)."""
    for a in archs.ARCHS.values():
        if type(pipe).__name__ == a.pipeline:
            return a.name
    raise LocaloraError(f"localora has no base for a {type(pipe).__name__}; it renders {', '.join(archs.ARCHS)}")


def _run_pipeline(pipe, prompt: str, s: Sampling, on_step: StepCallback | None,
                  switch: Callable | None = None) -> torch.Tensor:
    """The stock diffusers pipeline of the base, with the family's settings: Merge and Switch are
    exactly what the pipeline computes."""
    fam = denoisers.family_of(arch_of(pipe))

    def callback(p, i, t, kwargs):
        if switch:
            switch(i)
        if on_step:
            on_step(i, s.steps)
        return {}

    fresh_scheduler(pipe)
    latents = pipe(
        prompt=prompt, num_inference_steps=s.steps, width=s.width, height=s.height, generator=_generator(s.seed),
        output_type="latent", callback_on_step_end=callback, **fam.stock_kwargs(s),
    ).images
    return fam.unpacked(pipe, latents, s)


def merge(pipe, adapters: list[str], weights: list[float], prompt: str, s: Sampling,
          on_step: StepCallback | None = None, blocks: Blocks = None) -> torch.Tensor:
    """LoRA Merge: all adapters active together, W' = W + sum_k w_k B_k A_k (unfused, exact); with
    block vectors, each block's layers at w_k x its multiplier (diffusers' per-block scales)."""
    set_weights(pipe, adapters, weights, blocks)
    return _run_pipeline(pipe, prompt, s, on_step)


def block_multipliers(arch: str, blocks: Blocks, k: int, always: bool = False) -> torch.Tensor | None:
    """(k, slots) per-slot multipliers of the LoRAs (rows.py's M for one image), or None without
    blocks (unless `always`: then all ones)."""
    import torch

    from localora.diffusion import blocks as blocklib

    if not blocklib.any_blocks(blocks) and not always:
        return None
    return torch.tensor([blocklib.multipliers(b, arch) for b in blocks], dtype=torch.float64).view(k, -1)


def _block_map(net, arch: str, *block_lists: Blocks):
    from localora.diffusion import blocks as blocklib

    return blocklib.BlockMap.of(net, arch) if any(blocklib.any_blocks(b) for b in block_lists) else None


def merge_many(pipe, adapters: list[str], rows: list[list[float]], prompt: str, s: Sampling,
               on_step: StepCallback | None = None, blocks: list[Blocks] | None = None) -> torch.Tensor:
    """LoRA Merge of several weight vectors at once: one denoiser batch whose image m uses `rows[m]`
    (rows.py), on the denoiser seam. Every image starts from the seed's noise, as merge() draws
    it, so image m equals merge() at `rows[m]` up to float rounding. Only for deterministic
    schedulers: an ancestral step draws different noise for a batch.
    `blocks[m]`, when given, is image m's per-LoRA block vectors (each hook scales by its block).
    Returns latents with one image per weight vector."""
    import torch

    from localora.diffusion.rows import lora_layers, row_weights

    arch = arch_of(pipe)
    fam = denoisers.family_of(arch)
    net = denoisers.denoiser(pipe, arch)
    m = len(rows)
    blocks = blocks or [None] * m
    bmap = _block_map(net, arch, *blocks)
    with torch.no_grad():
        # 1. Prompt embeddings: text-encoder LoRA layers make them differ per weight vector.
        uncond = fam.uses_uncond(s, always=False)
        encoders = [getattr(pipe, e, None) for e in archs.arch(arch).text_encoders]
        if any(lora_layers(e) for e in encoders if e is not None):
            conds = []
            for w, b in zip(rows, blocks):
                set_weights(pipe, adapters, w, b)
                conds.append(fam.encode(pipe, prompt, s, uncond))
            cond = denoisers.concat(conds)
        else:
            set_weights(pipe, adapters, rows[0], blocks[0])
            cond = fam.encode(pipe, prompt, s, uncond)
        # 2. One image's schedule and starting noise, drawn exactly as the pipeline draws it, for every image.
        run = fam.start(pipe, s, cond, s.seed)
        latents = run.latents.repeat(m, *([1] * (run.latents.dim() - 1)))
        weights = torch.tensor(rows, dtype=torch.float64).repeat_interleave(cond.branches, 0)
        mult = None if bmap is None else torch.stack(
            [block_multipliers(arch, b or [None] * len(adapters), len(adapters), always=True)
             for b in blocks]).repeat_interleave(cond.branches, 0)
        # 3. The denoising loop: image-major rows, each with its weight vector.
        with row_weights(net, adapters, bmap) as lora_rows:
            lora_rows.set(weights, mult)
            for i, t in enumerate(run.timesteps):
                out = fam.predict(pipe, run, latents, t, cond, 1)
                eps = fam.guide(out.view(m, cond.branches, *out.shape[1:]), s)
                latents = fam.step(run, eps, t, latents)
                if on_step:
                    on_step(i, s.steps)
    return fam.unpacked(pipe, latents, s)


def switch_active(step: int, n: int, every: int) -> int:
    """Index of the LoRA active at denoising step `step` under LoRA Switch.

    The change happens after the scheduler step of steps every, 2*every, ..., so the first LoRA
    covers steps 0..every (every + 1 steps) and each later turn `every` steps.
    """
    return 0 if step == 0 else ((step - 1) // every) % n


def switch(pipe, adapters: list[str], weights: list[float], prompt: str, s: Sampling,
           on_step: StepCallback | None = None, blocks: Blocks = None) -> torch.Tensor:
    """LoRA Switch: one adapter at a time, in the given order, rotating every `s.switch_every` steps.

    The prompt is encoded with only the first adapter active, as in the reference.
    """
    from localora.diffusion import blocks as blocklib

    blocks = list(blocks) if blocklib.any_blocks(blocks) else None
    set_weights(pipe, [adapters[0]], [weights[0]], [blocks[0]] if blocks else None)
    arch = arch_of(pipe)
    net = denoisers.denoiser(pipe, arch)
    current = [0]

    def after_step(i: int) -> None:
        nxt = switch_active(i + 1, len(adapters), s.switch_every)
        if nxt != current[0]:
            if blocks and blocks[nxt] is not None:
                blocklib.set_block_weights(net, arch, [adapters[nxt]], [weights[nxt]], [blocks[nxt]])
            else:
                net.set_adapters([adapters[nxt]], weights=[weights[nxt]])
            current[0] = nxt

    return _run_pipeline(pipe, prompt, s, on_step, switch=after_step)


def composite(pipe, adapters: list[str], weights: list[float], prompt: str, s: Sampling,
              on_step: StepCallback | None = None, blocks: Blocks = None,
              split: OutOfMemory | None = None) -> torch.Tensor:
    """LoRA Composite: at every step, one denoiser pass per adapter alone; the mean of their
    predictions, guided (UNets: eps = u + g (c - u) with u, c the means over adapters, for any g;
    Flux.1: no unconditional pass, the guidance is embedded; Z-Image: its own guidance formula).

    The k passes run as one denoiser batch, each row with its own LoRA (rows.py), so no
    set_adapters call happens between them; if the card runs out of memory the batch is split,
    and `split` (the run's memory.OutOfMemory) keeps the split that fit for later renders.
    """
    import torch

    from localora.memory import OutOfMemory

    with torch.no_grad():
        return _composite(pipe, adapters, weights, prompt, s, on_step, blocks, split or OutOfMemory())


def _composite(pipe, adapters: list[str], weights: list[float], prompt: str, s: Sampling,
               on_step: StepCallback | None, blocks: Blocks, split: OutOfMemory) -> torch.Tensor:
    import torch

    from localora.diffusion.rows import row_weights

    arch = arch_of(pipe)
    fam = denoisers.family_of(arch)
    # 1. Encode the prompt with every LoRA active (their text-encoder layers, if any, as in Merge).
    set_weights(pipe, adapters, weights, blocks)
    cond = fam.encode(pipe, prompt, s, fam.uses_uncond(s, always=True))
    # 2. Timesteps, then the starting noise.
    run = fam.start(pipe, s, cond, s.seed)
    latents = run.latents
    k = len(adapters)
    per_pass = split.composite_per_pass(k)  # LoRAs in one denoiser batch
    net = denoisers.denoiser(pipe, arch)
    mult = block_multipliers(arch, blocks, k)
    # 3. The denoising loop: per step, the guided mean of the k single-LoRA predictions.
    with row_weights(net, adapters, _block_map(net, arch, blocks)) as rows:
        for i, t in enumerate(run.timesteps):
            while True:
                try:
                    total = sum(_composite_pass(fam, pipe, run, rows, latents, t, cond, weights,
                                                range(j, min(j + per_pass, k)), mult)
                                for j in range(0, k, per_pass))
                    break
                except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                    per_pass = split.shrink_composite(per_pass, e)  # re-raises all but an OOM
            eps = fam.guide((total / k).unsqueeze(0), s)
            latents = fam.step(run, eps, t, latents)
            if on_step:
                on_step(i, s.steps)
    return fam.unpacked(pipe, latents, s)


def composite_per_lora(pipe, adapters: list[str], weights: list[float], prompt: str, s: Sampling,
                       on_step: StepCallback | None = None, blocks: Blocks = None) -> torch.Tensor:
    """Composite as the paper writes it: per step, one denoiser pass per LoRA, each switched on
    with set_adapters. Kept as the reference that `composite` is tested and benchmarked against."""
    import torch

    arch = arch_of(pipe)
    fam = denoisers.family_of(arch)
    net = denoisers.denoiser(pipe, arch)
    from localora.diffusion import blocks as blocklib

    blocks = list(blocks) if blocklib.any_blocks(blocks) else [None] * len(adapters)
    with torch.no_grad():
        set_weights(pipe, adapters, weights, blocks)
        cond = fam.encode(pipe, prompt, s, fam.uses_uncond(s, always=True))
        run = fam.start(pipe, s, cond, s.seed)
        latents = run.latents
        for i, t in enumerate(run.timesteps):
            total = 0
            for name, w, b in zip(adapters, weights, blocks):
                if b is None:
                    net.set_adapters([name], weights=[w])
                else:
                    blocklib.set_block_weights(net, arch, [name], [w], [b])
                total = total + fam.predict(pipe, run, latents, t, cond, 1)
            eps = fam.guide((total / len(adapters)).view(1, cond.branches, *total.shape[1:]), s)
            latents = fam.step(run, eps, t, latents)
            if on_step:
                on_step(i, s.steps)
        return fam.unpacked(pipe, latents, s)


def _composite_pass(fam: denoisers.Family, pipe, run, rows, latents, t, cond, weights: list[float], which: range,
                    mult: torch.Tensor | None = None):
    """The sum over the LoRAs in `which` of their predictions (every branch), in one denoiser batch."""
    from localora.diffusion.rows import one_hot_rows

    n = len(which)
    rows.set(one_hot_rows(weights, which, per_row=cond.branches),
             None if mult is None else mult.unsqueeze(0).expand(n * cond.branches, *mult.shape))
    out = fam.predict(pipe, run, latents, t, cond, n)
    return out.view(n, cond.branches, *out.shape[1:]).sum(0)


def cmlora(pipe, adapters: list[str], weights: list[float], prompt: str, s: Sampling,
           on_step: StepCallback | None = None, blocks: Blocks = None) -> torch.Tensor:
    """Cached Multi-LoRA Composition (diffusion/cmlora.py): Composite whose non-dominant passes are
    reused between refreshes every `s.cache_interval` steps; 0 is Composite itself."""
    from localora.diffusion import cmlora as cm

    return cm.cmlora(pipe, adapters, weights, prompt, s, on_step, blocks)


sdxl_time_ids = denoisers.sdxl_time_ids


def decode(pipe, latents: torch.Tensor) -> Image.Image:
    """Latents (as the methods return them) to a PIL image with the pipeline's VAE."""
    return denoisers.family_of(arch_of(pipe)).decode(pipe, latents)


# ------------------------------------------------------------------ the registry

def _as_given(loras: Sequence[Lora]) -> list[int]:
    return list(range(len(loras)))


@dataclass(frozen=True)
class Method:
    name: str
    run: MethodFn
    summary: str  # one line, for --help and the docs
    # The order the method wants its LoRAs in (indices into the given list).
    order: Callable[[Sequence[Lora]], list[int]] = _as_given


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("merge", merge, "all LoRAs active at once, W' = W + sum w_k B_k A_k (unfused, exact)"),
    Method("switch", switch, "one LoRA at a time, rotating every --switch-every steps, character first",
           order=switch_order),
    Method("composite", composite, "one denoiser pass per LoRA per step; the guided mean of their predictions"),
    Method("cmlora", cmlora, "cached Composite (CMLoRA): LoRAs by high-frequency amplitude, the dominant one "
                             "every step, the others' passes reused for --cache-interval steps (0: Composite)"),
)}


def get(name: str) -> Method:
    if name not in METHODS:
        raise LocaloraError(f"unknown method '{name}'; use one of {', '.join(METHODS)}")
    return METHODS[name]


def arrange(method: str, loras: Sequence[Lora], weights: Sequence[float]) -> tuple[tuple[Lora, ...], tuple[float, ...]]:
    """The LoRAs and their weights in the order `method` runs them."""
    idx = get(method).order(loras)
    return tuple(loras[i] for i in idx), tuple(weights[i] for i in idx)


def arrange_blocks(method: str, loras: Sequence[Lora], blocks: Sequence) -> tuple:
    """Per-LoRA block vectors in the order arrange() puts their LoRAs; () when none has one."""
    from localora.diffusion import blocks as blocklib

    return tuple(blocks[i] for i in get(method).order(loras)) if blocklib.any_blocks(blocks) else ()
