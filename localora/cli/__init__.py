"""The `localora` command line. Commands compose: each one is a thin layer over a module."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from localora.errors import LocaloraError


class _Cli(click.Group):
    """Prints a LocaloraError as one line and exits 2, instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LocaloraError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Cli)
@click.version_option(package_name="localora")
def main() -> None:
    """Find how to combine several LoRAs, locally: render, let a local VLM look, refine."""


def _weights_for(choices, default: float) -> list[float]:
    return [default if c.weight is None else c.weight for c in choices]


def resolve_loras(profile, specs: tuple[str, ...], catalogs: tuple[str, ...]):
    """--lora NAME_OR_PATH[:WEIGHT] options -> LoraChoice list."""
    from localora import profiles
    from localora.diffusion import loras

    known = loras.known_loras(profile.diffusion.arch, profiles.is_tiny(profile.diffusion.source),
                              [Path(c) for c in catalogs])
    return [loras.parse_choice(s, known) for s in specs]


profile_option = click.option("--profile", "-p", default=None, help="Profile from models.toml (default: its default_profile, `tiny`).")
catalog_option = click.option("--catalog", multiple=True, type=click.Path(dir_okay=False),
                              help="LoRA catalog TOML ([loras.NAME] file/category/triggers); repeatable.")


@main.command()
@click.argument("prompt")
@profile_option
@click.option("--lora", "-l", "lora_specs", multiple=True, required=True, metavar="NAME_OR_PATH[:WEIGHT]",
              help="A LoRA by catalog name or .safetensors path, with an optional weight; repeatable.")
@catalog_option
@click.option("--method", "-m", type=click.Choice(["merge", "switch", "composite"]), default="merge", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Denoising steps (default: profile).")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale (default: profile).")
@click.option("--width", type=click.IntRange(min=8), default=None)
@click.option("--height", type=click.IntRange(min=8), default=None)
@click.option("--negative", default=None, help="Negative prompt (default: profile).")
@click.option("--switch-every", type=click.IntRange(min=1), default=5, show_default=True, help="LoRA Switch: steps per turn.")
@click.option("--no-triggers", is_flag=True, help="Do not append the LoRAs' trigger words to the prompt.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default="render.png", show_default=True)
def generate(prompt, profile, lora_specs, catalog, method, seed, steps, guidance, width, height, negative,
             switch_every, no_triggers, out):
    """Render PROMPT with several LoRAs combined by one method (merge, switch or composite).

    Weights default to 1.0. Switch runs the LoRAs character first, then clothing, style,
    background, object. Identical requests are served from the render cache.
    """
    from localora.diffusion import loras
    from localora.profiles import load_profile
    from localora.diffusion.render import Renderer, RenderJob

    prof = load_profile(profile)
    choices = resolve_loras(prof, lora_specs, catalog)
    if method == "switch":
        choices = [choices[i] for i in loras.switch_order([c.lora for c in choices])]
    chosen = [c.lora for c in choices]
    text = prompt if no_triggers else loras.with_triggers(prompt, chosen)
    job = RenderJob(prompt=text, loras=tuple(chosen), weights=tuple(_weights_for(choices, 1.0)), method=method,
                    seed=seed, negative_prompt=negative, steps=steps, guidance=guidance, width=width, height=height,
                    switch_every=switch_every)
    result = Renderer(prof).render(job)
    out_path = Path(out)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        result.image.save(out_path)
    except OSError as e:
        raise LocaloraError(f"{out_path}: cannot write the image ({e.strerror}); choose another --out") from None
    source = "cache" if result.cached else f"rendered in {result.seconds:.1f}s"
    click.echo(f"{out_path}  ({method}, seed {seed}, {source})")


@main.command()
def models():
    """List the profiles of models.toml and whether each model is available here."""
    from localora import profiles

    cat = profiles.load_catalog()
    click.echo(f"profiles in {cat.path} (default: {cat.default_profile})")
    for p in cat.profiles.values():
        click.echo(f"\n{p.name}: {p.description}")
        for kind, spec in (("diffusion", p.diffusion), ("vlm", p.vlm), ("clip", p.clip)):
            click.echo(f"  {kind:<9} {spec.name:<22} {profiles.availability(spec.source)}")
            if kind == "diffusion" and spec.vae:
                click.echo(f"  {'vae':<9} {spec.vae:<22} {profiles.availability(spec.vae)}")


@main.group()
def loras():
    """Look at LoRA files."""


@loras.command("inspect")
@click.argument("file", type=click.Path())
def loras_inspect(file):
    """Print a LoRA file's format, base architecture, rank, alpha, targets and trigger words."""
    from localora.diffusion import loras as loralib

    info = loralib.inspect(Path(file))
    rows = [
        ("file", file),
        ("format", "kohya-ss" if info.format == "kohya" else "diffusers/peft"),
        ("base", f"{loralib.ARCH_NAMES[info.arch]} ({info.arch_evidence})" if info.arch else f"unknown ({info.arch_evidence})"),
        ("rank", str(info.rank)),
        ("alpha", f"{info.alpha:g} (scale {info.alpha / info.rank:g})" if info.alpha is not None else "= rank (scale 1)"),
        ("layers", f"{info.layers} in {', '.join(info.components)}"),
        ("targets", ", ".join(info.targets)),
        ("triggers", info.triggers or "(none found in header or sidecar)"),
    ]
    for k, v in rows:
        click.echo(f"{k:<9} {v}")


def _float_pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise LocaloraError(f"--bounds {text}: expected MIN,MAX, e.g. 0,1.5") from None
    return lo, hi


def _run_compose(cfg, prof, run, plain: bool) -> None:
    from localora.runs import session
    from localora.ui.live import LiveUI, PlainUI

    use_plain = plain or not sys.stdout.isatty()
    ui = PlainUI() if use_plain else LiveUI()
    try:
        with ui:
            final = session.compose(cfg, prof, run, ui)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; the run folder is intact. Continue with: localora compose --resume {run.path}", err=True)
        sys.exit(130)
    click.echo("final weights: " + ", ".join(f"{k}={v:.2f}" for k, v in final.weights.items())
               + f" (round {final.iteration})")
    click.echo(f"run folder: {run.path}   image: {run.path / 'final.png'}   report: {run.path / 'report.html'}")


@main.command()
@click.argument("prompt", required=False)
@profile_option
@click.option("--lora", "-l", "lora_specs", multiple=True, metavar="NAME_OR_PATH[:START]",
              help="A LoRA to combine (at least two); an optional start weight. Repeatable.")
@catalog_option
@click.option("--iterations", "-n", type=int, default=5, show_default=True, help="Generate-feedback-refine rounds.")
@click.option("--candidates", "-c", type=int, default=5, show_default=True, help="Weight vectors proposed per round.")
@click.option("--bounds", default="0,1.5", show_default=True, help="MIN,MAX for every weight.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every render (and of VLM sampling).")
@click.option("--temperature", type=float, default=None, help="VLM sampling temperature (default: greedy).")
@click.option("--no-fewshot", is_flag=True, help="Skip few-shot selection (the paper's ablation).")
@click.option("--fewshot-levels", default="0.4,0.7,1.0", show_default=True, help="Grid levels per LoRA.")
@click.option("--fewshot-threshold", type=float, default=None,
              help="Drop grid images whose weakest LoRA's CLIP-T is below this (default: the CLIP model's).")
@click.option("--steps", type=click.IntRange(min=1), default=None)
@click.option("--guidance", type=float, default=None)
@click.option("--width", type=click.IntRange(min=8), default=None)
@click.option("--height", type=click.IntRange(min=8), default=None)
@click.option("--prompts", "prompts_dir", type=click.Path(file_okay=False), default=None,
              help="Folder of prompt templates overriding prompts/*.txt.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None, help="Run folder (default runs/<time>-<slug>).")
@click.option("--resume", type=click.Path(), default=None, help="Continue an interrupted run folder, with the settings it started with.")
@click.option("--plain", is_flag=True, help="One log line per event instead of the live view.")
def compose(prompt, profile, lora_specs, catalog, iterations, candidates, bounds, seed, temperature, no_fewshot,
            fewshot_levels, fewshot_threshold, steps, guidance, width, height, prompts_dir, out, resume, plain):
    """Search weights for combining LoRAs: render, let the local VLM look, refine.

    Runs GPT4LoRA's loop (few-shot selection, then N rounds of generate -> feedback -> refine,
    then a final pick) and writes a run folder with every image, every VLM call, final.png,
    final.json and report.html. Ctrl-C leaves the folder resumable with --resume.
    """
    from localora.runs import session
    from localora.profiles import load_profile
    from localora.search.gpt4lora import ComposeConfig

    if resume:
        from click.core import ParameterSource

        ctx = click.get_current_context()
        ignored = [p.opts[0] if p.opts else p.name for p in ctx.command.params
                   if p.name not in ("resume", "plain", "lora_specs", "catalog", "profile")
                   and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
        if ignored:
            raise LocaloraError(f"--resume continues with the settings in the run's run.json; "
                                f"drop {', '.join(ignored)}")
        given = None
        if lora_specs:
            prof = load_profile(profile)
            given = [c.lora for c in resolve_loras(prof, lora_specs, catalog)]
        run, cfg, prof = session.reopen(Path(resume), given)
        _run_compose(cfg, prof, run, plain)
        return
    if not prompt:
        raise LocaloraError("compose needs a PROMPT (or --resume DIR)")
    prof = load_profile(profile)
    choices = resolve_loras(prof, lora_specs, catalog)
    lo, hi = _float_pair(bounds)
    starts = tuple(c.weight for c in choices) if any(c.weight is not None for c in choices) else None
    try:
        levels = tuple(float(x) for x in fewshot_levels.split(","))
    except ValueError:
        raise LocaloraError(f"--fewshot-levels {fewshot_levels}: expected numbers separated by commas") from None
    cfg = ComposeConfig(
        prompt=prompt, loras=tuple(c.lora for c in choices), iterations=iterations, candidates=candidates,
        bounds=(lo, hi), seed=seed, start=starts, fewshot=not no_fewshot, fewshot_levels=levels,
        fewshot_threshold=prof.clip.fewshot_threshold if fewshot_threshold is None else fewshot_threshold,
        temperature=temperature, steps=steps, guidance=guidance, width=width, height=height,
        prompts_dir=str(Path(prompts_dir).resolve()) if prompts_dir else None,
    )
    run = session.start(cfg, prof, Path(out) if out else session.default_out(prompt))
    _run_compose(cfg, prof, run, plain)


@main.command()
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None, help="Run folder (default runs/<time>-demo).")
@click.option("--plain", is_flag=True, help="One log line per event instead of the live view.")
@click.pass_context
def demo(ctx, out, plain):
    """Compose the three demo LoRAs on the tiny profile: 2 iterations, 3 candidates.

    Everything is built offline on first use; it shows every step of the real loop in about a
    minute on a laptop CPU (the tiny models are random, so the images are noise-like).
    """
    ctx.invoke(compose, prompt="a portrait of a girl in a garden", profile="tiny",
               lora_specs=("demo-character", "demo-clothing", "demo-style"), iterations=2, candidates=3,
               out=out, plain=plain, catalog=(), bounds="0,1.5", seed=0, temperature=None, no_fewshot=False,
               fewshot_levels="0.4,0.7,1.0", fewshot_threshold=None, steps=None, guidance=None, width=None,
               height=None, prompts_dir=None, resume=None)


@main.command("open")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--launch", is_flag=True, help="Open the report in the default browser.")
def open_report(run_dir, launch):
    """Print the path of a run's report.html (writing it if missing), or open it."""
    from localora.runs import report as report_html
    from localora.runs.folder import RunFolder

    run = RunFolder.open(Path(run_dir))
    path = run.path / "report.html"
    if not path.is_file():
        path = report_html.write(run)
    click.echo(str(path.resolve()))
    if launch:
        click.launch(str(path))


def _register() -> None:
    # The VLM and evaluation commands live beside the modules they drive.
    from localora.cli import evaluate as cli_eval, vlm as cli_vlm

    for command in cli_vlm.COMMANDS + cli_eval.COMMANDS:
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
