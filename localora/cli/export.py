"""`localora export`: a render's settings for A1111/Forge, ComfyUI or diffusers."""

from __future__ import annotations

from pathlib import Path

import click

from localora.errors import LocaloraError
from localora.export import TARGETS


@click.command("export")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--to", "target", type=click.Choice(list(TARGETS)), required=True,
              help="a1111: the prompt with <lora:...> tags and the settings line; comfyui: the API-format "
                   "workflow (Merge renders); diffusers: a Python script that redoes the render.")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file instead of printing.")
def export_command(source, target, out):
    """Export SOURCE (a run folder: its final.png; or a PNG localora wrote) to another tool.

    The PNG's own metadata says what to export: every PNG localora writes carries A1111's infotext
    (and, for a Merge, a ComfyUI graph), so it also opens directly in A1111's PNG Info or ComfyUI.
    """
    from localora.export import export, read_source
    from localora.files import atomic_write

    text = export(read_source(source), target)
    if out is None:
        click.echo(text, nl=False)
        return
    try:
        atomic_write(out, lambda p: p.write_text(text, encoding="utf-8"))
    except OSError as e:
        raise LocaloraError(f"{out}: cannot write the export ({e.strerror}); choose another -o") from None
    click.echo(f"{out}  ({target})")


COMMANDS = [export_command]
