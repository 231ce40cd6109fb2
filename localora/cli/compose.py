"""`localora compose` (the main job), `localora demo` (it, on the tiny profile) and `localora open`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from localora import verbosity
from localora.cli.options import (batch_option, catalog_option, emit, float_list, json_option, lora_dir_option,
                                  lora_option, plain_option, profile_option, resolve_loras, resolve_request, run_parent,
                                  sampling_options, weight_bounds)
from localora.diffusion.methods import METHODS
from localora.errors import INTERRUPTED, LocaloraError
from localora.search import STRATEGIES


class _Watch:
    """The run's UI, passed every event, keeping what the summary needs on the way: the done
    event, and the seconds each stage took (renders by role, VLM calls by step, model moves)."""

    def __init__(self, ui: Any):
        self.ui = ui
        self.done: dict[str, Any] | None = None
        self.stages: dict[str, list[float]] = {}  # stage -> [count, seconds]

    def _add(self, stage: str, seconds: float) -> None:
        count_seconds = self.stages.setdefault(stage, [0, 0.0])
        count_seconds[0] += 1
        count_seconds[1] += seconds

    def event(self, event: dict[str, Any]) -> None:
        if event["type"] == "done":
            self.done = event
        elif event["type"] == "render":
            self._add(f"render {event['role']}" + (" (cached)" if event.get("cached") else ""), event["seconds"])
        elif event["type"] == "vlm":
            self._add(f"vlm {event['step']}", event["seconds"])
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


def _ui(plain: bool, as_json: bool) -> Any:
    from rich.console import Console

    from localora.ui.live import LiveUI, PlainUI

    if verbosity.quiet():
        return _Silent()
    # With --json, stdout carries only the JSON document: progress goes to stderr.
    stream = sys.stderr if as_json else sys.stdout
    console = Console(file=stream, highlight=False, soft_wrap=True)
    return PlainUI(console) if plain or not stream.isatty() else LiveUI(console)


def summary(final, run, renders: int | None) -> dict[str, Any]:
    """compose's result, for --json and the two human lines alike."""
    return {"weights": final.weights, "iteration": final.iteration, "renders": renders,
            "run_folder": str(run.path), "image": str(run.path / "final.png"), "report": str(run.path / "report.html")}


def summary_lines(d: dict[str, Any]) -> list[str]:
    spent = "" if d["renders"] is None else f", {d['renders']} renders"
    return ["final weights: " + ", ".join(f"{k}={v:.2f}" for k, v in d["weights"].items())
            + f" (round {d['iteration']}{spent})",
            f"run folder: {d['run_folder']}   image: {d['image']}   report: {d['report']}"]


def _run(cfg, prof, run, plain: bool, batch: int = 0, as_json: bool = False) -> None:
    from localora.runs import session

    ui = _Watch(_ui(plain, as_json))
    try:
        with ui:
            final = session.compose(cfg, prof, run, ui, batch=batch)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; the run folder is intact. Continue with: localora compose --resume {run.path}", err=True)
        sys.exit(INTERRUPTED)
    data = summary(final, run, ui.done.get("renders") if ui.done else None)
    emit(as_json, data, summary_lines(data))
    if verbosity.verbose():
        for line in ui.timing_lines():
            click.echo(line, err=True)


def _start(cfg, prof, out: str | None, plain: bool, batch: int = 0, as_json: bool = False) -> None:
    from localora.runs import session

    run = session.start(cfg, prof, Path(out) if out else session.default_out(cfg.prompt, run_parent()))
    _run(cfg, prof, run, plain, batch, as_json)


# Options that a resumed run takes from its run.json, so giving them with --resume is an error.
_RESUME_KEEPS = ("resume", "plain", "batch", "lora_specs", "catalog", "lora_dirs", "profile", "as_json")


@click.command()
@click.argument("prompt", required=False)
@profile_option
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
              help="--method switch: denoising steps per LoRA turn.")
@click.option("--temperature", type=click.FloatRange(min=0), default=None, help="VLM sampling temperature (default: greedy).")
@click.option("--no-fewshot", is_flag=True, help="Skip few-shot selection (the paper's ablation).")
@click.option("--fewshot-levels", default="0.4,0.7,1.0", show_default=True, help="Weight levels the few-shot design uses.")
@click.option("--fewshot-budget", type=click.IntRange(min=1), default=None,
              help="Renders for the few-shot examples (default: 3 per LoRA; the full grid when it is smaller).")
@click.option("--fewshot-threshold", type=float, default=None,
              help="Drop grid images whose weakest LoRA's CLIP-T is below this (default: the CLIP model's).")
@click.option("--prompts", "prompts_dir", type=click.Path(), default=None,
              help="Folder of prompt templates overriding the shipped ones.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None, help="Run folder (default runs/<time>-<slug>, or under out in config.toml).")
@click.option("--resume", type=click.Path(), default=None, help="Continue an interrupted run folder, with the settings it started with.")
@plain_option
@batch_option
@json_option
def compose(prompt, profile, lora_specs, catalog, lora_dirs, iterations, candidates, bounds, search, budget, final_judge,
            method, sampling, temperature, no_fewshot, fewshot_levels, fewshot_budget, fewshot_threshold, prompts_dir, out,
            resume, plain, batch, as_json):
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
    """
    from localora.diffusion import methods
    from localora.profiles import load_profile
    from localora.runs import session
    from localora.search.config import ComposeConfig
    from localora.vlm.prompts import check_dir

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
        run, cfg, prof = session.reopen(Path(resume), given)
        _run(cfg, prof, run, plain, batch, as_json)
        return
    if not prompt:
        raise LocaloraError("compose needs a PROMPT (or --resume DIR)")
    prompts_dir = check_dir(prompts_dir)
    prof = load_profile(profile)
    request = resolve_request(prof, lora_specs, catalog, lora_dirs, prompt)
    prompt, choices = request.prompt, request.choices
    if not prompt:
        raise LocaloraError("compose needs a PROMPT besides its <lora:...> tags: the VLM judges the images against it")
    # In the order the method runs them (Switch: character first), so the run's LoRAs, start
    # weights and every render agree.
    loras, starts = methods.arrange(method, [c.lora for c in choices], [c.weight for c in choices])
    starts = starts if any(w is not None for w in starts) else None
    cfg = ComposeConfig(
        prompt=prompt, loras=loras, iterations=iterations, candidates=candidates, method=method,
        bounds=weight_bounds(bounds), search=search, budget=budget, final_judge=final_judge,
        sampling=sampling, start=starts, fewshot=not no_fewshot,
        fewshot_levels=float_list(fewshot_levels, "--fewshot-levels"), fewshot_budget=fewshot_budget,
        fewshot_threshold=prof.clip.fewshot_threshold if fewshot_threshold is None else fewshot_threshold,
        temperature=temperature, prompts_dir=str(prompts_dir) if prompts_dir else None,
    )
    _start(cfg, prof, out, plain, batch, as_json)


DEMO_PROMPT = "a portrait of a girl in a garden"
DEMO_LORAS = ("demo-character", "demo-clothing", "demo-style")


@click.command()
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None, help="Run folder (default runs/<time>-<slug>, or under out in config.toml).")
@plain_option
def demo(out, plain):
    """Compose the three demo LoRAs on the tiny profile: 2 iterations, 3 candidates.

    Everything is built offline on first use; it shows every step of the real loop in about a
    minute on a laptop CPU (the tiny models are random, so the images are noise-like).
    """
    from localora.profiles import load_profile
    from localora.search.config import ComposeConfig

    prof = load_profile("tiny")
    loras = tuple(c.lora for c in resolve_loras(prof, DEMO_LORAS, ()))
    cfg = ComposeConfig(prompt=DEMO_PROMPT, loras=loras, iterations=2, candidates=3,
                        fewshot_threshold=prof.clip.fewshot_threshold)
    _start(cfg, prof, out, plain)


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
