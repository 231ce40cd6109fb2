"""Where localora keeps things on disk.

    package    localora/models.toml, localora/prompts/*.txt     shipped defaults (package data)
    config     $LOCALORA_CONFIG or the user config dir           a user's own models.toml, prompts/, config.toml
    home       $LOCALORA_HOME or ~/.cache/localora               tiny models, render cache, few-shot library

A user's own copy wins over the shipped one: copy a file into the config dir and edit it there,
so upgrading localora never overwrites it. $LOCALORA_MODELS and --prompts DIR still win over both.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, fields
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


def config_toml() -> Path:
    return config_dir() / "config.toml"


@dataclass(frozen=True)
class UserConfig:
    """The user's config.toml: defaults for options not given. Paths in it are relative to it."""

    path: Path
    lora_dirs: tuple[Path, ...] = ()  # searched after --lora-dir and $LOCALORA_LORA_DIRS
    default_profile: str | None = None  # wins over models.toml's default_profile
    bounds: tuple[float, float] | None = None  # compose --bounds
    out: Path | None = None  # the folder run folders go in (default ./runs)

    def settings(self) -> dict[str, str]:
        """What the file sets, as text, for `localora models`."""
        shown = {"lora_dirs": ", ".join(map(str, self.lora_dirs)) if self.lora_dirs else None,
                 "default_profile": self.default_profile,
                 "bounds": f"{self.bounds[0]:g},{self.bounds[1]:g}" if self.bounds else None,
                 "out": str(self.out) if self.out else None}
        return {k: v for k, v in shown.items() if v is not None}


# Keys of the user's config.toml; check_keys refuses any other, so a typo is one error line.
CONFIG_KEYS = tuple(f.name for f in fields(UserConfig) if f.name != "path")


def read_config() -> UserConfig:
    """The user's config.toml (all unset when there is none), every key checked: an unknown key or
    a wrong type is one line naming the key and the file."""
    path = config_toml()
    if not path.is_file():
        return UserConfig(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise LocaloraError(f"{path}: not valid TOML ({e}); fix or delete it") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LocaloraError(f"{path}: cannot read it ({e}); fix or delete it") from None
    check_keys(data, CONFIG_KEYS, (), str(path))
    here = path.parent
    dirs = data.get("lora_dirs", [])
    if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
        raise LocaloraError(f"{path}: lora_dirs must be a list of folder paths, e.g. lora_dirs = [\"~/models/Lora\"]")
    profile = data.get("default_profile")
    if profile is not None and (not isinstance(profile, str) or not profile):
        raise LocaloraError(f"{path}: default_profile must be a profile name, e.g. default_profile = \"sdxl-realistic\"")
    out = data.get("out")
    if out is not None and (not isinstance(out, str) or not out):
        raise LocaloraError(f"{path}: out must be a folder path, e.g. out = \"~/localora-runs\"")
    return UserConfig(path, lora_dirs=tuple(here / Path(d).expanduser() for d in dirs), default_profile=profile,
                      bounds=_bounds(data["bounds"], path) if "bounds" in data else None,
                      out=here / Path(out).expanduser() if out else None)


def _bounds(value: object, path: Path) -> tuple[float, float]:
    """bounds = "0,1.5" (as --bounds is written) or [0, 1.5]: two finite numbers, MIN < MAX."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        if not isinstance(parts, list) or len(parts) != 2 or any(isinstance(x, bool) for x in parts):
            raise ValueError
        lo, hi = (float(x) for x in parts)
    except (TypeError, ValueError):
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise LocaloraError(f"{path}: bounds must be MIN,MAX with MIN < MAX, e.g. bounds = \"0,1.5\" or "
                            f"bounds = [0, 1.5]; got {value!r}")
    return lo, hi
