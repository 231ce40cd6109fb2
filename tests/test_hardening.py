"""Issue 16, "wrong or unsafe" and "config that lies": files get the umask's mode, LoRA files that
lie about what they hold, pickle-free model loading, config files that are checked when read,
and a demo that opens no network connection. Every bad input is one error line."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from localora.cli import main
from support import one_error_line


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


# ------------------------------------------------------------------ file modes

@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_mode_the_umask_gives(tmp_path, umask):
    from localora.files import atomic_write, write_json

    old = os.umask(umask)
    try:
        write_json(tmp_path / "run.json", {"a": 1})
        atomic_write(tmp_path / "images" / "x.png", lambda p: Image.new("RGB", (4, 4)).save(p))
        plain = tmp_path / "plain.txt"
        plain.write_text("as open() makes it")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for name in ("run.json", "images/x.png", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name
