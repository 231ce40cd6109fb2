"""`localora models` (the profiles and whether their weights are here), `localora loras inspect`
and `localora loras list` (what the LoRA folders hold)."""

from __future__ import annotations

from pathlib import Path

import click

from localora.cli.options import lora_dir_option


@click.command()
def models():
    """List the profiles of models.toml and whether each model is available here."""
    from localora import paths, profiles

    cat = profiles.load_catalog()
    click.echo(f"profiles in {cat.path} (default: {cat.default_profile})")
    click.echo(f"your own copies go in {paths.config_dir()}: models.toml, prompts/NAME.txt")
    user = paths.read_config()
    sets = "; ".join(f"{k} = {v}" for k, v in user.settings().items())
    state = sets if sets else ("sets nothing" if user.path.is_file() else "not there")
    click.echo(f"your defaults: {user.path} ({state})")
    for p in cat.profiles.values():
        click.echo(f"\n{p.name}: {p.description}")
        for kind, spec in (("diffusion", p.diffusion), ("vlm", p.vlm), ("clip", p.clip)):
            click.echo(f"  {kind:<9} {spec.name:<22} {profiles.availability(spec.source, kind)}")
            if kind == "diffusion" and spec.vae:
                click.echo(f"  {'vae':<9} {spec.vae:<22} {profiles.availability(spec.vae, 'vae')}")


@click.command()
@click.argument("profile")
def pull(profile):
    """Download PROFILE's models into the Hugging Face cache (resumable), for offline use later.

    Run it on a connected machine, then copy the cache (~/.cache/huggingface/hub) to the offline
    one. Tiny models are built instead; local folders are left alone.
    """
    from localora import hub, profiles

    for path in hub.pull(profiles.load_profile(profile), click.echo):
        click.echo(str(path))


@click.group()
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


@loras.command("list")
@lora_dir_option
def loras_list(lora_dirs):
    """List the LoRA files in the LoRA folders, by the name to give to --lora or <lora:NAME>.

    The folders are searched in this order: --lora-dir, $LOCALORA_LORA_DIRS, then lora_dirs in
    config.toml; a name found in an earlier folder hides the same name in a later one.
    """
    from collections import Counter

    from localora.diffusion import loras as loralib

    folders = loralib.lora_folders(lora_dirs)
    if not folders.dirs:
        click.echo(folders.describe())
        return
    for folder in folders.dirs:
        files = folders.files(folder)
        state = "" if folder.path.is_dir() else ", missing"
        click.echo(f"{folder.path}  ({folder.source}{state}): {len(files)} LoRA file{'s' * (len(files) != 1)}")
        stems = Counter(f.stem.lower() for f in files)
        for f in files:
            rel = f.relative_to(folder.path)
            # A stem two files share is ambiguous: such a file is named by its subfolder path, or,
            # at the top of the folder, by its full path.
            if stems[f.stem.lower()] == 1:
                name = f.stem
            else:
                name = rel.with_suffix("").as_posix() if len(rel.parts) > 1 else "(ambiguous: give its path)"
            click.echo(f"  {name:<32} {rel.as_posix()}")


COMMANDS = [models, pull, loras]
