"""Options shared by several commands, each defined once (as simonw/llm does).

    @profile_option          --profile/-p
    @vlm_option              --vlm NAME (a [vlm.NAME] of models.toml instead of the profile's VLM)
    @catalog_option          --catalog (repeatable)
    @lora_option(help)       --lora/-l NAME_OR_PATH[:WEIGHT] (repeatable)
    @lora_dir_option         --lora-dir DIR (repeatable)  ->  lora_dirs
    @plain_option            --plain
    @batch_option            --batch N
    @compile_option          --compile  ->  compiled (torch.compile the denoiser; diffusion/compiling.py)
    @sampling_options        --seed --steps --guidance --width --height --negative  ->  sampling=Sampling(...)
    @json_option             --json  ->  as_json; then emit(as_json, data, human_lines)

config.toml's defaults for options not given are read here: weight_bounds (--bounds) and
run_parent (where --out-less run folders go). Its default_profile is applied where models.toml
is read (profiles.load_catalog), so every command's --profile follows it.

Completion (click's shell_complete=, so `_LOCALORA_COMPLETE=bash_source localora` works):
complete_profiles and complete_loras read models.toml, the catalogs and the LoRA folders only,
never a model, so a Tab press answers at once and imports no torch.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
from click.shell_completion import CompletionItem

from localora.diffusion.loras import LoraChoice
from localora.diffusion.sampling import Sampling
from localora.errors import LocaloraError


# ------------------------------------------------------------------ completion

def profile_names() -> list[str]:
    """The profiles of models.toml; none when it cannot be read (completion must never fail)."""
    from localora import profiles

    try:
        return list(profiles.load_catalog().profiles)
    except LocaloraError:
        return []


def complete_profiles(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    return [CompletionItem(n) for n in profile_names() if n.startswith(incomplete)]


def lora_names(profile_name: str | None = None, catalogs: Iterable[str] = (), lora_dirs: Iterable[str] = ()) -> list[str]:
    """What --lora takes as a bare name: catalog entries, then file stems in the LoRA folders (by
    'sub/stem' where a stem repeats in a folder). Reads TOML and lists folders; builds nothing."""
    from localora import paths, profiles, tiny
    from localora.diffusion import loras

    names: list[str] = []
    try:
        prof = profiles.load_catalog().get(profile_name)
        demo = f"loras-{prof.diffusion.arch}"
        cats = [tiny.root() / demo / "catalog.toml"] if profiles.is_tiny(prof.diffusion.source) and tiny.is_built(demo) else []
    except LocaloraError:
        cats = []
    user = paths.home() / "loras.toml"
    for cat in cats + ([user] if user.is_file() else []) + [Path(c) for c in catalogs]:
        try:
            names += loras.read_catalog(cat)
        except LocaloraError:
            continue
    try:
        folders = loras.lora_folders([d for d in lora_dirs if Path(d).expanduser().is_dir()])
    except LocaloraError:
        return list(dict.fromkeys(names))
    for folder in folders.dirs:
        files = folders.files(folder)
        stems = [f.stem.lower() for f in files]
        for f in files:
            rel = f.relative_to(folder.path).with_suffix("")
            names.append(f.stem if stems.count(f.stem.lower()) == 1 else rel.as_posix())
    return list(dict.fromkeys(names))


def vlm_names() -> list[str]:
    """The [vlm.NAME] tables of models.toml; none when it cannot be read."""
    from localora import profiles

    try:
        return list(profiles.load_catalog().vlms)
    except LocaloraError:
        return []


def complete_vlms(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    return [CompletionItem(n) for n in vlm_names() if n.startswith(incomplete)]


def complete_loras(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """--lora NAME: the names for the --profile, --catalog and --lora-dir given so far; a path is
    left to the shell's file completion, and nothing is offered once a :WEIGHT is being typed."""
    if ":" in incomplete:
        return []
    if incomplete.startswith((".", "/", "~")) or "\\" in incomplete:
        return [CompletionItem(incomplete, type="file")]
    p = ctx.params
    names = lora_names(p.get("profile"), p.get("catalog") or (), p.get("lora_dirs") or ())
    low = incomplete.lower()
    return [CompletionItem(n) for n in names if n.lower().startswith(low)]


def complete_testbeds(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """bench --testbed: the shipped testbeds by name; a .toml path is left to the shell."""
    from localora.bench import testbeds

    if "/" in incomplete or incomplete.endswith(".toml"):
        return [CompletionItem(incomplete, type="file")]
    return [CompletionItem(n) for n in testbeds.names() if n.startswith(incomplete)]


# ------------------------------------------------------------------ the options

profile_option = click.option("--profile", "-p", default=None, shell_complete=complete_profiles,
                              help="Profile from models.toml (default: default_profile in config.toml, else models.toml's, `tiny`).")
catalog_option = click.option("--catalog", multiple=True, type=click.Path(dir_okay=False),
                              help="LoRA catalog TOML ([loras.NAME] file/category/triggers); repeatable.")
vlm_option = click.option("--vlm", "vlm", default=None, metavar="NAME", shell_complete=complete_vlms,
                          help="A [vlm.NAME] of models.toml instead of the profile's VLM: any family (Qwen2-VL, "
                               "Qwen2.5-VL, Qwen3-VL, Gemma 3) with any profile; `localora models` lists them.")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON document on stdout instead of the lines (same numbers).")
lora_dir_option = click.option(
    "--lora-dir", "lora_dirs", multiple=True, metavar="DIR",
    help="A folder of .safetensors LoRAs (A1111 models/Lora, ComfyUI models/loras): a bare name is a file "
         "stem there, subfolders included; repeatable, searched before $LOCALORA_LORA_DIRS and config.toml.")


def ray_options(command):
    """--ray [ADDRESS], --workers, --worker-cpus: the work spread over a Ray cluster (localora/cluster.py)."""
    for option in reversed((
        click.option("--ray", "ray", default=None, is_flag=False, flag_value="auto", metavar="[ADDRESS]",
                     help="Run on a Ray cluster: auto (the default) joins the one `ray start` runs here, local starts "
                          "one on this machine, HOST:PORT joins that head. Needs pip install \"localora[ray]\"."),
        click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="--ray: at most this many workers (default: one per GPU; with no GPU, one per "
                          "--worker-cpus CPUs)."),
        click.option("--worker-cpus", type=click.IntRange(min=1), default=1, show_default=True,
                     help="--ray on CPUs: cores (torch threads) per worker."),
    )):
        command = option(command)
    return command


def check_ray_options(ray: str | None, workers: int | None, worker_cpus: int) -> None:
    if ray is None and (workers is not None or worker_cpus != 1):
        raise LocaloraError("--workers and --worker-cpus size the Ray workers; add --ray (or drop them)")


plain_option = click.option("--plain", is_flag=True, help="One log line per event instead of the live view.")
batch_option = click.option("--batch", type=click.IntRange(min=0), default=0, show_default=True,
                            help="Merge renders per UNet batch (0: as many as free memory holds; an "
                                 "out-of-memory batch is split and retried). Results are the same.")
compile_option = click.option(
    "--compile", "compiled", is_flag=True,
    help="torch.compile the denoiser (UNet or transformer) where it loads: the first render pays a warm-up "
         "(minutes on a CPU; again for each new batch shape or LoRA set), shown apart from render times. "
         "Images equal eager ones up to float rounding. Needs a C++ compiler on a CPU, Triton on a GPU.")


def lora_option(help: str, required: bool = False, metavar: str = "NAME_OR_PATH[:WEIGHT][:lbw=BLOCKS]"):
    return click.option("--lora", "-l", "lora_specs", multiple=True, required=required, metavar=metavar, help=help,
                        shell_complete=complete_loras)


def emit(as_json: bool, data: Any, lines: Iterable[str] = ()) -> None:
    """A command's result: one JSON document on stdout with --json, else the human lines. Both
    come from the same values, so a script reads what a person sees."""
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    for line in lines:
        click.echo(line)


_SAMPLING = (
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of the starting noise."),
    click.option("--steps", type=click.IntRange(min=1), default=None, help="Denoising steps (default: the profile's)."),
    click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale (default: the profile's)."),
    click.option("--width", type=click.IntRange(min=8), default=None, help="Image width, a multiple of 8 (default: the profile's)."),
    click.option("--height", type=click.IntRange(min=8), default=None, help="Image height, a multiple of 8 (default: the profile's)."),
    click.option("--negative", default=None, help="Negative prompt (default: the profile's)."),
)


def sampling_options(command):
    """Add the sampling options; the command receives them as one `sampling` argument."""

    @functools.wraps(command)
    def wrapper(*args, seed, steps, guidance, width, height, negative, switch_every=5, cache_interval=None, **kwargs):
        sampling = Sampling(seed=seed, negative_prompt=negative, steps=steps, guidance=guidance, width=width,
                            height=height, switch_every=switch_every,
                            cache_interval=Sampling().cache_interval if cache_interval is None else cache_interval)
        return command(*args, sampling=sampling, **kwargs)

    for option in reversed(_SAMPLING):
        wrapper = option(wrapper)
    return wrapper


@dataclass(frozen=True)
class LoraRequest:
    """What the command line asks for: the prompt without its <lora:...> tags, and the LoRAs of
    --lora then of the tags, in that order."""

    prompt: str
    choices: list[LoraChoice]
    blocks: tuple[tuple[float, ...] | None, ...] = ()  # per choice: its lbw= vector for the base, or None


def announce_tiny_build(profile) -> None:
    """A tiny profile's first use builds its diffusion model and demo LoRAs here (about 20 s on 2
    cores, printing nothing): say so before it starts, on stderr (stdout may carry --json). Its
    VLM and CLIP are built in a fraction of a second when first loaded, and only by commands that
    load them, so they are not announced."""
    from localora import tiny, verbosity

    missing = tiny.unbuilt([profile.diffusion.source], profile.diffusion.arch)
    if missing and not verbosity.quiet():
        click.echo(f"localora: building the tiny models once, offline (random weights, about 20 s): "
                   f"{', '.join(missing)} in {tiny.root()}", err=True)


def lora_sources(profile, catalogs: tuple[str, ...], lora_dirs: tuple[str, ...] = ()):
    """What LoRA names can mean for this profile: the catalog entries, and the LoRA folders."""
    from localora import profiles
    from localora.diffusion import loras

    announce_tiny_build(profile)  # a tiny profile's demo LoRAs are built here, with its diffusion model
    known = loras.known_loras(profile.diffusion.arch, profiles.is_tiny(profile.diffusion.source),
                              [Path(c) for c in catalogs])
    return known, loras.lora_folders(lora_dirs)


def resolve_request(profile, specs: tuple[str, ...], catalogs: tuple[str, ...], lora_dirs: tuple[str, ...] = (),
                    prompt: str = "") -> LoraRequest:
    """--lora NAME_OR_PATH[:WEIGHT] options and <lora:NAME:WEIGHT> prompt tags -> LoraChoices. A name
    is a catalog entry, else a path, else a file stem in the LoRA folders; the same file twice is an error."""
    from localora.diffusion import loras

    known, folders = lora_sources(profile, catalogs, lora_dirs)
    text, tags = loras.lora_tags(prompt)
    labelled = [(f"--lora {s}", loras.parse_choice(s, known, folders)) for s in specs]
    for name, weight, lbw in tags:
        tag = f"<lora:{name}>" if weight is None else f"<lora:{name}:{weight:g}>"
        tag = tag if lbw is None else f"{tag[:-1]}:lbw={lbw}>"
        labelled.append((f"prompt tag {tag}", loras.choose(name, weight, known, folders, f"prompt tag {tag}", lbw)))
    choices = distinct(labelled)
    return LoraRequest(text, choices, tuple(_blocks_of(profile, label, choice)
                                            for (label, _), choice in zip(labelled, choices)))


def _blocks_of(profile, label: str, choice: LoraChoice) -> tuple[float, ...] | None:
    """A choice's lbw= as the base's block vector (one error line naming where it was written)."""
    from localora.diffusion import blocks

    return None if choice.lbw is None else blocks.parse(choice.lbw, profile.diffusion.arch, label)


def distinct(labelled: list[tuple[str, Any]]) -> list[Any]:
    """The choices, each LoRA once by content (one file under two names would be applied twice) and
    each under its own name: two files sharing a training run's ss_output_name (two epochs) are
    named by their file stems, the names the user gave; what cannot be told apart is one error line."""
    from localora.files import file_hash

    seen: dict[str, tuple[str, Path]] = {}
    for label, choice in labelled:
        path = choice.lora.path.resolve()
        digest = file_hash(path)
        if digest in seen:
            first, where = seen[digest]
            same = f"the same LoRA file ({path})" if where == path else \
                f"the same LoRA: {where} and {path} have the same contents (sha256 {digest[:12]})"
            raise LocaloraError(f"{first} and {label} are {same}; give each LoRA once")
        seen[digest] = (label, path)
    choices = [choice for _, choice in labelled]
    names = [c.lora.name for c in choices]
    for i, c in enumerate(choices):
        if names.count(c.lora.name) > 1 and c.lora.name != c.lora.path.stem:
            choices[i] = replace(c, lora=replace(c.lora, name=c.lora.path.stem))
    by_name: dict[str, str] = {}
    for (label, _), c in zip(labelled, choices):
        if c.lora.name in by_name:
            raise LocaloraError(f"{by_name[c.lora.name]} and {label} are two LoRA files named '{c.lora.name}' "
                                f"({c.lora.path}); rename one of the files, or name them in a catalog")
        by_name[c.lora.name] = f"{label} ({c.lora.path})"
    return choices


def resolve_loras(profile, specs: tuple[str, ...], catalogs: tuple[str, ...],
                  lora_dirs: tuple[str, ...] = ()) -> list[LoraChoice]:
    """--lora NAME_OR_PATH[:WEIGHT] options -> LoraChoice list."""
    return resolve_request(profile, specs, catalogs, lora_dirs).choices


def float_pair(text: str, option: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise LocaloraError(f"{option} {text}: expected MIN,MAX, e.g. 0,1.5") from None
    return lo, hi


DEFAULT_BOUNDS = (0.0, 1.5)


def weight_bounds(text: str | None) -> tuple[float, float]:
    """--bounds MIN,MAX if given, else bounds in config.toml, else 0,1.5."""
    from localora import paths

    if text is not None:
        return float_pair(text, "--bounds")
    return paths.read_config().bounds or DEFAULT_BOUNDS


def run_parent() -> Path:
    """The folder a run folder goes in when --out is not given: out in config.toml, else ./runs."""
    from localora import paths

    return paths.read_config().out or Path("runs")


def float_list(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise LocaloraError(f"{option} {text}: expected numbers separated by commas") from None
