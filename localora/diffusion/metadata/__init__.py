"""What a render was, written into its PNG: the text chunks every cache PNG carries.

    metadata/info.py      RenderInfo: one render's prompt, LoRA files (sha256, A1111 hash), weights,
                          method and every sampling field; the compact `localora` entry
    metadata/png.py       text chunks of a PNG, read and written without touching its pixels
    metadata/a1111.py     the A1111 infotext (`parameters` chunk) and its parser, parse_infotext
    metadata/comfyui.py   the ComfyUI API graph (`prompt` chunk) of a Merge render; the node and
                          enum names it relies on, in one place
    png_texts(info)       {keyword: text}: the chunks of a render's PNG
    annotate(png, info)   the PNG bytes with those chunks

These sit inside diffusion/ because the render cache (diffusion/render.py) writes them when it
writes a cache PNG, and the cache must not reach up into export/ (tests/test_layout.py).
`localora export` (export/) reads them back and turns them into other formats; it imports them
from here.
"""

from __future__ import annotations

import json

from localora.diffusion.metadata.a1111 import infotext
from localora.diffusion.metadata.comfyui import workflow
from localora.diffusion.metadata.info import RenderInfo
from localora.diffusion.metadata.png import with_text
from localora.errors import LocaloraError

INFOTEXT_KEY = "parameters"  # A1111 and Forge write and read this keyword
COMFY_KEY = "prompt"  # ComfyUI's API-format graph; it reads this keyword back on drop


def png_texts(info: RenderInfo) -> dict[str, str]:
    """The text chunks of a render's PNG: the infotext, and the ComfyUI graph of a Merge.

    The graph is ASCII JSON (non-ASCII as \\u escapes), so it always goes in a tEXt chunk: what
    ComfyUI's own SaveImage writes (json.dumps's default), and what its frontends parse; an iTXt
    chunk made some of them fail on drop. A graph ComfyUI would refuse (a value outside its ranges)
    is left out, and the infotext's Note says why (a1111.note)."""
    texts = {INFOTEXT_KEY: infotext(info)}
    if info.reproducible_elsewhere:
        try:
            texts[COMFY_KEY] = json.dumps(workflow(info), ensure_ascii=True)
        except LocaloraError:
            pass  # no graph; the infotext's Note and `export --to comfyui` say why
    return texts


def annotate(png_bytes: bytes, info: RenderInfo) -> bytes:
    return with_text(png_bytes, png_texts(info))
