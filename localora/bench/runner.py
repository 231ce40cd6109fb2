"""The bench: every method on a testbed's composition sets, scored and judged, into SQLite.

For each composition set of one size, each seed and each method, the bench renders the set's
prompt (the baselines merge / switch / composite with every LoRA at the testbed's lora_scale;
`reflect` runs the GPT4LoRA loop), scores CLIP-T against the prompt and CLIP-I against a
reference image per LoRA, then judges every method against the baseline method with the
position-debiased pairwise judge.

    DIR/bench.sqlite          settings; one row per (set, seed, method); one per judged pair
    DIR/images/SET/           sSEED-METHOD.png, and sSEED-ref-LORA.png for rendered references
    DIR/runs/SET-sSEED/       the reflect loop's run folder

Every row is committed as soon as it is made. A rerun with the same arguments reads finished
rows back and never recomputes them; an unfinished loop resumes from its run folder. Runs with
other sizes, seeds, limits or methods add rows to the same folder; runs whose results would not
be comparable (another testbed, profile, LoRA file, loop or judge setting) are refused.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from localora.scoring import judge
from localora.bench import testbeds
from localora.errors import LocaloraError
from localora.files import open_image
from localora.files import atomic_write, file_hash
from localora.diffusion import methods
from localora.diffusion.loras import Lora
from localora.profiles import Profile, load_profile
from localora.bench.testbeds import Testbed, TestbedLora

METHODS = (*methods.METHODS, "reflect")
DB_FILE = "bench.sqlite"
FORMAT = "localora-bench/1"

# Judge columns are spelled out; they must follow judge.DIMENSIONS.
assert judge.DIMENSIONS == ("composition", "quality")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (id INTEGER PRIMARY KEY, started REAL NOT NULL, argv TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    set_id TEXT NOT NULL, elements INTEGER NOT NULL, seed INTEGER NOT NULL, method TEXT NOT NULL,
    loras TEXT NOT NULL, weights TEXT NOT NULL, prompt TEXT NOT NULL, image TEXT NOT NULL,
    clip_t REAL NOT NULL, clip_i REAL NOT NULL, clip_i_each TEXT NOT NULL,
    renders INTEGER NOT NULL, cache_hits INTEGER NOT NULL, vlm_calls INTEGER NOT NULL,
    seconds REAL NOT NULL, session INTEGER NOT NULL, finished REAL NOT NULL,
    PRIMARY KEY (set_id, seed, method));
CREATE TABLE IF NOT EXISTS pairs (
    set_id TEXT NOT NULL, elements INTEGER NOT NULL, seed INTEGER NOT NULL, method TEXT NOT NULL,
    baseline TEXT NOT NULL,
    composition_a REAL NOT NULL, composition_b REAL NOT NULL, composition TEXT NOT NULL,
    quality_a REAL NOT NULL, quality_b REAL NOT NULL, quality TEXT NOT NULL,
    answers TEXT NOT NULL, vlm_calls INTEGER NOT NULL, seconds REAL NOT NULL,
    session INTEGER NOT NULL, finished REAL NOT NULL,
    PRIMARY KEY (set_id, seed, method, baseline));
"""


# ------------------------------------------------------------------ what to run

@dataclass(frozen=True)
class BenchConfig:
    testbed: str  # a shipped testbed's name or a .toml path
    out: Path
    methods: tuple[str, ...] = METHODS
    elements: int = 3
    limit: int | None = None  # the first K composition sets
    seeds: tuple[int, ...] | None = None  # None: the testbed's
    baseline: str = "merge"  # every other method is judged against it
    lora_dir: str | None = None
    repeats: int = 1
    iterations: int = 5
    candidates: int = 5
    fewshot: bool = True
    profile: str | None = None  # None: the testbed's

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
        if min(self.repeats, self.iterations, self.candidates) < 1:
            raise LocaloraError("--repeats, --iterations and --candidates must be at least 1")
        if "reflect" in self.methods and self.elements < 2:
            raise LocaloraError(f"reflect combines at least 2 LoRAs; --elements {self.elements} is too few for it")


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
            "baseline": c.baseline, "repeats": c.repeats, "iterations": c.iterations, "candidates": c.candidates,
            "fewshot": c.fewshot, "fewshot_threshold": self.profile.clip.fewshot_threshold,
        }


def plan(cfg: BenchConfig) -> Plan:
    """Check every input and list the cases, before any model loads."""
    cfg.check()
    bed = testbeds.load(cfg.testbed)
    sets = bed.composition_sets(cfg.elements)[: cfg.limit]
    seeds = cfg.seeds if cfg.seeds is not None else bed.seeds
    profile = load_profile(cfg.profile or bed.profile)
    loras = bed.resolve(cfg.lora_dir)
    return Plan(cfg, bed, profile, loras, tuple(Case(combo, s) for combo in sets for s in seeds))


# ------------------------------------------------------------------ the database

class Store:
    """DIR/bench.sqlite: the settings and every finished row; each row is its own commit."""

    def __init__(self, folder: Path, conn: sqlite3.Connection):
        self.folder = folder
        self.conn = conn
        conn.row_factory = sqlite3.Row

    @classmethod
    def create_or_open(cls, folder: Path, settings: dict[str, Any]) -> Store:
        """The bench folder for these settings: new, or an earlier one made with the same settings."""
        folder = Path(folder)
        path = folder / DB_FILE
        existed = path.is_file()
        if not existed and folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise LocaloraError(f"{folder}: exists and is not a bench folder (no {DB_FILE}); choose a new --out")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            store = cls(folder, sqlite3.connect(path))
            if existed:  # checked before anything is written to it
                store._check(settings)
                return store
            with store.conn:
                store.conn.executescript(_SCHEMA)
                store.conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("format", FORMAT), ("settings", json.dumps(settings)),
                    ("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))])
        except OSError as e:
            raise LocaloraError(f"{folder}: cannot write the bench folder ({e.strerror}); choose another --out") from None
        except sqlite3.DatabaseError as e:
            raise LocaloraError(f"{path}: not a localora bench database ({e}); choose a new --out") from None
        return store

    @classmethod
    def open(cls, folder: Path) -> Store:
        """An existing bench folder, for reading."""
        folder = Path(folder)
        path = folder / DB_FILE
        if not path.is_file():
            what = "it is empty" if folder.is_dir() and not any(folder.iterdir()) else f"it has no {DB_FILE}"
            if not folder.is_dir():
                what = "it does not exist"
            raise LocaloraError(f"{folder}: not a bench folder ({what}); make one with `localora bench --out {folder}`")
        store = cls(folder, sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True))
        try:
            fmt = store._meta("format")
        except sqlite3.DatabaseError:
            fmt = None
        if fmt != FORMAT:
            raise LocaloraError(f"{path}: not a localora bench database")
        return store

    def _meta(self, key: str) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _check(self, settings: dict[str, Any]) -> None:
        if self._meta("format") != FORMAT:
            raise LocaloraError(f"{self.folder / DB_FILE}: not a localora bench database; choose a new --out")
        stored = self.settings()
        if stored != json.loads(json.dumps(settings)):
            diff = [k for k in sorted(stored.keys() | settings.keys()) if stored.get(k) != settings.get(k)]
            shown = ", ".join(_difference(k, stored.get(k), settings.get(k)) for k in diff)
            raise LocaloraError(f"{self.folder}: made by a bench with other settings ({shown}); "
                                f"rerun with the same settings or choose a new --out")

    def settings(self) -> dict[str, Any]:
        return json.loads(self._meta("settings"))

    def results(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT rowid, * FROM results ORDER BY rowid")]

    def pairs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT rowid, * FROM pairs ORDER BY rowid")]

    def start_session(self, argv: list[str]) -> int:
        with self.conn:
            return self.conn.execute("INSERT INTO sessions (started, argv) VALUES (?, ?)",
                                     (time.time(), json.dumps(argv))).lastrowid

    def add(self, table: str, row: dict[str, Any]) -> None:
        """Insert one finished row; it is on disk when this returns."""
        with self.conn:
            self.conn.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})", row)


def _difference(key: str, stored: Any, given: Any) -> str:
    if isinstance(stored, (dict, list)) or isinstance(given, (dict, list)):
        return f"{key} differ"
    return f"{key} {stored!r} there, {given!r} now"


# ------------------------------------------------------------------ progress

class Progress(Protocol):
    def start(self, total: int, done: int) -> None: ...
    def working(self, what: str) -> None: ...
    def finished(self, line: str) -> None: ...


class PlainProgress:
    """One line per finished row, for logs and pipes."""

    def __init__(self, echo=print):
        self.echo = echo
        self.started = time.monotonic()
        self.total = self.count = 0

    def start(self, total: int, done: int) -> None:
        self.total = total
        self.echo(f"bench: {total} rows to make, {done} already done")

    def working(self, what: str) -> None:
        pass

    def finished(self, line: str) -> None:
        self.count += 1
        m, s = divmod(int(time.monotonic() - self.started), 60)
        self.echo(f"[{m:02d}:{s:02d}] {self.count}/{self.total} {line}")

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass


class LiveProgress:
    """A Rich progress bar with ETA and the current set / method; finished rows scroll above it."""

    def __init__(self, console=None):
        from rich import progress as rp

        self.bar = rp.Progress(rp.TextColumn("[bold]bench"), rp.BarColumn(), rp.MofNCompleteColumn(),
                               rp.TimeElapsedColumn(), rp.TextColumn("ETA"), rp.TimeRemainingColumn(),
                               rp.TextColumn("{task.description}"), console=console)
        self.task = None

    def start(self, total: int, done: int) -> None:
        self.bar.console.print(f"bench: {total} rows to make, {done} already done")
        self.task = self.bar.add_task("", total=total)

    def working(self, what: str) -> None:
        self.bar.update(self.task, description=what)

    def finished(self, line: str) -> None:
        self.bar.console.print(line, markup=False, highlight=False)
        self.bar.advance(self.task)

    def __enter__(self) -> LiveProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()


# ------------------------------------------------------------------ running

@dataclass(frozen=True)
class Summary:
    made: int
    skipped: int
    renders: int
    cache_hits: int
    vlm_calls: int


class _CountingVLM:
    """Counts VLM calls, so each row records the calls made for it."""

    def __init__(self, model: Any):
        self.model = model
        self.calls = 0

    def chat(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.model.chat(*args, **kwargs)


def run(cfg: BenchConfig, progress: Progress) -> Summary:
    """Make every row of the bench that is not in its folder yet."""
    p = plan(cfg)
    store = Store.create_or_open(cfg.out, p.settings())
    have = {(r["set_id"], r["seed"], r["method"]): r for r in store.results()}
    judged = {(r["set_id"], r["seed"], r["method"]) for r in store.pairs() if r["baseline"] == cfg.baseline}
    work = []  # (case, methods to run, methods to judge)
    for c in p.cases:
        todo = [m for m in cfg.methods if (c.set_id, c.seed, m) not in have]
        to_judge = [m for m in cfg.methods if m != cfg.baseline and (c.set_id, c.seed, m) not in judged]
        if todo or to_judge:
            work.append((c, todo, to_judge))
    total = sum(len(todo) + len(to_judge) for _, todo, to_judge in work)
    skipped = len(p.cases) * (2 * len(cfg.methods) - 1) - total
    progress.start(total, skipped)
    if not work:
        return Summary(0, skipped, 0, 0, 0)

    from localora.runs import session

    parts = session.components(p.profile)
    runner = _Runner(p, store, progress, parts.renderer, _CountingVLM(parts.vlm), parts.scorer,
                     store.start_session(sys.argv[1:]), have)
    for case, todo, to_judge in work:
        runner.case(case, todo, to_judge)
    stats = parts.renderer.stats
    return Summary(total, skipped, stats.renders, stats.hits, runner.vlm.calls)


@dataclass
class _Runner:
    plan: Plan
    store: Store
    progress: Progress
    renderer: Any
    vlm: _CountingVLM
    scorer: Any
    session: int
    have: dict[tuple[str, int, str], dict[str, Any]]
    _refs: tuple[Case, dict[str, list]] | None = None

    @property
    def out(self) -> Path:
        return self.plan.cfg.out

    def case(self, case: Case, methods: list[str], judged: list[str]) -> None:
        images = {}
        for method in methods:
            images[method] = self.result(case, method)
        base = self.plan.cfg.baseline
        for method in judged:
            for m in (method, base):
                if m not in images:  # a finished row: its saved image, not a new render
                    images[m] = open_image(self.out / self.have[(case.set_id, case.seed, m)]["image"])
            self.pair(case, method, images[method], images[base])

    # ------------------------------------------------------------ one row each

    def result(self, case: Case, method: str) -> Image.Image:
        self.progress.working(f"{case.set_id} seed {case.seed} {method}")
        start, before = time.perf_counter(), self._work()
        prompt = self.plan.testbed.prompt_for(case.combo)
        image, weights = self._reflect(case) if method == "reflect" else self._baseline(case, method)
        refs = self._references(case)
        each = {i: float(self.scorer.clip_i(image, images)) for i, images in refs.items()}
        rel = self._save(image, case, method)
        renders, hits, calls = (a - b for a, b in zip(self._work(), before))
        row = {
            "set_id": case.set_id, "elements": len(case.combo), "seed": case.seed, "method": method,
            "loras": json.dumps([x.id for x in case.combo]), "weights": json.dumps(weights), "prompt": prompt,
            "image": rel, "clip_t": float(self.scorer.clip_t(image, prompt)),
            "clip_i": sum(each.values()) / len(each), "clip_i_each": json.dumps(each),
            "renders": renders, "cache_hits": hits, "vlm_calls": calls,
            "seconds": round(time.perf_counter() - start, 3), "session": self.session, "finished": time.time(),
        }
        self.store.add("results", row)
        self.progress.finished(f"{case.set_id} seed {case.seed} {method:<9} CLIP-T {row['clip_t']:.4f} "
                               f"CLIP-I {row['clip_i']:.4f}  ({renders} renders, {hits} cached, {calls} VLM calls, "
                               f"{row['seconds']:.1f}s)")
        return image

    def pair(self, case: Case, method: str, image: Image.Image, base_image: Image.Image) -> None:
        base = self.plan.cfg.baseline
        self.progress.working(f"{case.set_id} seed {case.seed} judge {method} vs {base}")
        start, calls = time.perf_counter(), self.vlm.calls
        j = judge.judge_pair(self.vlm, image, base_image, [x.element() for x in case.combo],
                             repeats=self.plan.cfg.repeats, seed=case.seed)
        row = {
            "set_id": case.set_id, "elements": len(case.combo), "seed": case.seed, "method": method, "baseline": base,
            **{f"{d}_{side}": scores[d] for d in judge.DIMENSIONS for side, scores in (("a", j.scores.a), ("b", j.scores.b))},
            **j.verdict, "answers": json.dumps([asdict(a) for a in j.answers]),
            "vlm_calls": self.vlm.calls - calls, "seconds": round(time.perf_counter() - start, 3),
            "session": self.session, "finished": time.time(),
        }
        self.store.add("pairs", row)
        verdicts = ", ".join(f"{d} {j.verdict[d]}" for d in judge.DIMENSIONS)
        self.progress.finished(f"{case.set_id} seed {case.seed} {method} vs {base}: {verdicts}  "
                               f"({row['vlm_calls']} VLM calls, {row['seconds']:.1f}s)")

    # ------------------------------------------------------------ images

    def _loras(self, case: Case) -> list[Lora]:
        return [self.plan.loras[x.id] for x in case.combo]

    def _baseline(self, case: Case, method: str) -> tuple[Image.Image, dict[str, float]]:
        from localora.diffusion.render import RenderJob

        scale = self.plan.testbed.lora_scale
        loras, weights = methods.arrange(method, self._loras(case), (scale,) * len(case.combo))
        job = RenderJob(prompt=self.plan.testbed.prompt_for(case.combo), loras=loras, weights=weights,
                        method=method, sampling=self._sampling(case))
        return self.renderer.render(job).image, {lo.name: scale for lo in loras}

    def _reflect(self, case: Case) -> tuple[Image.Image, dict[str, float]]:
        from localora.runs import session
        from localora.runs.folder import RunFolder
        from localora.search import STRATEGIES
        from localora.search.config import ComposeConfig
        from localora.search.steps import Steps

        c, profile = self.plan.cfg, self.plan.profile
        # The base prompt: the loop appends each LoRA's trigger words itself, and renders its
        # single-LoRA references with that LoRA's words only.
        cfg = ComposeConfig(prompt=self.plan.testbed.prompt, loras=tuple(self._loras(case)),
                            iterations=c.iterations, candidates=c.candidates, sampling=self._sampling(case),
                            fewshot=c.fewshot, fewshot_threshold=profile.clip.fewshot_threshold)
        folder = self.out / "runs" / f"{case.set_id}-s{case.seed}"
        if (folder / "events.jsonl").is_file():
            run = RunFolder.open(folder)  # resumes: completed steps are replayed from its log
        else:
            shutil.rmtree(folder, ignore_errors=True)  # a folder cut short while being created
            run = session.start(cfg, profile, folder)

        def emit(event: dict[str, Any]) -> None:
            if "id" in event:
                self.progress.working(f"{case.set_id} seed {case.seed} reflect {event['id']}")

        final = STRATEGIES[cfg.search].run(cfg, Steps(run, self.renderer, self.vlm, self.scorer, emit))
        return run.image(final.image), final.weights

    def _references(self, case: Case) -> dict[str, list]:
        """Per LoRA: the testbed's reference images, else that LoRA alone at weight 1.0.

        The single-LoRA render is the reflect loop's own reference render (same prompt, weight,
        method and seed), so the render cache serves it to both.
        """
        if self._refs is None or self._refs[0] != case:  # only the current case is kept
            from localora.search.config import reference_job

            refs = {}
            for lora in self._loras(case):
                if lora.references:
                    refs[lora.name] = list(lora.references)
                    continue
                job = reference_job(self.plan.testbed.prompt, lora, self._sampling(case))
                image = self.renderer.render(job).image
                self._save(image, case, f"ref-{lora.name}")
                refs[lora.name] = [image]
            self._refs = (case, refs)
        return self._refs[1]

    def _sampling(self, case: Case):
        from localora.diffusion.sampling import Sampling

        return Sampling(seed=case.seed, negative_prompt=self.plan.testbed.negative_prompt)

    def _save(self, image: Image.Image, case: Case, name: str) -> str:
        rel = f"images/{case.set_id}/s{case.seed}-{name}.png"
        atomic_write(self.out / rel, lambda p: image.save(p, format="PNG"))
        return rel

    def _work(self) -> tuple[int, int, int]:
        return self.renderer.stats.renders, self.renderer.stats.hits, self.vlm.calls
