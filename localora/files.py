"""Small file helpers shared by the cache, the run folder and the few-shot library."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from localora.errors import LocaloraError

_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) for this process."""
    st = path.stat()
    memo = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[memo] = h.hexdigest()
    return _HASHES[memo]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"))


def stable_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def open_image(image: Image.Image | str | Path) -> Image.Image:
    """An RGB PIL image from an image or a path; one LocaloraError naming a missing or bad file."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    path = Path(image).expanduser()
    if not path.is_file():
        raise LocaloraError(f"image {path}: no such file")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")  # reads the pixels, so a truncated file fails here
    except Image.DecompressionBombError:
        raise LocaloraError(f"image {path}: over Pillow's limit of {Image.MAX_IMAGE_PIXELS * 2:,} pixels "
                            f"(a decompression bomb, or far larger than any render); give a smaller image") from None
    except (UnidentifiedImageError, OSError) as e:
        raise LocaloraError(f"image {path}: not an image file that can be read ({e})") from None
