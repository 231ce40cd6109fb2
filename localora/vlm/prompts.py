"""Prompt templates: editable text files with named {fields}.

Every VLM prompt lives in prompts/NAME.txt; `--prompts DIR` points at a folder of overrides
(files missing there fall back to the shipped ones). Fields are filled by plain replacement, not
str.format, so templates may show JSON with braces.
"""

from __future__ import annotations

import re
from pathlib import Path

from localora import paths
from localora.errors import LocaloraError

_FIELD = re.compile(r"\{([a-z_]+)\}")


def template_path(name: str, override_dir: Path | None = None) -> Path:
    if override_dir is not None:
        candidate = Path(override_dir) / f"{name}.txt"
        if candidate.is_file():
            return candidate
    return paths.prompts_dir() / f"{name}.txt"


def render(name: str, override_dir: Path | None = None, **fields: str) -> str:
    """prompts/NAME.txt with its {fields} filled; every field it names must be given."""
    path = template_path(name, override_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        raise LocaloraError(f"{path}: prompt template missing; restore it from the project") from None
    unknown = {f for f in _FIELD.findall(text) if f not in fields}
    if unknown:
        raise LocaloraError(
            f"{path}: unknown field(s) {', '.join('{' + f + '}' for f in sorted(unknown))}; "
            f"this template can use {', '.join('{' + f + '}' for f in sorted(fields))}"
        )
    for key in set(_FIELD.findall(text)):
        text = text.replace("{" + key + "}", str(fields[key]))
    return text.strip() + "\n"

