"""The `localora export --to` targets: Source -> the text written to -o or printed.

    to_a1111(source)      the prompt line with <lora:...> tags and the settings line
    to_comfyui(source)    the API-format workflow JSON (Merge renders only)
    to_diffusers(source)  a diffusers script; LoRA paths from the run folder when it knows them
"""

from __future__ import annotations

import json
from pathlib import Path

from localora import profiles
from localora.export import Source, comfyui
from localora.export.script import diffusers_script
from localora.files import file_hash


def to_a1111(source: Source) -> str:
    return source.infotext.strip() + "\n"


def to_comfyui(source: Source) -> str:
    return json.dumps(comfyui.workflow(source.localora(), str(source.path)), indent=1, ensure_ascii=False) + "\n"


def to_diffusers(source: Source) -> str:
    info = source.localora()
    model = info.source
    if profiles.is_tiny(model):  # built by localora into $LOCALORA_HOME: name the folder
        model = str(profiles.locate(model, info.model))
    return diffusers_script(info, source=model, lora_paths=lora_paths(source))


def lora_paths(source: Source) -> list[Path] | None:
    """The run's LoRA files, matched by sha256, when the run folder still knows them all."""
    if source.run_dir is None:
        return None
    try:
        run = json.loads((source.run_dir / "run.json").read_text(encoding="utf-8"))
        known = {x["sha256"]: Path(x["path"]) for x in run["config"]["loras"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    out = []
    for lora in source.localora().loras:
        path = known.get(lora.sha256)
        if path is None or not path.is_file() or file_hash(path) != lora.sha256:
            return None
        out.append(path)
    return out
