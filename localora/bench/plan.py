"""What a bench runs: its settings, checked, and the list of cases, before any model loads.

    BenchConfig   the command's options (testbed, methods, sizes, seeds, judge and loop settings)
    plan(cfg)     -> Plan: the testbed, the profile, the LoRA files and every (set, seed) case
    Plan.settings what makes rows comparable; a bench folder refuses other settings

The methods are the registry's baselines (localora.diffusion.methods.METHODS) plus the searches:
"reflect", the loop with the VLM (localora.search.STRATEGIES["vlm"]), and "random", "cmaes" and
"hybrid", which spend the same number of renders, N (M + 1), on a CLIP objective. The default
run is the paper's: the baselines and reflect. Ablations are method variants (bench/variants.py:
switch-every-N, reflect-nofewshot, METHOD-drop-CATEGORY), each a method of its own in the folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from localora.bench import testbeds, variants
from localora.bench.testbeds import CATEGORIES, Testbed, TestbedLora
from localora.bench.variants import Variant
from localora.diffusion import methods
from localora.diffusion.loras import Lora
from localora import profiles
from localora.diffusion.sampling import Sampling
from localora.errors import LocaloraError
from localora.files import file_hash
from localora.profiles import Catalog, Profile, VLMSpec, load_catalog
from localora.scoring.judge import REPEAT_TEMPERATURE

BASELINES = tuple(methods.METHODS)  # merge, switch, composite: every LoRA at the testbed's scale
REFLECT = "reflect"  # the search loop; its strategy in localora.search.STRATEGIES
SEARCH_STRATEGY = {REFLECT: "vlm", "random": "random", "cmaes": "cmaes", "hybrid": "hybrid"}
METHODS = (*BASELINES, *SEARCH_STRATEGY)
# cmlora is run when named (--methods ...,cmlora): the default bench stays the papers' baselines.
DEFAULT_METHODS = (*(m for m in BASELINES if m != "cmlora"), REFLECT)
ALL = "all"  # --judge-baseline all: judge every pair of methods
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
    baseline: str = "merge"  # every other method is judged against it; ALL: every pair of methods
    lora_dir: str | None = None
    repeats: int = 1
    judge_temperature: float | None = None  # None: greedy for one repeat, judge.REPEAT_TEMPERATURE for more
    iterations: int = 5
    candidates: int = 5
    profile: str | None = None  # None: the testbed's
    switch_every: tuple[int, ...] = ()  # ablation: Switch at each of these intervals, as variants
    cache_interval: int | None = None  # --cache-interval: CMLoRA's refresh interval; None: Sampling's default
    drop_triggers: str | None = None  # ablation: each method without this category's trigger words
    no_fewshot: bool = False  # ablation: reflect without few-shot examples, beside reflect
    reference_seeds: tuple[int, ...] = DEFAULT_REFERENCE_SEEDS  # CLIP-I references, never a search seed
    vlm: str | None = None  # --vlm: a [vlm.NAME] instead of the profile's VLM (the searches' and the judge's)
    judges: tuple[str, ...] = ()  # --judges: VLMs that each judge every pair (the first one's scores fill `pairs`)
    compiled: bool = False  # --compile: torch.compile the denoiser; same images, so not in settings()

    def temperature(self) -> float | None:
        """The judge's sampling temperature; None is greedy (one repeat, or 0 asked for)."""
        if self.judge_temperature is not None:
            return self.judge_temperature or None
        return REPEAT_TEMPERATURE if self.repeats > 1 else None

    def variants(self) -> tuple[str, ...]:
        """--methods with the ablation options' variants, each after its base method."""
        return variants.expand(self.methods, self.switch_every, self.drop_triggers, self.no_fewshot)

    def check(self) -> None:
        if not self.methods:
            raise LocaloraError(f"--methods: name at least one of {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise LocaloraError(f"--methods {','.join(self.methods)} names a method twice")
        for name in self.methods:
            variants.parse(name, METHODS, tuple(SEARCH_STRATEGY), CATEGORIES)
        if self.no_fewshot and REFLECT not in self.methods:
            raise LocaloraError("--no-fewshot adds reflect-nofewshot beside reflect, and --methods has no reflect; "
                                "add reflect, or name reflect-nofewshot in --methods")
        if any(n < 1 for n in self.switch_every):
            raise LocaloraError(f"--switch-every {','.join(map(str, self.switch_every))}: every interval must be at least 1")
        if self.baseline != ALL and self.baseline not in self.variants():
            raise LocaloraError(f"--judge-baseline {self.baseline} must be one of --methods ({', '.join(self.methods)}) "
                                f"or {ALL}")
        if self.limit is not None and self.limit < 1:
            raise LocaloraError(f"--limit must be at least 1, got {self.limit}")
        if self.repeats < 1:
            raise LocaloraError(f"--repeats {self.repeats}: give at least 1 (each repeat asks the judge both orders)")
        if self.judge_temperature is not None and self.judge_temperature < 0:
            raise LocaloraError(f"--judge-temperature {self.judge_temperature:g}: give 0 (greedy) or more")
        if min(self.iterations, self.candidates) < 1:
            raise LocaloraError("--iterations and --candidates must be at least 1")
        if len(set(self.judges)) != len(self.judges):
            raise LocaloraError(f"--judges {','.join(self.judges)} names a VLM twice")
        if not self.reference_seeds or len(set(self.reference_seeds)) != len(self.reference_seeds):
            raise LocaloraError("--reference-seeds: give one or more distinct seeds")
        shared = sorted(set(self.seeds or ()) & set(self.reference_seeds))
        if shared:
            raise LocaloraError(f"--seeds {','.join(map(str, shared))} also render the CLIP-I references "
                                f"(--reference-seeds {','.join(map(str, self.reference_seeds))}); pick other seeds")
        searches = [m for m in self.methods if variants.parse(m, METHODS, tuple(SEARCH_STRATEGY), CATEGORIES).base
                    in SEARCH_STRATEGY]
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
    variants: dict[str, Variant]  # every method to run, by name, with its ablations
    judges: tuple[VLMSpec, ...] = ()  # the VLMs that judge every pair; () is the profile's VLM alone

    def judge_specs(self) -> tuple[VLMSpec, ...]:
        return self.judges or (self.profile.vlm,)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self.variants)

    def methods_for(self, case: Case) -> list[str]:
        """The methods that render a case (a -drop-CATEGORY variant only where it changes the prompt)."""
        categories = [x.category for x in case.combo]
        return [m for m, v in self.variants.items() if v.applies(categories)]

    def pairs_for(self, case: Case) -> list[tuple[str, str]]:
        """(method, baseline) pairs the judge compares on a case: each method against the
        baseline, or with --judge-baseline all every pair, the later method as A."""
        ms = self.methods_for(case)
        if self.cfg.baseline == ALL:
            return [(a, b) for i, b in enumerate(ms) for a in ms[i + 1:]]
        return [(m, self.cfg.baseline) for m in ms if m != self.cfg.baseline]

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
            "fewshot_threshold": self.profile.clip.fewshot_threshold,
            "reference_seeds": list(c.reference_seeds),
            # Only when it is not the default, so folders made before the option keep their settings.
            **({"cache_interval": c.cache_interval}
               if c.cache_interval not in (None, Sampling().cache_interval) else {}),
            # Only with --judges, so folders made before it keep their settings.
            **({"judges": [asdict(j) for j in self.judges]} if self.judges else {}),
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
    catalog = load_catalog()
    profile = catalog.get(cfg.profile or bed.profile, cfg.vlm)
    judges = tuple(_judge(catalog, n) for n in cfg.judges)
    if cfg.drop_triggers is not None and cfg.drop_triggers not in bed.categories():
        raise LocaloraError(variants.unknown_category(cfg.drop_triggers, bed.categories()))
    found = {n: variants.parse(n, METHODS, tuple(SEARCH_STRATEGY), bed.categories()) for n in cfg.variants()}
    steps = profile.diffusion.steps
    for v in found.values():
        if v.switch_every is not None and v.switch_every > steps:
            raise LocaloraError(f"--switch-every {v.switch_every} is larger than the {steps} denoising steps of profile "
                                f"{profile.name}: Switch would never rotate; give intervals up to {steps}")
    lora_dir = cfg.lora_dir
    if lora_dir is None and (bed.lora_dir or "").startswith("tiny:loras-") and profiles.is_tiny(profile.diffusion.source):
        # a tiny testbed on another tiny base (tiny-flux, tiny-zimage): that base's demo LoRAs, same names
        from localora import tiny

        lora_dir = tiny.ensure(f"loras-{profile.diffusion.arch}")
    loras = bed.resolve(lora_dir)
    return Plan(cfg, bed, profile, loras, tuple(Case(combo, s) for combo in sets for s in seeds), found, judges)


def _judge(catalog: Catalog, name: str) -> VLMSpec:
    if name not in catalog.vlms:
        raise LocaloraError(f"--judges {name}: no [vlm.{name}] in {catalog.path}; known VLMs: "
                            f"{', '.join(sorted(catalog.vlms))}")
    return catalog.vlms[name]
