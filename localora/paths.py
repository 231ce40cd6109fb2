"""Where localora keeps things on disk."""

from __future__ import annotations

import os
from pathlib import Path

# The shipped models.toml and prompts/ are package data.
PACKAGE_DIR = Path(__file__).resolve().parent


def home() -> Path:
    """$LOCALORA_HOME, default ~/.cache/localora: tiny models, render cache, few-shot library."""
    return Path(os.environ.get("LOCALORA_HOME", Path.home() / ".cache" / "localora")).expanduser()


def render_cache_dir() -> Path:
    return home() / "renders"


def prompts_dir() -> Path:
    return PACKAGE_DIR / "prompts"


def models_toml() -> Path:
    """$LOCALORA_MODELS if set, else the models.toml shipped with the project."""
    env = os.environ.get("LOCALORA_MODELS")
    return Path(env).expanduser() if env else PACKAGE_DIR / "models.toml"
