"""What a bench runs: its settings, checked, and the list of cases, before any model loads.

    BenchConfig   the command's options (testbed, methods, sizes, seeds, judge and loop settings)
    plan(cfg)     -> Plan: the testbed, the profile, the LoRA files and every (set, seed) case
    Plan.settings what makes rows comparable; a bench folder refuses other settings

The methods are the registry's baselines (localora.diffusion.methods.METHODS) plus the searches:
"reflect", the loop with the VLM (localora.search.STRATEGIES["vlm"]), and "random", "cmaes" and
"hybrid", which spend the same number of renders, N (M + 1), on a CLIP objective. The default
run is the paper's: the baselines and reflect.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from localora.bench import testbeds
from localora.bench.testbeds import Testbed, TestbedLora
from localora.diffusion import methods
from localora.diffusion.loras import Lora
from localora.errors import LocaloraError
from localora.files import file_hash
from localora.profiles import Profile, load_profile
from localora.scoring.judge import REPEAT_TEMPERATURE

BASELINES = tuple(methods.METHODS)  # merge, switch, composite: every LoRA at the testbed's scale
REFLECT = "reflect"  # the search loop; its strategy in localora.search.STRATEGIES
SEARCH_STRATEGY = {REFLECT: "vlm", "random": "random", "cmaes": "cmaes", "hybrid": "hybrid"}
METHODS = (*BASELINES, *SEARCH_STRATEGY)
DEFAULT_METHODS = (*BASELINES, REFLECT)
# CLIP-I references are each LoRA alone rendered at these seeds. Every search renders at the
# case's seed and looks at the single-LoRA render of that seed, so scoring against it would score
# the search against what it tuned on; these seeds are far from any seed a user picks, and a
# bench whose --seeds meet them is refused.
DEFAULT_REFERENCE_SEEDS = (900001, 900002, 900003)


@dataclass(frozen=True)
class BenchConfig:
    testbed: str  # a shipped testbed's name or a .toml path
    out: Path
    methods: tuple[str, ...] = DEFAULT_METHODS
    elements: int = 3
    limit: int | None = None  # the first K composition sets
    seeds: tuple[int, ...] | None = None  # None: the testbed's
    baseline: str = "merge"  # every other method is judged against it
    lora_dir: str | None = None
    repeats: int = 1
    judge_temperature: float | None = None  # None: greedy for one repeat, judge.REPEAT_TEMPERATURE for more
    iterations: int = 5
    candidates: int = 5
    fewshot: bool = True
    profile: str | None = None  # None: the testbed's
    reference_seeds: tuple[int, ...] = DEFAULT_REFERENCE_SEEDS  # CLIP-I references, never a search seed

    def temperature(self) -> float | None:
        """The judge's sampling temperature; None is greedy (one repeat, or 0 asked for)."""
        if self.judge_temperature is not None:
            return self.judge_temperature or None
        return REPEAT_TEMPERATURE if self.repeats > 1 else None

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise LocaloraError(f"unknown method(s) {', '.join(unknown) or '(none)'} in --methods; "
                                f"use some of {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise LocaloraError(f"--methods {','.join(self.methods)} names a method twice")
        if self.baseline not in self.methods:
            raise LocaloraError(f"--judge-baseline {self.baseline} must be one of --methods ({', '.join(self.methods)})")
        if self.limit is not None and self.limit < 1:
            raise LocaloraError(f"--limit must be at least 1, got {self.limit}")
        if self.repeats < 1:
            raise LocaloraError(f"--repeats {self.repeats}: give at least 1 (each repeat asks the judge both orders)")
        if self.judge_temperature is not None and self.judge_temperature < 0:
            raise LocaloraError(f"--judge-temperature {self.judge_temperature:g}: give 0 (greedy) or more")
        if min(self.iterations, self.candidates) < 1:
            raise LocaloraError("--iterations and --candidates must be at least 1")
        if not self.reference_seeds or len(set(self.reference_seeds)) != len(self.reference_seeds):
            raise LocaloraError("--reference-seeds: give one or more distinct seeds")
        shared = sorted(set(self.seeds or ()) & set(self.reference_seeds))
        if shared:
            raise LocaloraError(f"--seeds {','.join(map(str, shared))} also render the CLIP-I references "
                                f"(--reference-seeds {','.join(map(str, self.reference_seeds))}); pick other seeds")
        searches = [m for m in self.methods if m in SEARCH_STRATEGY]
        if searches and self.elements < 2:
            raise LocaloraError(f"{', '.join(searches)} combine at least 2 LoRAs; --elements {self.elements} is too "
                                f"few for them")


def run_folder(out: Path, set_id: str, seed: int, method: str) -> Path:
    """Where a search method keeps its run of a case (reflect's name predates the others)."""
    return out / "runs" / (f"{set_id}-s{seed}" + ("" if method == REFLECT else f"-{method}"))


@dataclass(frozen=True)
class Case:
    """One composition set under one seed: every method renders it."""

    combo: tuple[TestbedLora, ...]
    seed: int

    @property
    def set_id(self) -> str:
        return testbeds.set_id(self.combo)


@dataclass(frozen=True)
class Plan:
    cfg: BenchConfig
    testbed: Testbed
    profile: Profile
    loras: dict[str, Lora]  # testbed id -> Lora (its name is the id)
    cases: tuple[Case, ...]

    def settings(self) -> dict[str, Any]:
        """What makes rows comparable; a folder refuses a bench whose settings differ."""
        c = self.cfg
        return {
            "testbed": self.testbed.name, "testbed_sha256": file_hash(self.testbed.path),
            "lora_scale": self.testbed.lora_scale, "profile": self.profile.name,
            "models": {k: asdict(getattr(self.profile, k)) for k in ("diffusion", "vlm", "clip")},
            "loras": {i: file_hash(lo.path) for i, lo in self.loras.items()},
            "references": {i: [file_hash(r) for r in lo.references] for i, lo in self.loras.items()},
            "baseline": c.baseline, "repeats": c.repeats, "judge_temperature": c.temperature(), "iterations": c.iterations, "candidates": c.candidates,
            "fewshot": c.fewshot, "fewshot_threshold": self.profile.clip.fewshot_threshold,
            "reference_seeds": list(c.reference_seeds),
        }


def plan(cfg: BenchConfig) -> Plan:
    """Check every input and list the cases, before any model loads."""
    cfg.check()
    bed = testbeds.load(cfg.testbed)
    sets = bed.composition_sets(cfg.elements)[: cfg.limit]
    seeds = cfg.seeds if cfg.seeds is not None else bed.seeds
    shared = sorted(set(seeds) & set(cfg.reference_seeds))
    if shared:
        raise LocaloraError(f"testbed {bed.name}: seed(s) {','.join(map(str, shared))} also render the CLIP-I "
                            f"references; pass other --seeds or --reference-seeds")
    profile = load_profile(cfg.profile or bed.profile)
    loras = bed.resolve(cfg.lora_dir)
    return Plan(cfg, bed, profile, loras, tuple(Case(combo, s) for combo in sets for s in seeds))
