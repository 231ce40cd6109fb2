"""Cached Multi-LoRA Composition (CMLoRA, Zou et al., ICLR 2025, arXiv 2502.04923), restated from
the paper on localora's denoiser seam; `--method cmlora --cache-interval C`.

    order      the LoRAs by the high-frequency amplitude of their single renders, highest first
               (each LoRA alone, Merge at its weight, the job's prompt and settings; remembered per
               LoRA file content and settings, so a second render does not draw them again)
    step i     dominant d = order[(i // switch_every) % k]
               i % C == 0: a pass for every LoRA (refresh)        else: a pass for d only, the others'
                                                                       last predictions reused
               eps = guide( sum_j a_j pred_j / k ),  a_d = k c_n / (c_n + k - 1), the others k / (c_n + k - 1)
               c_n = k - 1/2 - sum_{m=1..n} 2^-m after n rotations (the dominant weight decays)
    passes     sum_i (k if i % C == 0 else 1) single-LoRA passes: passes(steps, k, C)

C = 0 is LoRA Composite itself (every LoRA every step, equal weights: methods.composite, bit for bit).

Where this departs from the authors' code (Yqcca/CMLoRA, LoRA_Cache/pipelines/stable_diffusion/
pipeline_async.py): (1) their cache reuses a UNet block's features (DeepCache-style, cache_block_id 1)
inside every LoRA's pass; this reuses whole predictions of the non-dominant LoRAs, which is what
saves passes on any base; (2) their frequency order was measured offline and written into the code
as a category order (check_anime_lora); this measures it from the renders; (3) their dominant index
starts at the last LoRA ((0 - 1) % k) and rotates every 20 of 200 steps, and their decayed coefficient
is computed but never fed back into the weights; here the highest-frequency LoRA leads, the rotation
is --switch-every steps, and the decay applies, as the paper describes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from localora.diffusion.sampling import Sampling

# (adapter = LoRA file content, weight, block vector, model, prompt, settings) -> amplitude
_AMPLITUDES: dict[tuple, float] = {}
LOW_RADIUS_AT_512 = 72  # the authors' analysis: the mean relative log amplitude above radius 72 of 512


def high_frequency_amplitude(image: Image.Image) -> float:
    """Mean relative log amplitude of the image's high frequencies: grey image, centred 2-D FFT,
    log |F|, averaged per integer radius, divided by the profile's maximum, then averaged over the
    radii from 72/512 of the side up (the paper's frequency analysis)."""
    grey = np.asarray(image.convert("RGB"), dtype=np.float64).mean(axis=2).astype(np.uint8)
    spectrum = np.log(np.abs(np.fft.fftshift(np.fft.fft2(grey))) + 1e-8)
    rows, cols = spectrum.shape
    y, x = np.indices(spectrum.shape)
    radius = np.sqrt((x - cols // 2) ** 2 + (y - rows // 2) ** 2).astype(int).ravel()
    profile = np.bincount(radius, spectrum.ravel()) / np.maximum(np.bincount(radius), 1)
    profile = profile / profile.max()
    low = int(round(LOW_RADIUS_AT_512 * min(rows, cols) / 512))
    return float(profile[low:].mean())


def frequency_order(pipe, adapters: list[str], weights: list[float], prompt: str, s: Sampling,
                    blocks: Sequence | None = None) -> list[int]:
    """Indices of the LoRAs, highest high-frequency amplitude first (ties: the given order)."""
    from localora.diffusion import methods

    blocks = list(blocks) if blocks else [None] * len(adapters)
    model = getattr(pipe, "name_or_path", "") or type(pipe).__name__
    settings = tuple(sorted(s.describe("merge").items()))
    amps = []
    for name, w, b in zip(adapters, weights, blocks):
        key = (name, float(w), None if b is None else tuple(b), model, prompt, settings)
        if key not in _AMPLITUDES:
            alone = methods.merge(pipe, [name], [w], prompt, s, blocks=None if b is None else [b])
            _AMPLITUDES[key] = high_frequency_amplitude(methods.decode(pipe, alone))
        amps.append(_AMPLITUDES[key])
    return sorted(range(len(adapters)), key=lambda i: (-amps[i], i))


def dominant(step: int, k: int, every: int) -> int:
    """Position (in frequency order) of the dominant LoRA at `step`."""
    return (step // every) % k


def mix_weights(step: int, k: int, every: int) -> list[float]:
    """a_j per position: the dominant's k c_n / (c_n + k - 1), the others' k / (c_n + k - 1); they sum to k."""
    n = step // every
    c = k - 0.5 - sum(0.5 ** m for m in range(1, n + 1))
    other = k / (c + k - 1)
    d = dominant(step, k, every)
    return [other * c if j == d else other for j in range(k)]


def refreshes(step: int, interval: int) -> bool:
    return step % interval == 0


def passes(steps: int, k: int, interval: int) -> int:
    """Single-LoRA denoiser passes of a render: what the schedule says."""
    if interval == 0:
        return steps * k
    return sum(k if refreshes(i, interval) else 1 for i in range(steps))


def cmlora(pipe, adapters: list[str], weights: list[float], prompt: str, s: Sampling, on_step=None,
           blocks=None) -> torch.Tensor:
    import torch

    from localora.diffusion import blocks as blocklib
    from localora.diffusion import denoisers, methods
    from localora.diffusion.pipeline import set_weights
    from localora.diffusion.rows import one_hot_rows, row_weights

    if s.cache_interval == 0:
        return methods.composite(pipe, adapters, weights, prompt, s, on_step, blocks=blocks)
    blocks = list(blocks) if blocklib.any_blocks(blocks) else None
    order = frequency_order(pipe, adapters, weights, prompt, s, blocks)
    adapters = [adapters[i] for i in order]
    weights = [weights[i] for i in order]
    blocks = [blocks[i] for i in order] if blocks else None
    arch = methods.arch_of(pipe)
    fam = denoisers.family_of(arch)
    net = denoisers.denoiser(pipe, arch)
    k = len(adapters)
    with torch.no_grad():
        set_weights(pipe, adapters, weights, blocks)
        cond = fam.encode(pipe, prompt, s, fam.uses_uncond(s, always=True))
        run = fam.start(pipe, s, cond, s.seed)
        latents = run.latents
        mult = methods.block_multipliers(arch, blocks, k)
        cache: list[torch.Tensor | None] = [None] * k
        with row_weights(net, adapters, methods._block_map(net, arch, blocks)) as rows:
            for i, t in enumerate(run.timesteps):
                d = dominant(i, k, s.switch_every)
                which = list(range(k)) if refreshes(i, s.cache_interval) else [d]
                n = len(which)
                rows.set(one_hot_rows(weights, which, per_row=cond.branches),
                         None if mult is None else mult.unsqueeze(0).expand(n * cond.branches, *mult.shape))
                out = fam.predict(pipe, run, latents, t, cond, n)
                for j, pred in zip(which, out.view(n, cond.branches, *out.shape[1:])):
                    cache[j] = pred
                a = mix_weights(i, k, s.switch_every)
                total = sum(cache[j] * a[j] for j in range(k))
                latents = fam.step(run, fam.guide((total / k).unsqueeze(0), s), t, latents)
                if on_step:
                    on_step(i, s.steps)
        return fam.unpacked(pipe, latents, s)

