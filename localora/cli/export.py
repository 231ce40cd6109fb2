"""`localora export`: a render's settings for A1111/Forge, ComfyUI or diffusers."""

from __future__ import annotations

from pathlib import Path

import click

from localora.cli.options import catalog_option, lora_dir_option, lora_sources, profile_option
from localora.errors import LocaloraError
from localora.export import TARGETS


@click.command("export")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--to", "target", type=click.Choice([*TARGETS, "lora"]), required=True,
              help="a1111: the prompt with <lora:...> tags and the settings line; comfyui: the API-format "
                   "workflow (Merge renders); diffusers: a Python script that redoes the render; lora: the "
                   "LoRAs baked at the image's weights into one kohya .safetensors to use at weight 1.0.")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file instead of printing (--to lora: default SOURCE-NAME-baked.safetensors "
                   "in the current folder).")
@profile_option
@catalog_option
@lora_dir_option
def export_command(source, target, out, profile, catalog, lora_dirs):
    """Export SOURCE (a run folder: its final.png; or a PNG localora wrote) to another tool.

    The PNG's own metadata says what to export: every PNG localora writes carries A1111's infotext
    (and, for a Merge, a ComfyUI graph), so it also opens directly in A1111's PNG Info or ComfyUI.
    --to lora finds the LoRA files by sha256 (in the run folder, a catalog or a --lora-dir) and
    loads the image's profile.
    """
    from localora.export import export, read_source
    from localora.files import atomic_write

    if target == "lora":
        click.echo(_bake(read_source(source), out, profile, catalog, lora_dirs))
        return
    text = export(read_source(source), target)
    if out is None:
        click.echo(text, nl=False)
        return
    try:
        atomic_write(out, lambda p: p.write_text(text, encoding="utf-8"))
    except OSError as e:
        raise LocaloraError(f"{out}: cannot write the export ({e.strerror}); choose another -o") from None
    click.echo(f"{out}  ({target})")


def _bake(source, out: Path | None, profile: str | None, catalog, lora_dirs) -> str:
    from localora import profiles
    from localora.export.targets import to_lora

    info = source.localora()
    prof = profiles.load_profile(profile or info.profile)
    if out is None:
        name = source.run_dir.name if source.run_dir is not None and source.path.name == "final.png" else source.path.stem
        out = Path(f"{name}-baked.safetensors")
    return to_lora(source, out, prof, *lora_sources(prof, catalog, lora_dirs))


COMMANDS = [export_command]
