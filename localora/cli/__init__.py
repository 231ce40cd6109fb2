"""The `localora` command line: one module per command group, thin layers over the runs and
components below them.

    cli/__init__.py   the group, and one error line instead of a traceback
    cli/options.py    options shared by several commands
    cli/render.py     generate
    cli/compose.py    compose, demo, open
    cli/models.py     models, loras inspect
    cli/vlm.py        ask, doctor
    cli/evaluate.py   score, judge, bench, report
"""

from __future__ import annotations

import sys

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


def _register() -> None:
    from localora.cli import compose, evaluate, models, render, vlm

    for module in (render, compose, models, vlm, evaluate):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
