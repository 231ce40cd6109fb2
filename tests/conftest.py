"""Shared fixtures: one private $LOCALORA_HOME per test session, so tiny models are built once
per run from a clean state and the user's own cache is never touched."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
