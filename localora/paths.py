"""Where localora keeps things on disk."""

from __future__ import annotations

import os
from pathlib import Path

# The project's own editable files (models.toml, prompts/) sit next to the package.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def home() -> Path:
    """$LOCALORA_HOME, default ~/.cache/localora: tiny models, render cache, few-shot library."""
    return Path(os.environ.get("LOCALORA_HOME", Path.home() / ".cache" / "localora")).expanduser()


def render_cache_dir() -> Path:
    return home() / "renders"


def prompts_dir() -> Path:
    return PROJECT_ROOT / "prompts"


def models_toml() -> Path:
    """$LOCALORA_MODELS if set, else the models.toml shipped with the project."""
    env = os.environ.get("LOCALORA_MODELS")
    return Path(env).expanduser() if env else PROJECT_ROOT / "models.toml"
