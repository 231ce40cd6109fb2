"""Out of accelerator memory, handled once per run: what fits is learned at the first
out-of-memory error and kept for the rest of the run (and recorded in run.json).

    policy = OutOfMemory()                      one per renderer, so one per run (or batch of runs)
    policy.composite_per_pass(k)                Composite: LoRAs per UNet batch, k until one OOMed
    policy.shrink_composite(per_pass, error)    at an OOM: half as many, kept from now on (or re-raise)
    policy.merge_batch(default)                 Merge: images per UNet batch, likewise
    policy.activations[(w, h)]                  working memory per image, measured at the first render
    policy.shrink_merge(size, error)
    policy.fall_back(error, steps)              a single render: the first step that helps (VAE
                                                tiling and slicing, then the other models off the
                                                card), or one error line when none is left
    policy.learned()                            what run.json's "memory" records

Without it, every Composite render ran out of memory once and halved its batch again, and a single
render that ran out failed the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from localora.errors import RuntimeFailure

log = logging.getLogger(__name__)
SPLITS = {"composite_loras": "LoRAs per Composite UNet batch", "merge_images": "images per Merge batch"}


def is_out_of_memory(error: BaseException) -> bool:
    import torch  # here, not at the top: commands without a model never import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


@dataclass
class OutOfMemory:
    composite_loras: int | None = None  # LoRAs per Composite UNet batch that fit (None: all so far)
    merge_images: int | None = None  # images per Merge batch that fit (None: no limit learned)
    fallbacks: list[str] = field(default_factory=list)  # single-render fallbacks taken, in order
    retries: int = 0  # out-of-memory errors met (each one is retried once, smaller)
    # Peak working memory per image in bytes, by (width, height), measured on the first render at
    # that size: Merge batches are sized from it (diffusion/render.py).
    activations: dict[tuple[int, int], int] = field(default_factory=dict)
    on_learn: Callable[[dict[str, Any]], None] | None = None  # told each time something is learned

    def composite_per_pass(self, k: int) -> int:
        return min(k, self.composite_loras or k)

    def shrink_composite(self, per_pass: int, error: BaseException) -> int:
        """LoRAs per pass after `error` at `per_pass`; re-raises anything else, or at one LoRA."""
        return self._halve("composite_loras", per_pass, error)

    def merge_batch(self, default: int) -> int:
        return min(default, self.merge_images or default)

    def shrink_merge(self, size: int, error: BaseException) -> int:
        """Images per Merge batch after `error` at `size`; re-raises anything else, or at one image."""
        return self._halve("merge_images", size, error)

    def _halve(self, what: str, size: int, error: BaseException) -> int:
        if not is_out_of_memory(error) or size == 1:
            raise error
        setattr(self, what, size // 2)
        log.warning("out of accelerator memory with %d %s; going on with %d for the rest of the run", size,
                    SPLITS[what], size // 2)
        self.retries += 1
        self._told()
        return size // 2

    def fall_back(self, error: BaseException, steps: Sequence[tuple[str, Callable[[], bool]]]) -> None:
        """After `error` in a single render: take the first of `steps` (name, do-it -> whether it
        changed anything) that helps, so the caller retries; re-raise anything but an OOM, and
        give one error line when no step is left."""
        if not is_out_of_memory(error):
            raise error
        for name, step in steps:
            if step():
                self.fallbacks.append(name)
                log.warning("render: out of accelerator memory; retrying with %s", name)
                self.retries += 1
                self._told()
                return
        tried = ", ".join(dict.fromkeys(self.fallbacks)) or "nothing left to try"
        raise RuntimeFailure(f"out of accelerator memory in a single render after {tried}; lower --width/--height "
                             f"or use a smaller profile (`localora doctor --vram GB` shows what fits)") from error

    def learned(self) -> dict[str, Any]:
        return {"composite_loras": self.composite_loras, "merge_images": self.merge_images,
                "fallbacks": list(self.fallbacks), "retries": self.retries}

    def resume(self, recorded: dict[str, Any] | None) -> None:
        """Start from what an earlier part of the run learned (run.json), so a resumed run does not
        run out of memory again to learn it."""
        if recorded:
            self.composite_loras = recorded.get("composite_loras") or self.composite_loras
            self.merge_images = recorded.get("merge_images") or self.merge_images

    def _told(self) -> None:
        if self.on_learn is not None:
            self.on_learn(self.learned())
