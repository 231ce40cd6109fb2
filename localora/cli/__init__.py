"""The `localora` command line: one module per command group, thin layers over the runs and
components below them.

    cli/__init__.py   the group, and one error line instead of a traceback
    cli/options.py    options shared by several commands
    cli/render.py     generate
    cli/compose.py    compose, demo, open
    cli/models.py     models, loras inspect
    cli/vlm.py        ask, doctor
    cli/evaluate.py   score, judge, bench, report
    cli/export.py     export (to A1111, ComfyUI, diffusers)
"""

from __future__ import annotations

import sys

import click

from localora.errors import LocaloraError


class _Cli(click.Group):
    """Prints a LocaloraError, or a full, read-only or misplaced folder, as one line and exits 2,
    instead of a traceback. Files already written stay whole (every write is atomic)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LocaloraError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:
            from localora.files import storage_error

            line = storage_error(e, _hint(e.filename))
            if line is None:
                raise
            click.echo(f"error: {line}", err=True)
            sys.exit(2)


def _hint(filename: object) -> str:
    from pathlib import Path

    from localora import paths

    home = paths.home()
    if filename is not None and (Path(str(filename)) == home or home in Path(str(filename)).parents):
        return f"free space or fix its permissions, or set LOCALORA_HOME to another folder (now {home})"
    return "free space or fix its permissions, or choose another folder (--out)"


@click.group(cls=_Cli)
@click.version_option(package_name="localora")
def main() -> None:
    """Find how to combine several LoRAs, locally: render, let a local VLM look, refine."""


def _register() -> None:
    from localora.cli import compose, evaluate, export, models, render, vlm

    for module in (render, compose, models, vlm, evaluate, export):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
