"""The result leaves localora: what a render was, written for A1111/Forge, ComfyUI and diffusers.

    export/info.py      RenderInfo: one render's prompt, LoRA files (sha256, A1111 hash), weights,
                        method and every sampling field; the compact `localora` entry
    export/png.py       text chunks of a PNG, read and written without touching its pixels
    export/a1111.py     the A1111 infotext (`parameters` chunk) and its parser, parse_infotext
    export/comfyui.py   the ComfyUI API graph (`prompt` chunk) of a Merge render; the node and
                        enum names it relies on, in one place
    export/script.py    a runnable diffusers script that redoes the render
    export/targets.py   the `localora export --to` targets, Source -> text

Where the chunks are written: in the render cache, once, when the renderer writes (or first
serves) a cache PNG (diffusion/render.py, through png_texts below). Every PNG localora gives a
user (a run's images/ and final.png, the bench's images, `generate -o`) is a byte-for-byte copy of
a cache PNG, so each carries them, and the cache format and pixels stay what they were.

`localora export` (cli/export.py) reads a PNG's chunks back (read_source) and hands them to a
target in TARGETS. A new target is one entry there: "NAME": "localora.export.MODULE:FUNCTION",
FUNCTION(source: Source) -> str, the text written to -o or printed (e.g. "lora": a LoRA baked from
the weights, in export/bake.py).

This package sits in the diffusion layer (tests/test_layout.py): the renderer writes its chunks,
and export targets may use the diffusion code.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from localora.errors import LocaloraError
from localora.export.a1111 import infotext, parse_infotext
from localora.export.comfyui import workflow
from localora.export.png import text_chunks, with_text
from localora.export.info import RenderInfo

INFOTEXT_KEY = "parameters"  # A1111 and Forge write and read this keyword
COMFY_KEY = "prompt"  # ComfyUI's API-format graph; it reads this keyword back on drop

TARGETS: dict[str, str] = {
    "a1111": "localora.export.targets:to_a1111",
    "comfyui": "localora.export.targets:to_comfyui",
    "diffusers": "localora.export.targets:to_diffusers",
}


def png_texts(info: RenderInfo) -> dict[str, str]:
    """The text chunks of a render's PNG: the infotext, and the ComfyUI graph of a Merge."""
    texts = {INFOTEXT_KEY: infotext(info)}
    if info.reproducible_elsewhere:
        try:
            texts[COMFY_KEY] = json.dumps(workflow(info), ensure_ascii=False)
        except LocaloraError:
            pass  # a weight or seed outside ComfyUI's ranges: no graph, and `export --to comfyui` says why
    return texts


def annotate(png_bytes: bytes, info: RenderInfo) -> bytes:
    return with_text(png_bytes, png_texts(info))


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
        raise LocaloraError(f"{path}: no A1111 or localora metadata (no 'parameters' text chunk); export an image "
                            f"localora wrote (a run's final.png or images/, or `generate -o`)")
    entry = parse_infotext(text)["localora"]
    info = RenderInfo.from_entry(entry, str(path)) if entry is not None else None
    return Source(path, text, info, run_dir)


def export(source: Source, target: str) -> str:
    if target not in TARGETS:
        raise LocaloraError(f"unknown export target '{target}'; use one of {', '.join(TARGETS)}")
    module, function = TARGETS[target].split(":")
    return getattr(importlib.import_module(module), function)(source)
