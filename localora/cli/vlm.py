"""`localora ask` (one question to the profile's VLM) and `localora doctor` (what this machine has)."""

from __future__ import annotations

import platform
import sys

import click

from localora import package_version, profiles
from localora.estimates import ACTIVATIONS, BASIS, CUDA_CONTEXT_GIB, GIB, estimate_gib
from localora.vlm import schemas
from localora.errors import LocaloraError

JSON_KINDS = ("weights", "candidates", "choice", "judge", "feedback", "refine")


def _lora_names(loras: str | None, kind: str) -> list[str]:
    if loras is None:
        raise LocaloraError(f"--json {kind} needs --loras: a count (3) or names separated by commas (a,b,c)")
    if loras.strip().isdigit():
        return [f"lora_{i}" for i in range(1, int(loras) + 1)]
    return [n.strip() for n in loras.split(",") if n.strip()]


def _schema(kind: str, loras: str | None, lo: float, hi: float, m: int, options: int, max_chars: int) -> schemas.Schema:
    if kind == "choice":
        return schemas.choice(options)
    if kind == "judge":
        return schemas.judge_scores()
    if kind == "feedback":
        return schemas.feedback(max_chars)
    names = _lora_names(loras, kind)
    if kind == "weights":
        return schemas.weights(names, lo, hi)
    if kind == "candidates":
        return schemas.candidates(names, m, lo, hi)
    return schemas.refine(names, lo, hi, max_chars)


def _quiet_transformers() -> None:
    # Loading bars from the tiny build and from_pretrained would bury a one-line answer.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@click.command()
@click.argument("question")
@click.option("--profile", "profile_name", default=None, help="Profile from models.toml.")
@click.option("--image", "images", multiple=True, help="An image to show, in order (repeatable).")
@click.option("--system", default=None, help="System message (default: the model's own).")
@click.option("--json", "kind", type=click.Choice(JSON_KINDS), default=None, help="Constrained JSON answer.")
@click.option("--loras", default=None, help="weights/candidates/refine: a LoRA count or comma-separated names.")
@click.option("--lo", type=float, default=0.0, show_default=True, help="Lowest allowed weight.")
@click.option("--hi", type=float, default=1.5, show_default=True, help="Highest allowed weight.")
@click.option("-m", "--candidates", "m", type=int, default=5, show_default=True, help="candidates: how many.")
@click.option("--options", type=int, default=None, help="choice: how many options (default: the number of images).")
@click.option("--max-chars", type=int, default=600, show_default=True, help="feedback/refine: longest free text.")
@click.option("--temperature", type=click.FloatRange(min=0), default=None, help="Sample at this temperature (default: greedy).")
@click.option("--seed", type=int, default=None, help="Seed for sampling (default 0).")
@click.option("--max-new-tokens", type=int, default=None, help="Cap on the answer's length in tokens.")
@click.option("--stats", is_flag=True, help="Also print token counts and time to stderr.")
def ask(question, profile_name, images, system, kind, loras, lo, hi, m, options, max_chars, temperature, seed,
        max_new_tokens, stats) -> None:
    """Ask the profile's VLM QUESTION about the --image files; Picture 1 is the first --image."""
    from localora.devices import DeviceManager
    from localora.vlm.model import VLM, load_image

    schema = None
    if kind:
        schema = _schema(kind, loras, lo, hi, m, options if options is not None else len(images), max_chars)
        question = f"{question}\n{schema.describe()}"
    pictures = [load_image(p) for p in images]  # bad files fail before any model loads
    profile = profiles.load_profile(profile_name)
    _quiet_transformers()
    vlm = VLM(profile.vlm, devices=DeviceManager.for_profile(profile))
    answer = vlm.chat(system, pictures, question, schema=schema, temperature=temperature, seed=seed,
                      max_new_tokens=max_new_tokens)
    click.echo(answer.text)
    if stats:
        click.echo(f"{answer.prompt_tokens} prompt tokens, {answer.new_tokens} new tokens, "
                   f"{answer.seconds:.2f} s ({answer.new_tokens / max(answer.seconds, 1e-9):.0f} tokens/s)", err=True)


# ------------------------------------------------------------------ doctor

def _gpu_line() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no GPU (torch.cuda.is_available() is False)"
    free, total = torch.cuda.mem_get_info()
    return f"{torch.cuda.get_device_name()}: {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB"


@click.command()
@click.option("--profile", "profile_name", default=None, help="Profile to check (default: the default one).")
def doctor(profile_name) -> None:
    """Versions, GPU, which weights of a profile are here, and its estimated peak GPU memory."""
    import torch

    profile = profiles.load_profile(profile_name)
    click.echo(f"python {platform.python_version()}")
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    click.echo(f"torch {torch.__version__} ({cuda}; CUDA available: {'yes' if torch.cuda.is_available() else 'no'})")
    for package in ("transformers", "diffusers", "bitsandbytes", "xgrammar", "open_clip_torch"):
        click.echo(f"{package} {package_version(package)}")
    click.echo(f"GPU: {_gpu_line()}")

    click.echo(f"profile {profile.name} (placement {profile.placement}, device {profile.device})")
    sources = [("diffusion", profile.diffusion.name, profile.diffusion.source)]
    if profile.diffusion.vae:
        sources.append(("vae", profile.diffusion.vae, profile.diffusion.vae))
    sources += [("vlm", profile.vlm.name, profile.vlm.source), ("clip", profile.clip.name, profile.clip.source)]
    missing = []
    for role, name, source in sources:
        state = profiles.availability(source)
        click.echo(f"  {role:9} {name}: {state}")
        missing += [name] if state.startswith("missing") else []

    sizes = estimate_gib(profile)
    known = {n: s for n, s in sizes.items() if s is not None}
    one_at_a_time, together = max(known.values(), default=0.0), sum(known.values())
    unknown = [n for n, s in sizes.items() if s is None]
    click.echo(f"estimated peak GPU memory: {together + CUDA_CONTEXT_GIB:.1f} GiB with every model resident, "
               f"{one_at_a_time + CUDA_CONTEXT_GIB:.1f} GiB one at a time"
               + (f" (not counting {', '.join(unknown)}: size unknown)" if unknown else ""))
    click.echo("  " + ", ".join(f"{n} {'?' if s is None else f'{s:.1f}'} GiB" for n, s in sizes.items()))
    click.echo(f"  basis: {BASIS}")
    click.echo(f"placement {profile.placement}: {_placement_line(profile, known)}")
    if missing:
        click.echo(f"error: {', '.join(missing)} not here; fetch with `localora pull {profile.name}` "
                   f"(on a connected machine, then copy the Hugging Face cache)", err=True)
        sys.exit(3)


def _placement_line(profile: profiles.Profile, gib: dict[str, float]) -> str:
    """What the device manager's `auto` will do on this machine with these models."""
    import psutil
    import torch

    from localora.devices import plan_for

    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    # The estimates include working memory; plan_for adds its own reserve to the weights.
    plan = plan_for({n: int(g * GIB / ACTIVATIONS) for n, g in gib.items()}, free, psutil.virtual_memory().available)
    return {
        "resident": "all models fit together: they stay on the GPU",
        "moving": "one model at a time fits: the others wait in CPU RAM and are moved, never reloaded",
        "reload": "one model at a time fits, but CPU RAM cannot hold the others: set placement = \"reload\" "
                  "(evicted models are loaded again from disk)",
        "too large": "even the largest model alone does not fit: use a smaller profile (e.g. sdxl-realistic-small)",
    }.get(plan, plan)


COMMANDS = [ask, doctor]
