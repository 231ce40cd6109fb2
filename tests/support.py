"""Assertions shared by the CLI tests."""

from __future__ import annotations


BUILDING = "localora: building the tiny models once"


def one_error_line(result, *fragments: str) -> None:
    """A user error: non-zero exit, exactly one line 'error: ...' naming the fragments, no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    # The first use of a tiny profile in a fresh home says, before the error, that it builds the
    # tiny models (cli/options.announce_tiny_build): true, and no part of the error.
    lines = [ln for ln in result.output.splitlines() if ln.strip() and not ln.startswith(BUILDING)]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for f in fragments:
        assert f in lines[0], lines[0]


# Runs `localora ARGS` in a fresh interpreter, then reports which heavy libraries the command loaded.
_PROBE = """
import json, runpy, sys
sys.argv = ["localora", *sys.argv[1:]]
try:
    runpy.run_module("localora", run_name="__main__")
except SystemExit as e:
    code = e.code
print("\\n" + json.dumps({"code": code, "heavy": [m for m in HEAVY if m in sys.modules]}), file=sys.stderr)
"""
HEAVY = ("torch", "diffusers", "transformers")


def heavy_imports(*args, env: dict | None = None) -> tuple[int, list[str], str]:
    """(exit code, heavy modules loaded, stdout) of `localora ARGS` run in a subprocess."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{_PROBE}", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    return report["code"], report["heavy"], proc.stdout
