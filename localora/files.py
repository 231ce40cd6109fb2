"""Small file helpers shared by the cache, the run folder and the few-shot library.

    atomic_write(path, write)     write through .tmp-* and rename: readers never see half a file;
                                  the file gets the umask's mode, as open() would give it
    give_umask_mode(folder)       the same for every file and folder under a folder a library wrote
    file_hash(path)               sha256 of a file (and safetensors_data_hash: of its tensor data)
    clean_temporaries(folder)     remove .tmp-* files a killed writer left behind
    hold_lock(path)               an exclusive lock for this process's lifetime, or who holds it;
                                  release_lock(fh, path) ends it and removes the file
    storage_error(e, folder)      an OSError from a full, read-only or missing folder, as one line
    slug(text)                    a prompt's short, folder-name-safe form
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from localora.errors import LocaloraError, MissingError, RuntimeFailure


def slug(text: str) -> str:
    """A prompt's short, folder-name-safe form: lower case, dashes, at most 40 characters."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "run"


_HASHES: dict[tuple[str, int, int, bool], str] = {}


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) for this process."""
    return _sha256(path, skip_header=False)


def safetensors_data_hash(path: Path) -> str:
    """sha256 of a .safetensors file's bytes after its header (what kohya and A1111 call the
    "addnet" hash: it stays the same when only the metadata changes), remembered likewise."""
    return _sha256(path, skip_header=True)


def _sha256(path: Path, skip_header: bool) -> str:
    st = path.stat()
    memo = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, skip_header)
    if memo not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if skip_header:  # 8 bytes little-endian header length, then the JSON header
                f.seek(8 + int.from_bytes(f.read(8), "little"))
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[memo] = h.hexdigest()
    return _HASHES[memo]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half.
    The file gets the mode the umask gives any new file (0666 & ~umask), not mkstemp's 0600, so
    teammates on a shared machine can read run folders and a shared render cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix=path.suffix)
    except OSError as e:  # name the file meant, not a random temporary name
        raise OSError(e.errno, e.strerror, str(path)) from e
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # after write(): a writer may have replaced the file
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a failed write() names no file; the error line must
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def current_umask() -> int:
    """The process's umask. Linux shows it in /proc/self/status; elsewhere it can only be read by
    setting it, which for a moment would give files other threads create the wrong mode."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask_mode(folder: Path) -> None:
    """Give every file under `folder` the mode open() would (0666 & ~umask) and every folder
    mkdir's (0777 & ~umask): safetensors writes its files 0600, which hides a shared model folder
    from teammates."""
    mask = current_umask()
    folder = Path(folder)
    for path in (folder, *folder.rglob("*")):
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


TMP_PREFIX = ".tmp-"
# A temporary file older than this belongs to a writer that died: a render is written in seconds.
STALE_AFTER_S = 3600.0


def clean_temporaries(folder: Path, older_than_s: float = STALE_AFTER_S) -> int:
    """Remove .tmp-* files under `folder` left by a writer that was killed mid-write; younger ones
    may be another process's write in flight and are kept. Returns how many were removed."""
    cutoff = time.time() - older_than_s
    removed = 0
    for tmp in Path(folder).rglob(TMP_PREFIX + "*"):
        try:
            if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except OSError:
            pass  # gone already (another process cleaned it), or not ours to remove
    return removed


def hold_lock(path: Path, wait: bool = False):
    """Take an exclusive lock on `path` (created if needed) and keep it while the returned file
    object lives; the kernel releases it when the process ends, however it ends, so a killed
    run never leaves a stale lock. The file holds the owner's pid. Returns None, without
    waiting unless `wait`, when another process holds it; `lock_owner(path)` says which.
    release_lock removes the file: a lock taken on a file removed meanwhile is taken again on
    the new one, so two processes never both hold `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fh = open(path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.close()
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()  # the holder released (and removed) it while we waited: lock the file there now
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def release_lock(fh, path: Path) -> None:
    """Remove the lock file, then release the lock: a finished run leaves no .lock (with a pid
    that is long dead) behind."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only folder: the lock is released all the same
    fh.close()


def lock_owner(path: Path) -> str:
    """The pid written in a lock file, or "another process"."""
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


# The errors a full, read-only, missing or misplaced folder gives; anything else is a bug.
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "disk quota exceeded",
                  errno.EFBIG: "file size limit reached (a full disk or a per-file limit)",
                  errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied", errno.ENOTDIR: "a part of the path is a file, not a folder",
                  errno.EEXIST: "a file is in the way of a folder"}


def storage_error(e: OSError, hint: str = "free space, fix the permissions or choose another folder"
                  ) -> LocaloraError | None:
    """One line for an OSError of the storage kind (naming the file and the problem), else None."""
    if e.errno not in STORAGE_ERRNOS:
        return None
    where = e.filename if e.filename is not None else "a file localora writes"
    return RuntimeFailure(f"{where}: {STORAGE_ERRNOS[e.errno]}; {hint}")


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
        raise MissingError(f"image {path}: no such file")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")  # reads the pixels, so a truncated file fails here
    except Image.DecompressionBombError:
        raise LocaloraError(f"image {path}: over Pillow's limit of {Image.MAX_IMAGE_PIXELS * 2:,} pixels "
                            f"(a decompression bomb, or far larger than any render); give a smaller image") from None
    except (UnidentifiedImageError, OSError) as e:
        raise LocaloraError(f"image {path}: not an image file that can be read ({e})") from None
