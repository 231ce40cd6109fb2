"""The bench runner: every method on a testbed's composition sets, scored and judged.

    run(cfg, progress)      plan -> store -> the work not stored yet -> rows(...) -> store each row
    rows(plan, work, ...)   yields Row("results" | "pairs", values, line) as each is made

For each composition set of one size, each seed and each method, the runner renders the set's
prompt (the baselines merge / switch / composite with every LoRA at the testbed's lora_scale;
`reflect` runs the GPT4LoRA loop), scores CLIP-T against the prompt and CLIP-I against a
reference image per LoRA, then judges every method against the baseline method (or, with
--judge-baseline all, every pair of methods) with the position-debiased pairwise judge, storing
each answer as one outcome; with --judges A,B every judge answers the same questions and each
answer is stored under its judge. CLIP-I references are each LoRA alone at the reference seeds,
which no search renders at, so no method is scored against an image it looked at.

    DIR/bench.sqlite          settings; one row per (set, seed, method); one per judged pair,
                              and one per judge answer (outcomes)
    DIR/images/SET/           sSEED-METHOD.png
    DIR/images/references/    LORA-sSEED.png, the CLIP-I references
    DIR/runs/SET-sSEED/       the reflect loop's run folder

The runner only yields rows; `run` alone writes them, each committed as it arrives, so the store
stays one file with one writer (a distributed runner can produce the same rows elsewhere). A
rerun with the same arguments reads finished rows back and never recomputes them; an unfinished
loop resumes from its run folder.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from localora.bench.plan import SEARCH_STRATEGY, BenchConfig, Case, Plan, plan, run_folder
from localora.bench.store import DB_FILE, Store
from localora.bench.variants import Variant
from localora import profiles
from localora.diffusion import methods
from localora.diffusion.loras import Lora
from localora.files import atomic_write, open_image
from localora.scoring import judge
from localora.vlm import Answer, ChatModel

if TYPE_CHECKING:  # torch-heavy modules, loaded only when a bench has work
    from localora.diffusion.render import Renderer
    from localora.diffusion.sampling import Sampling
    from localora.runs.session import Components
    from localora.scoring.clip import ClipScorer


class Progress(Protocol):
    def start(self, total: int, done: int) -> None: ...
    def working(self, what: str) -> None: ...
    def finished(self, line: str) -> None: ...


@dataclass(frozen=True)
class Row:
    table: str  # "results" or "pairs"
    values: dict[str, Any]
    line: str  # one line for the progress display
    children: tuple[tuple[str, dict[str, Any]], ...] = ()  # committed with it: a pair's outcomes


@dataclass(frozen=True)
class Summary:
    made: int
    skipped: int
    renders: int
    cache_hits: int
    vlm_calls: int
    retried: int = 0  # --ray: tasks given to another worker after theirs died
    compile_seconds: float = 0.0  # --compile: the warm-up, apart from the renders' seconds


@dataclass(frozen=True)
class Work:
    case: Case
    methods: list[str]  # to render and score
    judged: list[tuple[str, str]]  # (method, baseline) pairs to judge


class _CountingVLM:
    """Counts VLM calls, so each row records the calls made for it."""

    def __init__(self, model: ChatModel):
        self.model = model
        self.calls = 0

    def chat(self, *args: Any, **kwargs: Any) -> Answer:
        self.calls += 1
        return self.model.chat(*args, **kwargs)

    def image_tokens(self, pixels: int) -> int:
        return self.model.image_tokens(pixels)


def everything(p: Plan) -> list[Work]:
    """Every row of the plan, as todo() gives them for an empty store."""
    return [Work(c, p.methods_for(c), p.pairs_for(c)) for c in p.cases if p.methods_for(c) or p.pairs_for(c)]


def todo(p: Plan, store: Store) -> list[Work]:
    """The rows of the plan that the store does not hold yet."""
    have = {(r["set_id"], r["seed"], r["method"]) for r in store.results()}
    judged = {(r["set_id"], r["seed"], r["method"], r["baseline"]) for r in store.pairs()}
    work = []
    for c in p.cases:
        run = [m for m in p.methods_for(c) if (c.set_id, c.seed, m) not in have]
        judge_ = [(m, b) for m, b in p.pairs_for(c) if (c.set_id, c.seed, m, b) not in judged]
        if run or judge_:
            work.append(Work(c, run, judge_))
    return work


def counts(p: Plan, work: list[Work]) -> tuple[int, int]:
    """(rows to make, rows already stored) of the plan."""
    total = sum(len(w.methods) + len(w.judged) for w in work)
    return total, sum(len(p.methods_for(c)) + len(p.pairs_for(c)) for c in p.cases) - total


def check_templates(p: Plan, work: list[Work]) -> None:
    """A user's prompt template with a bad field is refused now, not after hours of renders."""
    if any(w.judged for w in work):
        judge.check_templates()
    if any(p.variants[m].base in SEARCH_STRATEGY for w in work for m in w.methods):
        from localora.search.gpt4lora import check_templates as check_loop

        check_loop(None)


def require_models(p: Plan, work: list[Work]) -> None:
    """One line naming the weights the rows to make need that are not here, and how to fetch
    them: the diffusion model and CLIP; the profile's VLM for a search that asks it (or a judged
    pair it judges); each --judges VLM for a judged pair."""
    from localora.search import STRATEGIES

    judged = any(w.judged for w in work)
    asks = any(p.variants[m].base in SEARCH_STRATEGY and STRATEGIES[SEARCH_STRATEGY[p.variants[m].base]].asks_vlm
               for w in work for m in w.methods)
    judges = p.judge_specs() if judged else ()
    profile_vlm = asks or any(j.name == p.profile.vlm.name for j in judges)
    profiles.require(p.profile, ("diffusion", "clip", *(("vlm",) if profile_vlm else ())),
                     judges=tuple(j for j in judges if j.name != p.profile.vlm.name))


def run(cfg: BenchConfig, progress: Progress) -> Summary:
    """Make every row of the bench that is not in its folder yet; the one writer of the store."""
    p = plan(cfg)
    # Weights that are not here: one line naming them and the pull command, before any output, and
    # for a new bench before its folder holds a store (a rerun may then change its settings).
    new = not (cfg.out / DB_FILE).exists()
    if new:
        require_models(p, everything(p))
    store = Store.create_or_open(cfg.out, p.settings())
    work = todo(p, store)
    if work and not new:
        require_models(p, work)
    total, skipped = counts(p, work)
    progress.start(total, skipped)
    if not work:
        return Summary(0, skipped, 0, 0, 0)
    check_templates(p, work)

    from localora.runs import session

    parts = session.components(p.profile, progress, compiled=cfg.compiled)  # model loads, steps and VLM tokens show too
    have = {(r["set_id"], r["seed"], r["method"]): r for r in store.results()}
    calls = 0
    with parts.renderer:  # pending render-cache writes finish (or raise) however the bench ends
        for row in rows(p, work, parts, progress, store.start_session(sys.argv[1:]), have):
            store.add(row.table, row.values, row.children)
            progress.finished(row.line)
            calls += row.values["vlm_calls"]
    stats = parts.renderer.stats
    return Summary(total, skipped, stats.renders, stats.hits, calls, compile_seconds=stats.compile_seconds)


def rows(p: Plan, work: list[Work], parts: Components, progress: Progress, session: int,
         have: dict[tuple[str, int, str], dict[str, Any]]) -> Iterator[Row]:
    """Make the rows of `work` with the components `parts` (renderer, vlm, scorer), in order.

    `have` holds the finished result rows, whose saved images the judge needs; `session` is the
    id every row records. Nothing here writes the store.
    """
    runner = _Runner(p, progress, parts.renderer, _CountingVLM(parts.vlm), parts.scorer, session, have)
    for w in work:
        yield from runner.case(w.case, w.methods, w.judged)


@dataclass
class _Runner:
    plan: Plan
    progress: Progress  # only told what is being worked on; the caller reports finished rows
    renderer: Renderer
    vlm: _CountingVLM
    scorer: ClipScorer
    session: int
    have: dict[tuple[str, int, str], dict[str, Any]]
    _refs: dict[tuple[str, int], tuple[Image.Image, str]] = field(default_factory=dict)  # (LoRA, seed) -> image, path
    _judges: list[tuple[dict[str, Any], _CountingVLM]] | None = None  # (identity, model) per judge, made on first use

    def judges(self) -> list[tuple[dict[str, Any], _CountingVLM]]:
        """Each judge of the plan with who it is (name, source, revision, family) and its model:
        the profile's VLM is the one already loaded, another is loaded beside it, on the same
        device manager, so placement moves it like any other model."""
        if self._judges is None:
            from localora.vlm.model import VLM, identity

            self._judges = []
            for spec in self.plan.judge_specs():
                model = self.vlm if spec == self.plan.profile.vlm else _CountingVLM(
                    VLM(spec, devices=self.vlm.model.devices, name=f"judge {spec.name}"))
                self._judges.append((identity(spec), model))
        return self._judges

    @property
    def out(self) -> Path:
        return self.plan.cfg.out

    def case(self, case: Case, methods: list[str], judged: list[tuple[str, str]]) -> Iterator[Row]:
        images = {}
        for method in methods:
            row, images[method] = self.result(case, method)
            yield row
        for method, base in judged:
            for m in (method, base):
                if m not in images:  # a finished row: its saved image, not a new render
                    images[m] = open_image(self.out / self.have[(case.set_id, case.seed, m)]["image"])
            yield self.pair(case, method, base, images[method], images[base])

    # ------------------------------------------------------------ one row each

    def result(self, case: Case, method: str) -> tuple[Row, Image.Image]:
        self.progress.working(f"{case.set_id} seed {case.seed} {method}")
        start, before = time.perf_counter(), self._work()
        variant = self.plan.variants[method]
        prompt = self._prompt(case, variant)
        source, weights, budget, vlm = (self._search(case, variant) if variant.base in SEARCH_STRATEGY
                                        else (*self._baseline(case, variant), None, None))
        image = open_image(source)
        refs = self._references(case)
        each = {i: float(self.scorer.clip_i(image, [im for _, im, _ in images])) for i, images in refs.items()}
        category = {x.id: x.category for x in case.combo}
        rel = self._save(source, case, method)
        self.renderer.flush()  # every image the row names is on disk (or its write's error raised) before it is stored
        renders, hits, calls = (a - b for a, b in zip(self._work(), before))
        row = {
            "set_id": case.set_id, "elements": len(case.combo), "seed": case.seed, "method": method,
            "loras": json.dumps([x.id for x in case.combo]), "weights": json.dumps(weights), "prompt": prompt,
            # CLIP-T against the set's whole prompt, so a variant without some trigger words is
            # scored on the same text as its base.
            "image": rel, "clip_t": float(self.scorer.clip_t(image, self.plan.testbed.prompt_for(case.combo))),
            "clip_i": sum(each.values()) / len(each), "clip_i_each": json.dumps(each),
            "clip_i_elements": json.dumps({category[i]: v for i, v in each.items()}),
            "clip_i_references": json.dumps({i: [{"seed": seed, "image": rel} for seed, _, rel in images]
                                             for i, images in refs.items()}),
            "renders": renders, "cache_hits": hits, "vlm_calls": calls, "budget": budget,
            "vlm": None if vlm is None else json.dumps(vlm),
            "seconds": round(time.perf_counter() - start, 3), "session": self.session, "finished": time.time(),
        }
        line = (f"{case.set_id} seed {case.seed} {method:<9} CLIP-T {row['clip_t']:.4f} CLIP-I {row['clip_i']:.4f}  "
                f"({renders} renders, {hits} cached, {calls} VLM calls, {row['seconds']:.1f}s)")
        return Row("results", row, line), image

    def pair(self, case: Case, method: str, base: str, image: Image.Image, base_image: Image.Image) -> Row:
        self.progress.working(f"{case.set_id} seed {case.seed} judge {method} vs {base}")
        judges = self.judges()
        models = list({id(m): m for _, m in judges}.values())
        start, calls = time.perf_counter(), sum(m.calls for m in models)
        temperature = self.plan.cfg.temperature()
        # Every judge is asked the same (repeat, order) questions with the same seeds, so their
        # outcomes can be compared one for one (report.md: agreement and Cohen's kappa).
        verdicts = [(who, judge.judge_pair(model, image, base_image, [x.element() for x in case.combo],
                                           repeats=self.plan.cfg.repeats, seed=case.seed,
                                           temperature=temperature or 0.0)) for who, model in judges]
        finished = time.time()
        key = {"set_id": case.set_id, "elements": len(case.combo), "seed": case.seed, "method": method, "baseline": base}
        outcomes = tuple(("outcomes", {
            **key, "repeat": o.repeat, "first": o.first, "judge": who["name"], "temperature": temperature,
            "judge_source": who["source"], "judge_revision": who["revision"],
            **{f"{d}_{side}": scores[d] for d in judge.DIMENSIONS for side, scores in (("a", o.a), ("b", o.b))},
            **o.verdict, "explanation_a": o.explanation_a, "explanation_b": o.explanation_b,
            "session": self.session, "finished": finished}) for who, j in verdicts for o in j.outcomes)
        first, j = verdicts[0]  # the pair row holds the first judge's averaged scores
        row = {
            "set_id": case.set_id, "elements": len(case.combo), "seed": case.seed, "method": method, "baseline": base,
            **{f"{d}_{side}": scores[d] for d in judge.DIMENSIONS for side, scores in (("a", j.scores.a), ("b", j.scores.b))},
            **j.verdict, "answers": json.dumps([asdict(a) for a in j.answers]), "judge": first["name"],
            "vlm_calls": sum(m.calls for m in models) - calls, "seconds": round(time.perf_counter() - start, 3),
            "session": self.session, "finished": finished,
        }
        shown = ", ".join(f"{d} {j.verdict[d]}" for d in judge.DIMENSIONS)
        return Row("pairs", row, f"{case.set_id} seed {case.seed} {method} vs {base}: {shown}  "
                                 f"({row['vlm_calls']} VLM calls, {row['seconds']:.1f}s)", outcomes)

    # ------------------------------------------------------------ images

    def _loras(self, case: Case) -> list[Lora]:
        return [self.plan.loras[x.id] for x in case.combo]

    def _prompt(self, case: Case, variant: Variant) -> str:
        """The set's prompt, without the dropped category's trigger words for a -drop- variant."""
        return self.plan.testbed.prompt_for([x for x in case.combo if x.category != variant.drop])

    def _baseline(self, case: Case, variant: Variant) -> tuple[Path, dict[str, float]]:
        from dataclasses import replace

        from localora.diffusion.render import RenderJob

        scale = self.plan.testbed.lora_scale
        loras, weights = methods.arrange(variant.base, self._loras(case), (scale,) * len(case.combo))
        sampling = self._sampling(case)
        if variant.switch_every is not None:
            sampling = replace(sampling, switch_every=variant.switch_every)
        job = RenderJob(prompt=self._prompt(case, variant), loras=loras, weights=weights,
                        method=variant.base, sampling=sampling)
        return self.renderer.render(job).path, {lo.name: scale for lo in loras}

    def _search(self, case: Case, variant: Variant) -> tuple[Path, dict[str, float], int, dict | None]:
        """The method's search on the case, in its own run folder; the image's file, the weights,
        the number of candidate renders it was given, and the VLM that answered its steps (None
        when none did): as its run.json recorded it, so a search replayed whole from its log on
        a rerun names the VLM that answered then."""
        from localora.runs import session
        from localora.runs.folder import RunFolder
        from localora.search import STRATEGIES
        from localora.search.config import ComposeConfig
        from localora.search.steps import Steps

        from dataclasses import replace

        c, profile = self.plan.cfg, self.plan.profile
        # The base prompt: the loop appends each LoRA's trigger words itself, and renders its
        # single-LoRA references with that LoRA's words only; a -drop- variant's LoRA has none.
        loras = tuple(replace(lo, triggers="") if x.category == variant.drop else lo
                      for x, lo in zip(case.combo, self._loras(case)))
        cfg = ComposeConfig(prompt=self.plan.testbed.prompt, loras=loras,
                            iterations=c.iterations, candidates=c.candidates, sampling=self._sampling(case),
                            search=SEARCH_STRATEGY[variant.base], fewshot=variant.fewshot,
                            fewshot_threshold=profile.clip.fewshot_threshold)
        folder = run_folder(self.out, case.set_id, case.seed, variant.name)
        if (folder / "events.jsonl").is_file():
            run = RunFolder.open(folder)  # resumes: completed steps are replayed from its log
        else:
            shutil.rmtree(folder, ignore_errors=True)  # a folder cut short while being created
            run = session.start(cfg, profile, folder)

        def emit(event: dict[str, Any]) -> None:
            if "id" in event:
                self.progress.working(f"{case.set_id} seed {case.seed} {variant.name} {event['id']}")

        try:
            final = STRATEGIES[cfg.search].run(cfg, Steps(run, self.renderer, self.vlm, self.scorer, emit))
        finally:
            run.close()
        vlm = None
        if any(e.get("type") == "vlm" for e in run.completed.values()):
            vlm = run.settings.get("vlm")
            if vlm is None:  # a folder from before run.json named its VLM
                from localora.vlm.model import identity

                vlm = identity(self.plan.profile.vlm)
        return run.path / final.image, final.weights, c.iterations * (c.candidates + 1), vlm

    def _references(self, case: Case) -> dict[str, list[tuple[int | None, Path | Image.Image, str]]]:
        """Per LoRA of the case: (seed, image, path in the folder) of each CLIP-I reference.

        The testbed's reference images when it names some, else that LoRA alone at weight 1.0
        rendered at each of the reference seeds, which no search renders at: a search looks at
        the single-LoRA render of its own seed, so that one would score what it tuned on. Each
        reference is rendered once per bench command (and cached by the renderer across them).
        """
        from localora.search.config import reference_job
        from localora.diffusion.sampling import Sampling

        out = {}
        for lora in self._loras(case):
            if lora.references:
                out[lora.name] = [(None, r, str(r)) for r in lora.references]
                continue
            out[lora.name] = []
            for seed in self.plan.cfg.reference_seeds:
                if (lora.name, seed) not in self._refs:
                    sampling = Sampling(seed=seed, negative_prompt=self._negative())
                    rendered = self.renderer.render(reference_job(self.plan.testbed.prompt, lora, sampling))
                    rel = f"images/references/{lora.name}-s{seed}.png"
                    # a copy of the cached PNG: its pixels and its metadata, as every bench image
                    atomic_write(self.out / rel, lambda p, src=rendered.path: shutil.copyfile(src, p))
                    self._refs[(lora.name, seed)] = (rendered.image, rel)
                image, rel = self._refs[(lora.name, seed)]
                out[lora.name].append((seed, image, rel))
        return out

    def _sampling(self, case: Case) -> Sampling:
        from localora.diffusion.sampling import Sampling

        interval = self.plan.cfg.cache_interval
        return Sampling(seed=case.seed, negative_prompt=self._negative(),
                        **({"cache_interval": interval} if interval is not None else {}))

    def _negative(self) -> str | None:
        """The testbed's negative prompt, on a base that has an unconditional pass to give it to
        (Flux.1 has none: the testbed's default is left out there, not an error)."""
        from localora import archs

        return self.plan.testbed.negative_prompt if archs.arch(self.plan.profile.diffusion.arch).negative_prompt else None

    def _save(self, source: Path, case: Case, name: str) -> str:
        """A copy of the PNG as rendered (cache or run folder): pixels and metadata, byte for byte."""
        rel = f"images/{case.set_id}/s{case.seed}-{name}.png"
        atomic_write(self.out / rel, lambda p: shutil.copyfile(source, p))
        return rel

    def _work(self) -> tuple[int, int, int]:
        return self.renderer.stats.renders, self.renderer.stats.hits, self.vlm.calls
