"""Prompt templates: editable text files with named {fields}.

Every VLM prompt is a file NAME.txt, looked up in order in `--prompts DIR`, in the user's config
dir (`<config>/prompts/`) and in the shipped localora/prompts/, so a user overrides one template
by copying just that file. Fields are filled in one pass, by plain replacement rather than
str.format, so templates may show JSON with braces, and text filled in (a user's prompt that
contains "{loras}") is never read as a template. `check` reads a template without filling it, so
a run can refuse a bad one before its first render.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from localora import paths
from localora.errors import LocaloraError

_FIELD = re.compile(r"\{([a-z_]+)\}")


def check_dir(override_dir: Path | str | None, option: str = "--prompts") -> Path | None:
    """An override folder as a resolved path, or one error line when it is not a folder; called by
    the commands before anything loads, so a typo does not silently use the shipped prompts. The
    --prompts options take a plain click.Path: click's own folder check prints a usage block."""
    if override_dir is None:
        return None
    path = Path(override_dir).expanduser()
    if not path.is_dir():
        what = "not a folder" if path.exists() else "no such folder"
        raise LocaloraError(f"{option} {path}: {what}; give a folder of NAME.txt prompt templates "
                            f"(the shipped ones are in {paths.shipped_prompts_dir()})")
    return path.resolve()


def template_path(name: str, override_dir: Path | None = None) -> Path:
    for folder in (override_dir, paths.user_prompts_dir()):
        if folder is not None and (Path(folder) / f"{name}.txt").is_file():
            return Path(folder) / f"{name}.txt"
    return paths.shipped_prompts_dir() / f"{name}.txt"


def check(name: str, override_dir: Path | None, fields: Iterable[str]) -> str:
    """The text of prompts/NAME.txt, or one error naming the file when it is missing, unreadable or
    uses a field outside `fields`."""
    path = template_path(name, override_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LocaloraError(f"{path}: prompt template missing; restore it from the project") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LocaloraError(f"{path}: prompt template cannot be read as UTF-8 text ({e}); fix or remove it") from None
    allowed = set(fields)
    unknown = sorted({f for f in _FIELD.findall(text) if f not in allowed})
    if unknown:
        shown = ", ".join("{" + f + "}" for f in sorted(allowed)) or "no fields"
        raise LocaloraError(f"{path}: unknown field(s) {', '.join('{' + f + '}' for f in unknown)}; "
                            f"this template can use {shown}")
    return text


def render(name: str, override_dir: Path | None = None, **fields: str) -> str:
    """prompts/NAME.txt with its {fields} filled; every field it names must be given."""
    text = check(name, override_dir, fields)
    return _FIELD.sub(lambda m: str(fields[m[1]]), text).strip() + "\n"

