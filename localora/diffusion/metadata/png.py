"""Text chunks of a PNG, read and written without touching its pixels.

    text_chunks(path) -> {keyword: text}          tEXt, zTXt and iTXt chunks of a PNG file
    with_text(png, {keyword: text}) -> bytes      the same PNG with these chunks (replacing any of
                                                  the same keyword), put before the first IDAT

The image data (IHDR, IDAT, ...) is copied byte for byte, so adding metadata never changes a
pixel or a render's bytes apart from the chunks. Text that fits Latin-1 goes in a tEXt chunk,
other text in an uncompressed UTF-8 iTXt chunk: what A1111 (through Pillow) and ComfyUI write,
and what both read. Chunks go before IDAT because readers that stop at the image data (Pillow's
Image.open(...).info) see only those.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from localora.errors import LocaloraError, MissingError

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TEXT_TYPES = (b"tEXt", b"zTXt", b"iTXt")


def _chunks(png: bytes, where: str) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, checked for a whole structure (not CRCs: readers ignore them too)."""
    if not png.startswith(SIGNATURE):
        raise LocaloraError(f"{where}: not a PNG file; give a PNG that localora, A1111 or ComfyUI wrote")
    out, pos = [], len(SIGNATURE)
    while pos < len(png):
        if pos + 8 > len(png):
            raise LocaloraError(f"{where}: the PNG is cut short; copy the image again")
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        data = png[pos + 8:pos + 8 + length]
        if len(data) != length:
            raise LocaloraError(f"{where}: the PNG is cut short; copy the image again")
        out.append((kind, data))
        pos += 12 + length
        if kind == b"IEND":
            break
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _decode(kind: bytes, data: bytes) -> tuple[str, str] | None:
    key, _, rest = data.partition(b"\0")
    keyword = key.decode("latin-1")
    try:
        if kind == b"tEXt":
            return keyword, rest.decode("latin-1")
        if kind == b"zTXt":
            return keyword, zlib.decompress(rest[1:]).decode("latin-1")
        compressed, _method = rest[0], rest[1]
        _lang, _, rest = rest[2:].partition(b"\0")
        _translated, _, text = rest.partition(b"\0")
        return keyword, (zlib.decompress(text) if compressed else text).decode("utf-8")
    except (IndexError, zlib.error, UnicodeDecodeError):
        return None  # a damaged text chunk is skipped, as image viewers do


def text_chunks(path: Path) -> dict[str, str]:
    """The text chunks of the PNG at `path`; one LocaloraError for a missing or non-PNG file."""
    path = Path(path)
    try:
        png = path.read_bytes()
    except FileNotFoundError:
        raise MissingError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise LocaloraError(f"{path}: is a folder, not a PNG file (a run folder needs its final.png)") from None
    out = {}
    for kind, data in _chunks(png, str(path)):
        if kind in _TEXT_TYPES and (decoded := _decode(kind, data)) is not None:
            out[decoded[0]] = decoded[1]
    return out


def _text_chunk(keyword: str, text: str) -> bytes:
    key = keyword.encode("latin-1")
    try:
        return _chunk(b"tEXt", key + b"\0" + text.encode("latin-1"))
    except UnicodeEncodeError:  # iTXt: keyword, no compression, no language, no translated keyword
        return _chunk(b"iTXt", key + b"\0\0\0\0\0" + text.encode("utf-8"))


def with_text(png: bytes, texts: dict[str, str], where: str = "a render") -> bytes:
    """`png` with a text chunk per entry of `texts`, replacing chunks of the same keywords."""
    keep = []
    for kind, data in _chunks(png, where):
        if kind in _TEXT_TYPES and data.partition(b"\0")[0].decode("latin-1") in texts:
            continue
        keep.append((kind, data))
    out, added = [SIGNATURE], False
    for kind, data in keep:
        if kind in (b"IDAT", b"IEND") and not added:
            out += [_text_chunk(k, v) for k, v in texts.items()]
            added = True
        out.append(_chunk(kind, data))
    return b"".join(out)
