"""What to render, as a plain value: defined apart from the renderer, which imports torch, so that
commands check their arguments and build jobs before any heavy library loads.

    diffusion/job.py      RenderJob (prompt, LoRAs, weights, method, sampling, block weights)
    diffusion/render.py   the renderer and its cache, which take RenderJobs
"""

from __future__ import annotations

from dataclasses import dataclass

from localora.diffusion.loras import Lora
from localora.diffusion.sampling import Sampling


@dataclass(frozen=True)
class RenderJob:
    """One image to render. Unset sampling settings come from the profile."""

    prompt: str
    loras: tuple[Lora, ...]
    weights: tuple[float, ...]
    method: str = "merge"
    sampling: Sampling = Sampling()
    # Per LoRA, its LoRA Block Weight vector (multipliers of its weight per block, diffusion/blocks.py)
    # or None; () when no LoRA has one, so the job and its cache key are what they were before.
    blocks: tuple[tuple[float, ...] | None, ...] = ()
