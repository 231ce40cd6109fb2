"""The `localora` command line: one module per command group, thin layers over the runs and
components below them.

    cli/__init__.py   the group (-v/--quiet), one error line instead of a traceback, exit codes
    cli/options.py    options shared by several commands, --json output, shell completion
    cli/render.py     generate
    cli/compose.py    compose, demo, open
    cli/models.py     models, loras inspect, loras list
    cli/vlm.py        ask, doctor
    cli/evaluate.py   score, judge, bench, report, judge-agreement
    cli/export.py     export (to A1111, ComfyUI, diffusers)
"""

from __future__ import annotations

import sys

import click

from localora import verbosity
from localora.errors import EXIT_CODES, FAILED, INTERRUPTED, LocaloraError


class _Cli(click.Group):
    """Prints a LocaloraError, a full, read-only or misplaced folder, or an out-of-memory as one
    line and exits with its code (errors.EXIT_CODES), instead of a traceback. Files already
    written stay whole (every write is atomic)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LocaloraError as e:
            _fail(str(e), e.code)
        except KeyboardInterrupt:  # click would say "Aborted!" and exit 1; compose and bench say more first
            click.echo("\ninterrupted", err=True)
            sys.exit(INTERRUPTED)
        except OSError as e:
            from localora.files import storage_error

            error = storage_error(e, _hint(e.filename))
            if error is None:
                raise
            _fail(str(error), FAILED)
        except RuntimeError as e:
            if not _out_of_memory(e):
                raise
            _fail(f"out of accelerator memory ({str(e).splitlines()[0][:120]}); try --batch 1, a smaller "
                  f"--width/--height, or placement = \"swap\" in the profile (localora doctor tells the estimate)",
                  FAILED)


def _fail(line: str, code: int) -> None:
    click.echo(f"error: {line}", err=True)
    sys.exit(code)


def _out_of_memory(e: BaseException) -> bool:
    # Only a command that loaded torch can run out of accelerator memory; never import it here.
    if "torch" not in sys.modules:
        return False
    from localora.diffusion.rows import is_out_of_memory

    return is_out_of_memory(e)


def _hint(filename: object) -> str:
    from pathlib import Path

    from localora import paths

    home = paths.home()
    if filename is not None and (Path(str(filename)) == home or home in Path(str(filename)).parents):
        return f"free space or fix its permissions, or set LOCALORA_HOME to another folder (now {home})"
    return "free space or fix its permissions, or choose another folder (--out)"


# \b keeps click from rewrapping the table.
EPILOG = "\b\nExit status:\n" + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES.items())


@click.group(cls=_Cli, epilog=EPILOG)
@click.version_option(package_name="localora")
@click.option("--verbose", "-v", is_flag=True, help="Show library warnings and logging, and timings per stage.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the result lines and errors (no progress, no notes).")
def main(verbose: bool, quiet: bool) -> None:
    """Find how to combine several LoRAs, locally: render, let a local VLM look, refine."""
    if verbose and quiet:
        raise click.UsageError("--verbose and --quiet exclude each other; give one")
    verbosity.set_level(verbosity.VERBOSE if verbose else verbosity.QUIET if quiet else verbosity.NORMAL)


def _register() -> None:
    from localora.cli import compose, evaluate, export, models, render, vlm

    for module in (render, compose, models, vlm, evaluate, export):
        for command in module.COMMANDS:
            main.add_command(command)


_register()
