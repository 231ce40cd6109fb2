"""How an image is sampled, apart from its prompt, LoRAs and weights: one type from the CLI to the UNet.

    Sampling(seed=3)                      unset fields (None) take the profile's defaults
    Sampling(seed=3).resolved(spec)       every field filled in from the DiffusionSpec, and checked

The CLI builds one (cli/options.py), a compose run keeps one for all its renders, a RenderJob
carries one, and the methods read the resolved one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from localora import archs
from localora.errors import LocaloraError
from localora.profiles import DiffusionSpec


@dataclass(frozen=True)
class Sampling:
    seed: int = 0
    negative_prompt: str | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    switch_every: int = 5  # LoRA Switch: denoising steps per LoRA turn (other methods ignore it)
    max_sequence_length: int | None = None  # text tokens (T5 / Qwen3 encoders); the profile's
    cache_interval: int = 2  # CMLoRA: steps between refreshes of the non-dominant LoRAs' passes (0: Composite)

    def resolved(self, spec: DiffusionSpec) -> Sampling:
        """Every unset field from the profile's diffusion spec, then checked."""
        s = replace(
            self,
            negative_prompt=spec.negative_prompt if self.negative_prompt is None else self.negative_prompt,
            steps=spec.steps if self.steps is None else self.steps,
            guidance=spec.guidance if self.guidance is None else self.guidance,
            width=spec.width if self.width is None else self.width,
            height=spec.height if self.height is None else self.height,
            max_sequence_length=spec.max_sequence_length if self.max_sequence_length is None else self.max_sequence_length,
        )
        base = archs.arch(spec.arch)
        m = base.size_multiple
        if s.width % m or s.height % m or s.width < m or s.height < m:
            raise LocaloraError(f"size {s.width}x{s.height}: width and height must be positive multiples of {m} "
                                f"for {base.label}")
        if s.negative_prompt and not base.negative_prompt:
            raise LocaloraError(f"--negative: {base.label} has no unconditional pass, so a negative prompt would "
                                f"change nothing; leave it out")
        if s.steps < 1 or s.switch_every < 1:
            raise LocaloraError("--steps and --switch-every must be at least 1")
        if s.cache_interval < 0:
            raise LocaloraError(f"--cache-interval {s.cache_interval}: must be 0 (plain Composite) or more")
        if not math.isfinite(s.guidance):
            raise LocaloraError(f"--guidance {s.guidance}: must be a finite number")
        return s

    def describe(self, method: str) -> dict[str, Any]:
        """The fields that decide the pixels of a render by `method` (switch_every only for Switch
        and CMLoRA, whose dominant LoRA rotates at that rate; cache_interval only for CMLoRA)."""
        d = asdict(self)
        if method not in ("switch", "cmlora"):
            d.pop("switch_every")
        if method != "cmlora":
            d.pop("cache_interval")
        if d["max_sequence_length"] is None:  # UNet bases: absent, so their cache keys are unchanged
            d.pop("max_sequence_length")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sampling:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
