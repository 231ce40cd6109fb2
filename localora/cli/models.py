"""`localora models` (the profiles and whether their weights are here), `localora loras inspect`
and `localora loras list` (what the LoRA folders hold)."""

from __future__ import annotations

from pathlib import Path

import click

from localora import verbosity
from localora.cli.options import emit, json_option, lora_dir_option, vlm_option


@click.command()
@json_option
def models(as_json):
    """List the profiles of models.toml and whether each model is available here."""
    from localora import paths, profiles

    cat = profiles.load_catalog()
    user = paths.read_config()
    data = {"models_toml": str(cat.path), "default_profile": cat.default_profile, "config_dir": str(paths.config_dir()),
            "config": {"path": str(user.path), "exists": user.path.is_file(), "settings": user.settings()},
            "profiles": []}
    for p in cat.profiles.values():
        # A model not in the Hugging Face cache is two words; the profile says once how to get them all.
        models = [{"role": role, "name": name, "source": source, "availability": profiles.listed(profiles.availability(source, role))}
                  for role, name, source in profiles.model_sources(p)]
        uncached = [m for m in models if m["availability"] == profiles.NOT_DOWNLOADED]
        data["profiles"].append({"name": p.name, "description": p.description, "models": models,
                                 "fetch": f"localora pull {p.name}" if uncached else None})
    sets = "; ".join(f"{k} = {v}" for k, v in user.settings().items())
    state = sets if sets else ("sets nothing" if user.path.is_file() else "not there")
    lines = [f"profiles in {data['models_toml']} (default: {data['default_profile']})",
             f"your own copies go in {data['config_dir']}: models.toml, prompts/NAME.txt",
             f"your defaults: {user.path} ({state})"]
    for p in data["profiles"]:
        lines += [f"\n{p['name']}: {p['description']}"]
        lines += [f"  {m['role']:<9} {m['name']:<22} {m['availability']}" for m in p["models"]]
        if p["fetch"]:
            lines.append(f"  fetch its models once with: {p['fetch']}")
    emit(as_json, data, lines)


@click.command()
@click.argument("profile")
@vlm_option
def pull(profile, vlm):
    """Download PROFILE's models into the Hugging Face cache (resumable), for offline use later.

    Run it on a connected machine, then copy the cache (~/.cache/huggingface/hub) to the offline
    one. Tiny models are built instead; local folders are left alone. --vlm NAME fetches that VLM
    in place of the profile's.
    """
    from localora import hub, profiles

    progress = (lambda line: None) if verbosity.quiet() else click.echo
    for path in hub.pull(profiles.load_profile(profile, vlm=vlm), progress):
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
        ("format", {"kohya": "kohya-ss", "xlabs": "XLabs"}.get(info.format, "diffusers/peft")),
        ("base", f"{loralib.ARCH_NAMES[info.arch]} ({info.arch_evidence})" if info.arch else f"unknown ({info.arch_evidence})"),
        ("rank", str(info.rank)),
        ("alpha", f"{info.alpha:g} (scale {info.alpha / info.rank:g})" if info.alpha is not None else "= rank (scale 1)"),
        ("layers", f"{info.layers} in {', '.join(info.components)}"),
        ("targets", ", ".join(info.targets)),
        ("blocks", info.blocks or "(not named by blocks)"),
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
