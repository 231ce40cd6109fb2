"""The `localora export --to` targets: Source -> the text written to -o or printed.

    to_a1111(source)      the prompt line with <lora:...> tags and the settings line (no localora entry)
    to_comfyui(source)    the API-format workflow JSON (Merge renders only)
    to_diffusers(source)  a diffusers script; LoRA paths from the run folder when it knows them
    to_lora(source, out, profile, catalog, folders)
                          the render's LoRAs baked at its weights into one kohya LoRA file (export/bake.py)
"""

from __future__ import annotations

import json
from pathlib import Path

from localora import profiles
from localora.diffusion.loras import Lora, LoraFolders
from localora.errors import LocaloraError
from localora.export import Source, a1111, comfyui
from localora.export.replay import lora_paths, source_loras
from localora.export.script import diffusers_script
from localora.profiles import Profile


def to_a1111(source: Source) -> str:
    return a1111.for_people(source.infotext) + "\n"


def to_comfyui(source: Source) -> str:
    return json.dumps(comfyui.workflow(source.localora(), str(source.path)), indent=1, ensure_ascii=False) + "\n"


def to_diffusers(source: Source) -> str:
    info = source.localora()
    if info.blocks:
        raise LocaloraError(f"{source.path}: a render with block weights (lbw=); the script sets one weight per LoRA, "
                            f"so export it --to a1111 (LoRA Block Weight reads lbw=) or bake it --to lora")
    model = info.source
    if profiles.is_tiny(model):  # built by localora into $LOCALORA_HOME: name the folder
        model = str(profiles.locate(model, info.model))
    return diffusers_script(info, source=model, lora_paths=lora_paths(source))


def to_lora(source: Source, out: Path, profile: Profile, catalog: dict[str, Lora], folders: LoraFolders) -> str:
    """Bake the image's LoRAs at its weights into `out`; returns what to tell the user. The baked
    file at weight 1.0 renders the image's Merge (for Switch or Composite, their weights merged)."""
    from localora.diffusion.render import Renderer
    from localora.diffusion import blocks as blocklib
    from localora.export.bake import bake_lora

    info = source.localora()
    if info.profile != profile.name:
        raise LocaloraError(f"{source.path}: rendered with profile '{info.profile}', not '{profile.name}'; "
                            f"give --profile {info.profile} (or leave --profile out)")
    found = source_loras(source, catalog, folders)
    result = bake_lora(Renderer(profile), found, info.weights, out, title=Path(out).stem, blocks=info.blocks)
    weights = ", ".join(f"{lo.name}={w:g}" + ("" if b is None else f" (lbw={blocklib.text(b)})")
                        for lo, w, b in zip(found, info.weights, info.blocks or (None,) * len(found)))
    line = f"{result.path}  (one kohya LoRA of rank {result.max_rank} from {weights}; use it at weight 1.0)"
    if not info.reproducible_elsewhere:
        line += f"; note: this is the Merge of a {info.method} render's weights, so it renders another image"
    return line
