"""Where localora keeps things on disk.

    package    localora/models.toml, localora/prompts/*.txt     shipped defaults (package data)
    config     $LOCALORA_CONFIG or the user config dir           a user's own models.toml, prompts/, config.toml
    home       $LOCALORA_HOME or ~/.cache/localora               tiny models, render cache, few-shot library

A user's own copy wins over the shipped one: copy a file into the config dir and edit it there,
so upgrading localora never overwrites it. $LOCALORA_MODELS and --prompts DIR still win over both.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from localora.errors import LocaloraError, check_keys

PACKAGE_DIR = Path(__file__).resolve().parent


def home() -> Path:
    """$LOCALORA_HOME, default ~/.cache/localora: tiny models, render cache, few-shot library."""
    return Path(os.environ.get("LOCALORA_HOME", Path.home() / ".cache" / "localora")).expanduser()


def config_dir() -> Path:
    """$LOCALORA_CONFIG, else the platform's user config folder (~/.config/localora on Linux)."""
    env = os.environ.get("LOCALORA_CONFIG")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("localora"))


def render_cache_dir() -> Path:
    return home() / "renders"


def shipped_prompts_dir() -> Path:
    return PACKAGE_DIR / "prompts"


def user_prompts_dir() -> Path:
    return config_dir() / "prompts"


def models_toml() -> Path:
    """$LOCALORA_MODELS if set, else the user's config-dir copy if there is one, else the shipped one."""
    env = os.environ.get("LOCALORA_MODELS")
    if env:
        return Path(env).expanduser()
    user = config_dir() / "models.toml"
    return user if user.is_file() else PACKAGE_DIR / "models.toml"


# Keys of the user's config.toml; check_keys refuses any other, so a typo is one error line.
CONFIG_KEYS = {"lora_dirs"}


def config_toml() -> Path:
    return config_dir() / "config.toml"


def read_config() -> dict:
    """The user's config.toml (empty when there is none), with its keys checked."""
    path = config_toml()
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise LocaloraError(f"{path}: not valid TOML ({e}); fix or delete it") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LocaloraError(f"{path}: cannot read it ({e}); fix or delete it") from None
    check_keys(data, CONFIG_KEYS, (), str(path))
    return data
