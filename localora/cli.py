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
    from localora import loras, profiles

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
    from localora import loras
    from localora.profiles import load_profile
    from localora.render import Renderer, RenderJob

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
    from localora import loras as loralib

    info = loralib.inspect(Path(file))
    rows = [
        ("file", file),
        ("format", "kohya-ss" if info.format == "kohya" else "diffusers/peft"),
        ("base", f"{loralib.ARCH_NAMES[info.arch]} ({info.arch_evidence})" if info.arch else f"unknown ({info.arch_evidence})"),
        ("rank", str(info.rank)),
        ("alpha", f"{info.alpha:g} (scale {info.alpha / info.rank:g})" if info.alpha is not None else f"= rank (scale 1)"),
        ("layers", f"{info.layers} in {', '.join(info.components)}"),
        ("targets", ", ".join(info.targets)),
        ("triggers", info.triggers or "(none found in header or sidecar)"),
    ]
    for k, v in rows:
        click.echo(f"{k:<9} {v}")
