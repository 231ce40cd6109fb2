"""Assertions shared by the CLI tests."""

from __future__ import annotations


def one_error_line(result, *fragments: str) -> None:
    """A user error: non-zero exit, exactly one line 'error: ...' naming the fragments, no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for f in fragments:
        assert f in lines[0], lines[0]
