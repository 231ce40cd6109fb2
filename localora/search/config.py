"""What a compose run is asked to do, and what it ends with: shared by every search strategy.

    ComposeConfig   the prompt, the LoRAs, the bounds, the rounds and candidates, one Sampling
                    dims: what is searched, one weight per LoRA or (--blocks in,mid,out) one per
                    LoRA and block group ("style.in"); render_args(vector) -> (weights, lbw vectors)
    reference_job   a LoRA alone with its own trigger words (shown to the VLM, scored by the bench)
    Final           the chosen weights and image
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from localora.diffusion.loras import Lora, with_triggers
from localora.diffusion.job import RenderJob
from localora.diffusion.sampling import Sampling
from localora.errors import LocaloraError
from localora.files import file_hash
from localora.profiles import DiffusionSpec


@dataclass(frozen=True)
class ComposeConfig:
    prompt: str
    loras: tuple[Lora, ...]
    iterations: int = 5
    candidates: int = 5
    bounds: tuple[float, float] = (0.0, 1.5)
    sampling: Sampling = Sampling()  # every render of the run shares it (one seed: images differ by weights)
    start: tuple[float | None, ...] | None = None  # None (or a None entry): 1.0, inside the bounds
    method: str = "merge"
    search: str = "vlm"  # a name in localora.search.STRATEGIES
    budget: int | None = None  # candidate renders of a black-box strategy; None: iterations x (candidates + 1)
    final_judge: bool = False  # the VLM's pairwise judge picks among the top 3 (search/final.py)
    fewshot: bool = True
    fewshot_levels: tuple[float, ...] = (0.4, 0.7, 1.0)
    fewshot_budget: int | None = None  # renders for the examples; None: 3 per LoRA (fewshot.PER_LORA)
    fewshot_threshold: float = 0.0
    fewshot_keep: int = 5
    temperature: float | None = None  # None: greedy answers
    feedback_chars: int = 600
    prompts_dir: str | None = None
    # --blocks: the searched block groups (diffusion/blocks.GROUPS), each LoRA's weight becoming one
    # per group; () searches one weight per LoRA. Which blocks a group covers: blocks.from_groups.
    blocks: tuple[str, ...] = ()

    def models(self) -> tuple[str, ...]:
        """The profile's models a run with these settings uses: the VLM only for a search that
        asks it, or for --final-judge."""
        from localora.search import STRATEGIES

        return ("diffusion", "clip", *(("vlm",) if STRATEGIES[self.search].asks_vlm or self.final_judge else ()))

    def check(self, spec: DiffusionSpec | None = None) -> None:
        """Every setting checked, before anything is written: `spec` (the profile's diffusion
        model) also checks the sampling as the renders will resolve it (--guidance nan, --width 65)."""
        from localora.search import STRATEGIES

        if spec is not None:
            self.sampling.resolved(spec)
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise LocaloraError(f"--temperature {self.temperature}: must be a finite number, 0 or more")
        if not math.isfinite(self.fewshot_threshold):
            raise LocaloraError(f"--fewshot-threshold {self.fewshot_threshold}: must be a finite number")

        if self.blocks:
            from localora.diffusion import blocks as blocklib

            blocklib.check_groups(self.blocks)
            if spec is not None and spec.arch not in blocklib.LAYOUTS:
                from localora import archs

                raise LocaloraError(f"--blocks {','.join(self.blocks)}: the {archs.label(spec.arch)} base has no block "
                                    f"layout (LoRA Block Weight defines SD1.5's and SDXL's); drop --blocks to search "
                                    f"one weight per LoRA, or use an SD1.5 or SDXL profile")
        lo, hi = self.bounds
        if len(self.loras) < 2:
            raise LocaloraError(f"compose needs at least 2 LoRAs to combine, got {len(self.loras)}; "
                                f"for one LoRA use `localora generate`")
        if self.iterations < 1 or self.candidates < 1:
            raise LocaloraError("--iterations and --candidates must be at least 1")
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise LocaloraError(f"--bounds {lo:g},{hi:g}: need two finite numbers with min <= max")
        if self.start is not None:
            if len(self.start) != len(self.loras):
                raise LocaloraError(f"{len(self.start)} start weights for {len(self.loras)} LoRAs")
            if any(w is not None and not lo <= w <= hi for w in self.start):
                raise LocaloraError(f"start weights (NAME:WEIGHT) must lie within the bounds {lo:g}..{hi:g}")
        twice = [x for x in self.loras if [y.name for y in self.loras].count(x.name) > 1]
        if twice:
            raise LocaloraError(f"two LoRAs are named '{twice[0].name}' ({', '.join(str(x.path) for x in twice)}); "
                                f"give each LoRA once, under names of its own")
        if self.fewshot and self.search == "vlm":  # only the vlm loop renders the few-shot grid
            outside = [w for w in self.fewshot_levels if not (math.isfinite(w) and lo <= w <= hi)]
            if not self.fewshot_levels or outside:
                levels = ",".join(f"{w:g}" for w in self.fewshot_levels)
                raise LocaloraError(f"--fewshot-levels {levels}: each level must be a finite number within the "
                                    f"bounds {lo:g}..{hi:g}; give levels within them (or --no-fewshot)")
        if self.fewshot and self.fewshot_budget is not None and self.fewshot_budget < len(self.fewshot_levels):
            raise LocaloraError(f"--fewshot-budget {self.fewshot_budget} is too small to show each of the "
                                f"{len(self.fewshot_levels)} --fewshot-levels once; give at least {len(self.fewshot_levels)}")
        if self.budget is not None and not STRATEGIES.get(self.search, STRATEGIES["vlm"]).budgeted:
            raise LocaloraError(f"--budget applies to --search {', '.join(n for n, s in STRATEGIES.items() if s.budgeted)}; "
                                f"the {self.search} loop renders --iterations x (--candidates + 1)")
        if self.search not in STRATEGIES:
            raise LocaloraError(f"unknown search strategy '{self.search}'; use one of {', '.join(STRATEGIES)}")
        STRATEGIES[self.search].check(self)

    @property
    def seed(self) -> int:
        return self.sampling.seed

    @property
    def names(self) -> list[str]:
        return [lo.name for lo in self.loras]

    @property
    def dims(self) -> list[str]:
        """The searched vector's labels, in order: the LoRA names, or with --blocks NAME.GROUP for
        each LoRA then each group ("style.in", "style.mid", ...): what the VLM's answers, the events
        and final.json key the weights by."""
        if not self.blocks:
            return self.names
        return [f"{n}.{g}" for n in self.names for g in self.blocks]

    @property
    def start_weights(self) -> tuple[float, ...]:
        lo, hi = self.bounds
        default = min(max(1.0, lo), hi)
        per_lora = [default if w is None else w for w in (self.start or [None] * len(self.loras))]
        return tuple(w for w in per_lora for _ in (self.blocks or (None,)))

    def render_args(self, vector: Sequence[float], arch: str) -> tuple[tuple[float, ...], tuple]:
        """A searched vector -> the render's (weights, per-LoRA lbw vectors): itself and () without
        --blocks, else each LoRA at weight 1 with its groups' values spread over its blocks."""
        if not self.blocks:
            return tuple(float(w) for w in vector), ()
        from localora.diffusion import blocks as blocklib

        g = len(self.blocks)
        pairs = [blocklib.from_groups(vector[i * g:(i + 1) * g], self.blocks, arch) for i in range(len(self.loras))]
        return tuple(w for w, _ in pairs), tuple(b for _, b in pairs)

    def settings(self) -> dict[str, Any]:
        """What run.json stores: enough to resume, and to tell what ran."""
        d = asdict(self)
        d["loras"] = [{"name": lo.name, "path": str(lo.path), "category": lo.category, "triggers": lo.triggers,
                       "references": [str(r) for r in lo.references], "sha256": file_hash(lo.path)}
                      for lo in self.loras]
        return d

    @classmethod
    def from_settings(cls, d: dict[str, Any]) -> ComposeConfig:
        d = dict(d)
        d["loras"] = tuple(Lora(x["name"], Path(x["path"]), x["category"], x["triggers"],
                                tuple(Path(r) for r in x.get("references", []))) for x in d["loras"])
        for key in ("bounds", "start", "fewshot_levels", "blocks"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        # run.json of localora 0.1 kept the sampling fields at the top level.
        d["sampling"] = Sampling.from_dict(d.get("sampling") or d)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def reference_job(base_prompt: str, lora: Lora, sampling: Sampling, method: str = "merge") -> RenderJob:
    """A LoRA alone at weight 1.0, with only its own trigger words: what its element looks like.

    The loop shows these to the VLM and the bench scores CLIP-I against them; both build them
    here so the render cache serves one to the other.
    """
    return RenderJob(prompt=with_triggers(base_prompt, [lora]), loras=(lora,), weights=(1.0,), method=method,
                     sampling=sampling)


@dataclass(frozen=True)
class Final:
    weights: dict[str, float]
    iteration: int
    image: str  # relative to the run folder
