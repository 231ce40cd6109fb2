"""Contact sheets: a round's candidates side by side, each captioned with its weights and score.

    +-----------+-----------+-----------+
    |  image 1  |  image 2  |  image 3  |     cells of `cell` px (small renders are scaled up
    |           |           |           |     with nearest-neighbour, so pixels stay pixels)
    +-----------+-----------+-----------+
    | 1: a=0.50 | 2: a=0.80 | 3: a=1.10 |     caption lines under each image, wrapped to the
    |   b=0.70  |   b=0.40  |   b=0.60  |     cell's width
    | CLIP-T .3 | CLIP-T .2 | filled    |
    +-----------+-----------+-----------+

A sheet is made from the images and captions alone, so it is the same PNG on every build of the
same run (Pillow's bundled font; no date, no metadata).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from localora.files import atomic_write

PAD = 8
FONT_SIZE = 13
LINE = FONT_SIZE + 4


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Lines of `text` that fit `width` px, broken at spaces (a word longer than a line is cut)."""
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            trial = f"{line} {word}".strip()
            if not line or draw.textlength(trial, font=font) <= width:
                line = trial
            else:
                lines.append(line)
                line = word
            while draw.textlength(line, font=font) > width and len(line) > 1:
                cut = len(line)
                while cut > 1 and draw.textlength(line[:cut], font=font) > width:
                    cut -= 1
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def contact_sheet(items: Sequence[tuple[Path | None, str]], cell: int = 256) -> Image.Image:
    """One row of (image file, caption) cells; a missing file is a grey cell that says so."""
    font = ImageFont.load_default(size=FONT_SIZE)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    captions = [_wrap(probe, caption, font, cell) for _, caption in items]
    text_h = LINE * max((len(c) for c in captions), default=1)
    sheet = Image.new("RGB", (PAD + len(items) * (cell + PAD), PAD + cell + PAD + text_h + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for n, ((path, _), lines) in enumerate(zip(items, captions)):
        x = PAD + n * (cell + PAD)
        if path is not None and Path(path).is_file():
            with Image.open(path) as im:
                im = im.convert("RGB")
                scale = cell / max(im.size)
                size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
                resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
                sheet.paste(im.resize(size, resample), (x + (cell - size[0]) // 2, PAD + (cell - size[1]) // 2))
        else:
            draw.rectangle((x, PAD, x + cell - 1, PAD + cell - 1), fill="#ddd")
            draw.text((x + PAD, PAD + cell // 2), "(image missing)", fill="#555", font=font)
        for i, text in enumerate(lines):
            draw.text((x, PAD + cell + PAD + i * LINE), text, fill="#222", font=font)
    return sheet


def write_sheet(items: Sequence[tuple[Path | None, str]], out: Path, cell: int = 256) -> Path:
    image = contact_sheet(items, cell)
    atomic_write(out, lambda p: image.save(p, format="PNG"))
    return out
