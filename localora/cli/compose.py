"""`localora compose` (the main job), `localora demo` (it, on the tiny profile) and `localora open`.

    compose PROMPT ...                  one run folder (runs/session.py drives it)
    compose --prompts FILE.jsonl ...    a batch of them, one per line (runs/batch.py)
    compose_config(...)                 the options -> ComposeConfig, for a PROMPT and a batch line alike
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from localora import profiles, verbosity
from localora.cli.options import (batch_option, catalog_option, compile_option, check_ray_options, complete_profiles, emit, float_list, json_option, lora_dir_option,
                                  lora_option, plain_option, profile_option, resolve_loras, resolve_request, run_parent,
                                  vlm_option,
                                  ray_options, sampling_options, weight_bounds)
from localora.diffusion.methods import METHODS
from localora.errors import INTERRUPTED, LocaloraError, RuntimeFailure
from localora.search import STRATEGIES


class _Watch:
    """The run's UI, passed every event, keeping what the summary needs on the way: the done
    event, and the seconds each stage took (renders by role, VLM calls by step, model moves)."""

    def __init__(self, ui: Any):
        self.ui = ui
        self.done: dict[str, Any] | None = None
        self.images = 0  # every image of the run, cached and recalled ones too: the live view's "images"
        self.stages: dict[str, list[float]] = {}  # stage -> [count, seconds]
        self.warmup = [0, 0.0]  # --compile: warm-ups logged, and their seconds (in no render's)

    def _add(self, stage: str, seconds: float) -> None:
        count_seconds = self.stages.setdefault(stage, [0, 0.0])
        count_seconds[0] += 1
        count_seconds[1] += seconds

    def event(self, event: dict[str, Any]) -> None:
        if event["type"] == "done":
            self.done = event
        elif event["type"] == "resume":
            self.images += event.get("renders", 0)
        elif event["type"] == "render":
            self.images += 1
            self._add(f"render {event['role']}" + (" (cached)" if event.get("cached") else ""), event["seconds"])
        elif event["type"] == "vlm":
            self._add(f"vlm {event['step']}", event["seconds"])
        elif event["type"] == "model" and event["action"] == "compile":
            self._add("compile warm-up", event["seconds"])
            self.warmup = [self.warmup[0] + 1, self.warmup[1] + event["seconds"]]
        self.ui.event(event)

    def step(self, i: int, total: int) -> None:
        self.ui.step(i, total)

    def status(self, text: str) -> None:
        self.ui.status(text)

    def generating(self, tokens: int, limit: int, done: bool) -> None:
        self.ui.generating(tokens, limit, done)

    def placement(self, p: Any) -> None:
        if p.done:
            self._add(f"model {p.action} {p.component}", p.seconds)
        self.ui.placement(p)

    def __enter__(self):
        self.ui.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.ui.__exit__(*exc)

    def timing_lines(self) -> list[str]:
        width = max((len(s) for s in self.stages), default=0)
        return ["timings per stage (this process):"] + [
            f"  {stage:<{width}}  {int(n):>4} x {secs / n:7.2f} s = {secs:8.2f} s"
            for stage, (n, secs) in sorted(self.stages.items(), key=lambda kv: -kv[1][1])]


class _Silent:
    """--quiet: no progress at all, only the result lines."""

    def event(self, event: dict[str, Any]) -> None: ...
    def step(self, i: int, total: int) -> None: ...
    def placement(self, p: Any) -> None: ...
    def status(self, text: str) -> None: ...
    def generating(self, tokens: int, limit: int, done: bool) -> None: ...
    def __enter__(self): return self
    def __exit__(self, *exc) -> None: ...


def _ui(plain: bool, as_json: bool, prof=None) -> Any:
    from rich.console import Console

    from localora import tiny
    from localora.ui.live import LiveUI, PlainUI

    if verbosity.quiet():
        return _Silent()
    # With --json, stdout carries only the JSON document: progress goes to stderr.
    stream = sys.stderr if as_json else sys.stdout
    console = Console(file=stream, highlight=False, soft_wrap=True)
    note = tiny.NOTE if prof is not None and profiles.is_tiny(prof.diffusion.source) else ""
    return PlainUI(console, note=note) if plain or not stream.isatty() else LiveUI(console, note=note)


def summary(final, run, renders: int | None) -> dict[str, Any]:
    """compose's result, for --json and the two human lines alike (a batch line's, too)."""
    from localora.runs.folder import result

    return result(run.path, final.weights, final.iteration, renders)


def summary_lines(d: dict[str, Any], images: int | None = None) -> list[str]:
    # "renders" is what the search spent (candidates and refined picks); `images` counts every
    # image of the run as the live view does, so the two numbers are told apart, not contradicted.
    spent = "" if d["renders"] is None else f", {d['renders']} search renders"
    spent += f" of {images} images" if images and d["renders"] is not None else ""
    warmup = [f"compile warm-up: {d['compile_warmup_seconds']:.1f}s, apart from the render times"] \
        if d.get("compile_warmup_seconds") else []
    return ["final weights: " + ", ".join(f"{k}={v:.2f}" for k, v in d["weights"].items())
            + f" (round {d['iteration']}{spent})",
            f"run folder: {d['run_folder']}   image: {d['image']}   report: {d['report']}", *warmup]


def _run(cfg, prof, run, plain: bool, batch: int = 0, as_json: bool = False, compiled: bool = False) -> None:
    from localora.runs import session

    ui = _Watch(_ui(plain, as_json, prof))
    try:
        with ui:
            final = session.compose(cfg, prof, run, ui, batch=batch, compiled=compiled)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; the run folder is intact. Continue with: localora compose --resume {run.path}", err=True)
        sys.exit(INTERRUPTED)
    data = summary(final, run, ui.done.get("renders") if ui.done else None)
    if ui.warmup[0]:
        data["compile_warmup_seconds"] = round(ui.warmup[1], 3)
    emit(as_json, data, summary_lines(data, ui.images))
    if verbosity.verbose():
        for line in ui.timing_lines():
            click.echo(line, err=True)


def _start(cfg, prof, out: str | None, plain: bool, batch: int = 0, as_json: bool = False,
           compiled: bool = False) -> None:
    cfg.check(prof.diffusion)  # session.start checks again; here a bad option is one line before torch loads
    profiles.require(prof, cfg.models())  # weights not here: one line with the pull command, before the run folder exists
    from localora.runs import session

    run = session.start(cfg, prof, Path(out) if out else session.default_out(cfg.prompt, run_parent()))
    _run(cfg, prof, run, plain, batch, as_json, compiled)


# Options that a resumed run takes from its run.json, so giving them with --resume is an error.
_RESUME_KEEPS = ("resume", "plain", "batch", "compiled", "lora_specs", "catalog", "lora_dirs", "profile", "as_json")
# (a resumed run keeps its VLM too: run.json names it, so --vlm is refused with --resume)


@click.command()
@click.argument("prompt", required=False)
@profile_option
@vlm_option
@lora_option("A LoRA to combine (at least two, with the prompt's <lora:NAME:START> tags); an optional start "
             "weight. Repeatable.", metavar="NAME_OR_PATH[:START]")
@catalog_option
@lora_dir_option
@click.option("--iterations", "-n", type=int, default=5, show_default=True, help="Generate-feedback-refine rounds.")
@click.option("--candidates", "-c", type=int, default=5, show_default=True, help="Weight vectors proposed per round.")
@click.option("--bounds", default=None, help="MIN,MAX for every weight (default: bounds in config.toml, else 0,1.5).")
# A plain string, checked by ComposeConfig: a typo is one error line, not click's usage block.
@click.option("--search", default="vlm", show_default=True, metavar="[" + "|".join(STRATEGIES) + "]",
              help="; ".join(f"{s.name}: {s.summary}" for s in STRATEGIES.values()) + ".")
@click.option("--budget", type=int, default=None,
              help="Candidate renders for random, cmaes and hybrid (default: iterations x (candidates + 1), "
                   "what the vlm loop renders after its few-shot stage).")
@click.option("--final-judge", is_flag=True,
              help="The VLM's pairwise judge picks the final image among the top 3 by the CLIP objective "
                   "(for vlm: of the refined images, instead of the select step).")
@click.option("--method", "-m", type=click.Choice(list(METHODS)), default="merge", show_default=True,
              help="How every render of the run combines the LoRAs: "
                   + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + ".")
@sampling_options
@click.option("--switch-every", type=click.IntRange(min=1), default=5, show_default=True,
              help="--method switch: denoising steps per LoRA turn; cmlora: steps per dominant LoRA.")
@click.option("--cache-interval", type=click.IntRange(min=0), default=2, show_default=True,
              help="--method cmlora: steps between passes of every LoRA (between them only the dominant one "
                   "runs); 0 is Composite.")
@click.option("--blocks", default=None, metavar="GROUPS|PRESET",
              help="Search one weight per LoRA and block group instead of one per LoRA: groups among te, in, "
                   "mid, out (e.g. in,mid,out), or a preset: unet (in,mid,out), all (te,in,mid,out). "
                   "SD1.5 and SDXL bases.")
@click.option("--temperature", type=click.FloatRange(min=0), default=None, help="VLM sampling temperature (default: greedy).")
@click.option("--no-fewshot", is_flag=True, help="Skip few-shot selection (the paper's ablation).")
@click.option("--fewshot-levels", default="0.4,0.7,1.0", show_default=True, help="Weight levels the few-shot design uses.")
@click.option("--fewshot-budget", type=click.IntRange(min=1), default=None,
              help="Renders for the few-shot examples (default: 3 per LoRA; the full grid when it is smaller).")
@click.option("--fewshot-threshold", type=float, default=None,
              help="Drop grid images whose weakest LoRA's CLIP-T is below this (default: the CLIP model's).")
@click.option("--prompts", type=click.Path(), default=None, metavar="FILE.jsonl|DIR",
              help="A FILE.jsonl of prompts to compose one after another, the models loaded once: one JSON "
                   "object a line, {\"prompt\", \"loras\", \"name\", \"seed\"}; every other option applies to "
                   "every line, and --out is the batch's folder. A folder instead: prompt templates, as "
                   "--templates (what --prompts meant before, so old command lines keep working).")
@click.option("--templates", "prompts_dir", type=click.Path(), default=None, metavar="DIR",
              help="Folder of prompt templates overriding the shipped ones.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Run folder (default runs/<time>-<slug>, or under out in config.toml); with --prompts "
                   "FILE.jsonl, the batch's folder (default batch-<time>-<file stem> there).")
@click.option("--resume", type=click.Path(), default=None, help="Continue an interrupted run folder, with the settings it started with.")
@ray_options
@plain_option
@batch_option
@compile_option
@json_option
def compose(prompt, profile, vlm, lora_specs, catalog, lora_dirs, iterations, candidates, bounds, search, budget, final_judge,
            method, sampling, blocks, temperature, no_fewshot, fewshot_levels, fewshot_budget, fewshot_threshold, prompts,
            prompts_dir, out, resume, ray, workers, worker_cpus, plain, batch, compiled, as_json):
    """Search weights for combining LoRAs: render, let the local VLM look, refine.

    Runs GPT4LoRA's loop (few-shot selection, then N rounds of generate -> feedback -> refine,
    then a final pick) and writes a run folder with every image, every VLM call, final.png,
    final.json and report.html. Every render uses --seed, so images differ only by their
    weights. Ctrl-C leaves the folder resumable with --resume. <lora:NAME:START> tags in PROMPT
    add LoRAs as --lora does and are removed from the prompt the run keeps; without a start
    weight, the A1111 sidecar's preferred weight is the start.

    --search random|cmaes|hybrid spend the same number of renders (--budget) on a CLIP
    objective instead (CLIP-T to the prompt plus mean CLIP-I to each LoRA alone) and keep the
    best by it; hybrid lets the VLM propose each round's population for CMA-ES.

    --method switch|composite searches the weights for that way of rendering: every render of
    the run (the LoRAs alone, the few-shot examples, every candidate) uses it.

    --prompts FILE.jsonl composes every line of FILE into a folder of DIR (--out), one after
    another in this process, or with --ray on the workers of a Ray cluster; rerunning the same
    command skips the finished lines and resumes an interrupted one.
    """
    from localora.profiles import load_profile
    from localora.vlm.prompts import check_dir

    # Every option is checked before localora.runs.session (and torch with it) is imported.
    jsonl, prompts_dir, option = _prompts_option(prompts, prompts_dir)
    if ray is not None and not jsonl:
        raise LocaloraError("--ray spreads a batch over a cluster: give --prompts FILE.jsonl (one compose per line)")
    check_ray_options(ray, workers, worker_cpus)
    if jsonl and resume:
        raise LocaloraError(f"--resume continues one run; to continue a batch, rerun the same command "
                            f"(--prompts {jsonl} with its --out)")
    if resume:
        from click.core import ParameterSource

        ctx = click.get_current_context()
        ignored = [p.opts[0] if p.opts else p.name for p in ctx.command.params
                   if p.name not in _RESUME_KEEPS and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
        if ignored:
            raise LocaloraError(f"--resume continues with the settings in the run's run.json; "
                                f"drop {', '.join(ignored)}")
        given = None
        if lora_specs:
            given = [c.lora for c in resolve_loras(load_profile(profile), lora_specs, catalog, lora_dirs)]
        from localora.runs.folder import RunFolder

        RunFolder.open(Path(resume), write=False)  # not a run folder: one line before torch loads
        from localora.runs import session

        run, cfg, prof = session.reopen(Path(resume), given)
        try:
            profiles.require(prof, cfg.models())
        except BaseException:
            run.close()  # its lock: the same --resume works once the weights are here
            raise
        _run(cfg, prof, run, plain, batch, as_json, compiled)
        return
    if jsonl and prompt:
        raise LocaloraError(f"give a PROMPT or --prompts {jsonl} (its lines are the prompts), not both")
    if not prompt and not jsonl:
        raise LocaloraError("compose needs a PROMPT (or --prompts FILE.jsonl, or --resume DIR)")
    prompts_dir = check_dir(prompts_dir, option)
    prof = load_profile(profile, vlm=vlm)
    options = dict(iterations=iterations, candidates=candidates, bounds=bounds, search=search, budget=budget,
                   final_judge=final_judge, method=method, sampling=sampling, temperature=temperature,
                   no_fewshot=no_fewshot, fewshot_levels=fewshot_levels, fewshot_budget=fewshot_budget,
                   fewshot_threshold=fewshot_threshold, prompts_dir=prompts_dir, blocks=blocks)
    if jsonl:
        if lora_specs:
            raise LocaloraError(f"--lora does not go with --prompts {jsonl}: give each line's LoRAs in its "
                                f"\"loras\" (or as <lora:NAME:START> tags in its prompt)")
        _batch(jsonl, prof, catalog, lora_dirs, options, out, batch, as_json, (ray, workers, worker_cpus), compiled)
        return
    cfg = compose_config(prof, prompt, lora_specs, catalog, lora_dirs, **options)
    _start(cfg, prof, out, plain, batch, as_json, compiled)


def _prompts_option(prompts: str | None, templates: str | None) -> tuple[Path | None, str | None, str]:
    """--prompts and --templates -> (the batch's FILE.jsonl or None, the templates folder, the
    option that named it): --prompts means templates, as it always did, unless it names a .jsonl."""
    if prompts is not None and Path(prompts).suffix.lower() == ".jsonl":
        return Path(prompts), templates, "--templates"
    if prompts is not None and templates is not None:
        raise LocaloraError(f"--prompts {prompts} and --templates {templates} both name a templates folder; "
                            f"give --templates only")
    if prompts is not None and Path(prompts).is_file():
        raise LocaloraError(f"--prompts {prompts}: not a folder; give a folder of prompt templates, or a "
                            f"batch of prompts in a file ending in .jsonl")
    return None, prompts if prompts is not None else templates, "--prompts" if prompts is not None else "--templates"


def compose_config(prof, prompt: str, lora_specs: tuple[str, ...], catalog: tuple[str, ...],
                   lora_dirs: tuple[str, ...], *, iterations: int, candidates: int, bounds: str | None, search: str,
                   budget: int | None, final_judge: bool, method: str, sampling, temperature: float | None,
                   no_fewshot: bool, fewshot_levels: str, fewshot_budget: int | None,
                   fewshot_threshold: float | None, prompts_dir: Path | None, blocks: str | None = None):
    """compose's options -> the run's ComposeConfig: for its PROMPT, and for each batch line (its
    prompt, LoRAs and seed, the rest as the command line says)."""
    from localora.diffusion import blocks as blocklib
    from localora.diffusion import methods
    from localora.search.config import ComposeConfig

    groups = blocklib.groups_of(blocks)
    request = resolve_request(prof, lora_specs, catalog, lora_dirs, prompt)
    if not request.prompt:
        raise LocaloraError("compose needs a PROMPT besides its <lora:...> tags: the VLM judges the images against it")
    choices = request.choices
    fixed = [c.lora.name for c in choices if c.lbw is not None]
    if fixed:  # the search sets every weight itself: a fixed lbw= would be dropped without a word
        raise LocaloraError(f"compose searches every weight itself; {', '.join(fixed)} has lbw= block weights, which "
                            f"only generate renders: leave lbw= out here (--blocks in,mid,out searches per block)")
    # In the order the method runs them (Switch: character first), so the run's LoRAs, start
    # weights and every render agree.
    loras, starts = methods.arrange(method, [c.lora for c in choices], [c.weight for c in choices])
    starts = starts if any(w is not None for w in starts) else None
    return ComposeConfig(
        prompt=request.prompt, loras=loras, iterations=iterations, candidates=candidates, method=method,
        bounds=weight_bounds(bounds), search=search, budget=budget, final_judge=final_judge,
        sampling=sampling, start=starts, fewshot=not no_fewshot,
        fewshot_levels=float_list(fewshot_levels, "--fewshot-levels"), fewshot_budget=fewshot_budget,
        fewshot_threshold=prof.clip.fewshot_threshold if fewshot_threshold is None else fewshot_threshold,
        temperature=temperature, prompts_dir=str(prompts_dir) if prompts_dir else None, blocks=groups,
    )


def _batch(path: Path, prof, catalog, lora_dirs, options: dict[str, Any], out: str | None, batch: int,
           as_json: bool, ray: tuple[str | None, int | None, int], compiled: bool = False) -> None:
    """compose --prompts FILE.jsonl: every line checked first, then run one after another, or
    on the workers of a Ray cluster (`ray`: --ray, --workers, --worker-cpus)."""
    from localora.runs import batch as batches

    if compiled and ray[0] is not None:
        raise LocaloraError("--compile is not passed on to Ray workers; drop --compile or --ray")

    def make_config(line: dict[str, Any]):
        sampling = options["sampling"] if line["seed"] is None else replace(options["sampling"], seed=line["seed"])
        cfg = compose_config(prof, line["prompt"], tuple(line["loras"]), catalog, lora_dirs,
                             **{**options, "sampling": sampling})
        return cfg, prof.name

    items = batches.load(path, make_config)
    if ray[0] is None:  # the models load here (on a cluster, on each worker's node)
        profiles.require(prof, items[0].cfg.models() if items else ())
    folder = Path(out) if out else run_parent() / f"batch-{time.strftime('%Y%m%d-%H%M%S')}-{path.stem}"
    ui = _ui(True, as_json, prof)  # one line per event: a live view is one run's
    again = "the same command" if out else f"the same command with --out {folder}"  # else a new batch
    try:
        with ui:
            execute = None
            if ray[0] is not None:
                from localora.runs import distributed

                execute = distributed.executor(ray[0], prof, folder, ui, ray[1], ray[2], batch)
            records = batches.run(items, folder, ui, execute, source=path, batch=batch, profile=prof, compiled=compiled)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; the finished lines stay in {folder} and the interrupted line's run folder "
                   f"is resumable. Continue with {again}", err=True)
        sys.exit(INTERRUPTED)
    emit(as_json, batches.document(path, records), batch_lines(records, folder))
    failed = [r for r in records if r["status"] == "failed"]
    if failed:
        raise RuntimeFailure(f"{len(failed)} of {len(records)} lines failed (line {failed[0]['line']}: "
                             f"{failed[0]['error']}); see {folder / 'batch.json'}, then rerun {again} "
                             f"(the finished lines are kept)")


def batch_lines(records: list[dict[str, Any]], folder: Path) -> list[str]:
    lines = []
    for r in records:
        weights = ", ".join(f"{k}={v:.2f}" for k, v in (r["weights"] or {}).items())
        lines.append(f"line {r['line']}: {r['status']}  {r['folder']}" + (f"  {weights}" if weights else ""))
    return lines + [f"batch: {folder / 'batch.json'}"]


DEMO_PROMPT = "a portrait of a girl in a garden"
DEMO_LORAS = ("demo-character", "demo-clothing", "demo-style")


@click.command()
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None, help="Run folder (default runs/<time>-<slug>, or under out in config.toml).")
@click.option("--profile", "-p", "profile_name", default="tiny", show_default=True, shell_complete=complete_profiles,
              help="A tiny profile: tiny (SDXL), tiny-sd15, tiny-flux (Flux.1), tiny-zimage (Z-Image).")
@plain_option
@compile_option
def demo(out, profile_name, plain, compiled):
    """Compose the three demo LoRAs on a tiny profile: 2 iterations, 3 candidates.

    Everything is built offline on first use; it shows every step of the real loop in about a
    minute on a laptop CPU (the tiny models are random, so the images are noise-like).
    """
    from localora.profiles import load_profile
    from localora.search.config import ComposeConfig

    prof = load_profile(profile_name)
    if not profiles.is_tiny(prof.diffusion.source):
        raise LocaloraError(f"--profile {profile_name}: the demo runs on a tiny profile (its demo LoRAs are built "
                            f"for it); use `localora compose` with your own LoRAs on {profile_name}")
    loras = tuple(c.lora for c in resolve_loras(prof, DEMO_LORAS, ()))
    cfg = ComposeConfig(prompt=DEMO_PROMPT, loras=loras, iterations=2, candidates=3,
                        fewshot_threshold=prof.clip.fewshot_threshold)
    _start(cfg, prof, out, plain, compiled=compiled)


@click.command("open")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--launch", is_flag=True, help="Open the report in the default browser.")
def open_report(run_dir, launch):
    """Print the path of a run's report.html (writing it if missing), or open it."""
    from localora.runs import report
    from localora.runs.folder import RunFolder

    run = RunFolder.open(Path(run_dir), write=False)
    path = run.path / "report.html"
    if not path.is_file():
        path = report.write(run)
    click.echo(str(path.resolve()))
    if launch:
        click.launch(str(path))


COMMANDS = [compose, demo, open_report]
