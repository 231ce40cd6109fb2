"""Shared fixtures: one private $LOCALORA_HOME per test session, so tiny models are built once
per run from a clean state and the user's own cache is never touched."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tiny models gain nothing from a second thread, and on a shared 2-core machine two OpenMP
# threads that spin-wait for each other make every op many times slower. Set before torch loads;
# subprocesses of the tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def localora_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("localora-home")
    old = os.environ.get("LOCALORA_HOME")
    os.environ["LOCALORA_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("LOCALORA_HOME", None)
    else:
        os.environ["LOCALORA_HOME"] = old


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
