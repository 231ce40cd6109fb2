"""The result leaves localora: what a render was, written for A1111/Forge, ComfyUI and diffusers.

    diffusion/metadata/ RenderInfo, the PNG text chunks, the A1111 infotext and the ComfyUI graph:
                        written by the render cache, so they live below it; imported here
    export/script.py    a runnable diffusers script that redoes the render
    export/targets.py   the `localora export --to` targets, Source -> text

Where the chunks are written: in the render cache, once, when the renderer writes (or first
serves) a cache PNG (diffusion/render.py, through diffusion/metadata png_texts). Every PNG localora gives a
user (a run's images/ and final.png, the bench's images, `generate -o`) is a byte-for-byte copy of
a cache PNG, so each carries them, and the cache format and pixels stay what they were.

`localora export` (cli/export.py) reads a PNG's chunks back (read_source) and hands them to a
target in TARGETS. A new target is one entry there: "NAME": "localora.export.MODULE:FUNCTION",
FUNCTION(source: Source) -> str, the text written to -o or printed (e.g. "lora": a LoRA baked from
the weights, in export/bake.py).

This package sits above the diffusion layer (tests/test_layout.py): export targets may use the
diffusion code, and nothing in diffusion/ imports export/.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from localora.diffusion.metadata import COMFY_KEY, INFOTEXT_KEY, a1111, annotate, comfyui, info, png, png_texts
from localora.diffusion.metadata.a1111 import parse_infotext
from localora.diffusion.metadata.info import RenderInfo
from localora.diffusion.metadata.png import text_chunks
from localora.errors import LocaloraError

__all__ = ["COMFY_KEY", "INFOTEXT_KEY", "TARGETS", "RenderInfo", "Source", "a1111", "annotate", "comfyui", "export",
           "info", "parse_infotext", "png", "png_texts", "read_source"]

TARGETS: dict[str, str] = {
    "a1111": "localora.export.targets:to_a1111",
    "comfyui": "localora.export.targets:to_comfyui",
    "diffusers": "localora.export.targets:to_diffusers",
}


@dataclass(frozen=True)
class Source:
    """A PNG to export: its infotext and, for a localora render, its RenderInfo."""

    path: Path
    infotext: str
    info: RenderInfo | None  # None: a stock A1111/Forge image
    run_dir: Path | None = None  # the run folder it came from, which knows the LoRA files' paths

    def localora(self) -> RenderInfo:
        if self.info is None:
            raise LocaloraError(f"{self.path}: an A1111 image without a localora entry; only --to a1111 can "
                                f"export it")
        return self.info


def read_source(path: Path) -> Source:
    """RUN_DIR (its final.png) or a PNG, read; one error line when it has no A1111/localora metadata."""
    path = Path(path).expanduser()
    run_dir = None
    if path.is_dir():
        if not (path / "final.png").is_file():
            raise LocaloraError(f"{path}: a folder without final.png; give a finished run folder or a PNG")
        run_dir, path = path, path / "final.png"
    elif path.parent.name == "images" and (path.parent.parent / "run.json").is_file():
        run_dir = path.parent.parent
    elif (path.parent / "run.json").is_file():
        run_dir = path.parent
    text = text_chunks(path).get(INFOTEXT_KEY)
    if not text or not text.strip():
        # Said for generate --from as well as export: name the images that work, not the command.
        raise LocaloraError(f"{path}: no A1111 or localora metadata (no 'parameters' text chunk); give a PNG that "
                            f"localora wrote (a run's final.png or images/, or `generate -o`) or an A1111/Forge PNG")
    entry = parse_infotext(text)["localora"]
    info = RenderInfo.from_entry(entry, str(path)) if entry is not None else None
    return Source(path, text, info, run_dir)


def export(source: Source, target: str) -> str:
    if target not in TARGETS:
        raise LocaloraError(f"unknown export target '{target}'; use one of {', '.join(TARGETS)}")
    module, function = TARGETS[target].split(":")
    return getattr(importlib.import_module(module), function)(source)
