"""`localora generate`: one render with several LoRAs combined by one method."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from localora import profiles, verbosity
from localora.cli.options import (catalog_option, compile_option, lora_dir_option, lora_option, lora_sources, profile_option,
                                  resolve_request, sampling_options)
from localora.diffusion.methods import METHODS
from localora.errors import LocaloraError
from localora.files import atomic_write


# What --from takes from the image, so giving one of these beside it is an error, not ignored.
_FROM_TAKES = ("prompt", "lora_specs", "method", "seed", "steps", "guidance", "width", "height", "negative",
               "switch_every", "cache_interval", "no_triggers")


@click.command()
@click.argument("prompt", required=False)
@profile_option
@lora_option("A LoRA by catalog name, .safetensors path or file stem in a --lora-dir, with an optional weight "
             "and LoRA Block Weight's :lbw=PRESET or :lbw=V1,V2,... (17 values SD1.5, 12 SDXL); repeatable. "
             "<lora:NAME:WEIGHT[:lbw=...]> tags in PROMPT add LoRAs too.")
@catalog_option
@lora_dir_option
@click.option("--method", "-m", type=click.Choice(list(METHODS)), default="merge", show_default=True,
              help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
@sampling_options
@click.option("--switch-every", type=click.IntRange(min=1), default=5, show_default=True,
              help="LoRA Switch: steps per turn; CMLoRA: steps per dominant LoRA.")
@click.option("--cache-interval", type=click.IntRange(min=0), default=2, show_default=True,
              help="CMLoRA: steps between passes of every LoRA (between them only the dominant one runs); "
                   "0 is Composite.")
@click.option("--no-triggers", is_flag=True, help="Do not append the LoRAs' trigger words to the prompt.")
@click.option("--from", "from_image", type=click.Path(dir_okay=False), default=None,
              help="Render again what a PNG describes: a localora PNG exactly (its LoRAs found by sha256 in its "
                   "run folder, a catalog or the --lora-dir folders), or an A1111/Forge PNG's prompt, <lora:...> "
                   "tags, steps, CFG scale, seed and size.")
@click.option("--out", "-o", type=click.Path(dir_okay=False), default=None,
              help="The image file (default render.png, or render-2.png and so on beside an existing one).")
@click.option("--force", is_flag=True, help="Overwrite --out when that file exists.")
@compile_option
def generate(prompt, profile, lora_specs, catalog, lora_dirs, method, sampling, no_triggers, from_image, out, force,
             compiled):
    """Render PROMPT with several LoRAs combined by one method (merge, switch or composite).

    LoRAs come from --lora and from A1111-style <lora:NAME:WEIGHT> tags in PROMPT (removed from the
    text the model reads). Weights default to the A1111 sidecar's preferred weight, else 1.0.
    Switch runs the LoRAs character first, then clothing, style, background, object. Identical
    requests are served from the render cache. With --from IMAGE.png, every setting comes from
    the image instead.
    """
    out_path = output_path(out, force)  # before any model loads: an existing file is one line at once
    # Every argument is checked and the job built before torch is imported (seconds): a usage
    # error is one line at once.
    if from_image is not None:
        prof, job, notes = _from_image(Path(from_image), profile, catalog, lora_dirs)
    else:
        prof, job, notes = _from_options(prompt, profile, lora_specs, catalog, lora_dirs, method, sampling, no_triggers)
    for line in notes if not verbosity.quiet() else ():
        click.echo(f"note: {line}", err=True)
    job.sampling.resolved(prof.diffusion)  # the renderer checks it too; here --width 65 fails before torch loads
    profiles.require(prof, ("diffusion",))  # weights not here: one line with the pull command
    from localora.diffusion.render import Renderer

    with Renderer(prof, compile=compiled) as renderer:  # its cache write is done (or its error raised) when generate ends
        result = renderer.render(job)
        cached = result.path  # a failed cache write is its own error line, not --out's
    try:
        if out_path.suffix.lower() == ".png":  # the cached PNG as it is: its pixels and its metadata
            atomic_write(out_path, lambda p: shutil.copyfile(cached, p))
        else:  # another format: Pillow encodes it, without the PNG's metadata
            out_path.parent.mkdir(parents=True, exist_ok=True)
            result.image.save(out_path)
    except OSError as e:
        raise LocaloraError(f"{out_path}: cannot write the image ({e.strerror}); choose another --out") from None
    source = "cache" if result.cached else f"rendered in {result.seconds:.1f}s"
    if renderer.stats.compiles:  # --compile: the warm-up, which result.seconds leaves out
        source += f", compile warm-up {renderer.stats.compile_seconds:.1f}s"
    click.echo(f"{out_path}  ({job.method}, seed {job.sampling.seed}, {source})")


DEFAULT_OUT = Path("render.png")


def output_path(out: str | None, force: bool) -> Path:
    """Where generate writes: --out, refused when that file exists (an image or any other file)
    unless --force; without --out, render.png or the first free render-N.png beside it."""
    if out is None:
        path, n = DEFAULT_OUT, 1
        while path.exists() and not force:
            n += 1
            path = DEFAULT_OUT.with_name(f"{DEFAULT_OUT.stem}-{n}{DEFAULT_OUT.suffix}")
        return path
    path = Path(out)
    if path.exists() and not force:
        raise LocaloraError(f"{path}: the file exists; give --force to overwrite it, or another --out")
    from PIL import Image

    if path.suffix.lower() not in Image.registered_extensions():
        raise LocaloraError(f"{path}: '{path.suffix}' is not an image format Pillow writes; give a .png (with its "
                            f"metadata) or e.g. .jpg, .webp")
    return path


def _from_options(prompt, profile, lora_specs, catalog, lora_dirs, method, sampling, no_triggers):
    from localora.diffusion import loras, methods
    from localora.diffusion.job import RenderJob
    from localora.profiles import load_profile

    if prompt is None:
        raise LocaloraError("generate needs a PROMPT (or --from IMAGE.png)")
    prof = load_profile(profile)
    request = resolve_request(prof, lora_specs, catalog, lora_dirs, prompt)
    choices, prompt = request.choices, request.prompt
    if not choices:
        raise LocaloraError("generate needs a LoRA: give --lora NAME, or a <lora:NAME> tag in the prompt")
    chosen, weights = methods.arrange(method, [c.lora for c in choices],
                                      [1.0 if c.weight is None else c.weight for c in choices])
    blocks = methods.arrange_blocks(method, [c.lora for c in choices], request.blocks)
    text = prompt if no_triggers else loras.with_triggers(prompt, list(chosen))
    return prof, RenderJob(prompt=text, loras=chosen, weights=weights, method=method, sampling=sampling,
                           blocks=blocks), ()


def _from_image(path: Path, profile, catalog, lora_dirs):
    from localora import profiles
    from localora.diffusion.job import RenderJob
    from localora.export import read_source
    from localora.export.replay import replay

    ctx = click.get_current_context()
    given = [name for name in _FROM_TAKES
             if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)]
    if given:
        flags = ", ".join("PROMPT" if n == "prompt" else "--" + n.replace("_", "-").removesuffix("-specs")
                          for n in given)
        raise LocaloraError(f"--from takes every setting from the image; leave out {flags}")
    source = read_source(path)
    if source.info is not None and profile is None:
        profile = source.info.profile
    prof = profiles.load_profile(profile)
    again = replay(source, prof, *lora_sources(prof, catalog, lora_dirs))
    job = RenderJob(prompt=again.prompt, loras=again.loras, weights=again.weights, method=again.method,
                    sampling=again.sampling, blocks=again.blocks)
    return prof, job, again.notes


COMMANDS = [generate]
