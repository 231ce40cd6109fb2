"""Shared fixtures: one private $LOCALORA_HOME per test session, so tiny models are built once
per run from a clean state and the user's own cache is never touched."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tiny models gain nothing from a second thread, and on a shared 2-core machine two OpenMP
# threads that spin-wait for each other make every op many times slower. Set before torch loads;
# subprocesses of the tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def localora_home(tmp_path_factory):
    """A private $LOCALORA_HOME and an empty $LOCALORA_CONFIG: a developer's own cache,
    ~/.config/localora (models.toml, prompts, config.toml) and $LOCALORA_LORA_DIRS never change
    what the tests see."""
    home = tmp_path_factory.mktemp("localora-home")
    config = tmp_path_factory.mktemp("localora-config")
    old = {k: os.environ.get(k) for k in ("LOCALORA_HOME", "LOCALORA_CONFIG", "LOCALORA_MODELS", "LOCALORA_LORA_DIRS")}
    os.environ["LOCALORA_HOME"] = str(home)
    os.environ["LOCALORA_CONFIG"] = str(config)
    os.environ.pop("LOCALORA_MODELS", None)
    os.environ.pop("LOCALORA_LORA_DIRS", None)
    yield home
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def sdxl_renderer(localora_home):
    from localora.profiles import load_profile
    from localora.diffusion.render import Renderer

    return Renderer(load_profile("tiny"))


@pytest.fixture(scope="session")
def sd15_renderer(localora_home):
    from localora.profiles import load_profile
    from localora.diffusion.render import Renderer

    return Renderer(load_profile("tiny-sd15"))


@pytest.fixture(scope="session")
def demo_loras(localora_home):
    """arch -> the demo LoRAs (character, clothing, style) from the tiny build."""
    from localora import tiny
    from localora.diffusion import loras

    return {arch: list(loras.read_catalog(tiny.ensure(f"loras-{arch}") / "catalog.toml").values())
            for arch in ("sdxl", "sd15")}


@pytest.fixture(scope="session")
def demo(tmp_path_factory, localora_home):
    """`localora demo` from a clean LOCALORA_HOME, then a second demo in the same home: (home, first
    run folder, second run folder). Each run's output (plain: stdout is a pipe) is kept beside its
    folder as demo-N.log. One pair of runs for every test file that reads a finished demo."""
    home = tmp_path_factory.mktemp("clean-home")
    first, second = home.parent / "demo-1", home.parent / "demo-2"
    for out in (first, second):
        env = {**os.environ, "LOCALORA_HOME": str(home), "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "localora", "demo", "--out", str(out)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
        assert proc.returncode == 0, proc.stdout
        out.with_suffix(".log").write_text(proc.stdout)
    return home, first, second
