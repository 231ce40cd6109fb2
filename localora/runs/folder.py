"""A run folder: settings, an append-only event log, images, and the final pick.

    DIR/run.json       every setting, the profile, LoRA files and hashes, versions, and "memory":
                       what fit on the card, learned at the first out-of-memory error (memory.py)
    DIR/events.jsonl   one JSON object per line: every render, every VLM call, progress
    DIR/images/        every image the run used, named by render key
    DIR/final.png, DIR/final.json
    DIR/.lock          held by the process writing the run; holds its pid; removed when it ends

Events with an "id" are completed steps. Resuming replays the run and takes each completed step
from the log instead of doing it again, so an interrupted run (Ctrl-C or a kill) loses at most
the step in flight. A line cut short by a kill is dropped when the folder is reopened; damage
anywhere else in the log is refused with the line number, never guessed around. One process
writes a run at a time: a second one is refused while the first holds the lock.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from localora.errors import LocaloraError
from localora.files import (atomic_write, clean_temporaries, hold_lock, lock_owner, open_image, release_lock,
                            storage_error, write_json)

FORMAT = "localora-run/1"


@dataclass
class RunFolder:
    path: Path
    settings: dict[str, Any]
    completed: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: Any = field(default=None, repr=False)  # the open lock file, while this process writes the run

    # ------------------------------------------------------------ opening

    @classmethod
    def create(cls, path: Path, settings: dict[str, Any]) -> RunFolder:
        """A new run folder; an existing one is only reused when nothing was done in it yet (a run
        that failed before its first step, e.g. on a missing model), so a rerun is not blocked."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not _unstarted(path))):
            raise LocaloraError(f"{path}: output folder exists and is not empty; choose a new --out or --resume it")
        lock = None
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock = _take_lock(path)
            (path / "images").mkdir(exist_ok=True)
            write_json(path / "run.json", {"format": FORMAT, **settings})
            (path / "events.jsonl").write_bytes(b"")
        except OSError as e:
            if lock is not None:
                release_lock(lock, path / ".lock")
            # A read-only or full --out is a failure of the storage (exit 4, as the README says), named by its file.
            error = storage_error(e, "choose another --out, or free space or fix its permissions")
            if error is None:
                raise
            raise error from None
        return cls(path, settings, _lock=lock)

    @classmethod
    def open(cls, path: Path, write: bool = True) -> RunFolder:
        """An existing run; with `write` (to resume it) this process takes its lock first."""
        path = Path(path)
        try:
            settings = json.loads((path / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise LocaloraError(f"{path}: not a localora run folder (no readable run.json)") from None
        if not isinstance(settings, dict) or settings.pop("format", None) != FORMAT \
                or not (path / "events.jsonl").is_file():
            raise LocaloraError(f"{path}: not a localora run folder (run.json has another format)")
        run = cls(path, settings, _lock=_take_lock(path) if write else None)
        if write:
            clean_temporaries(path, older_than_s=0)  # under the lock, every .tmp-* is a killed write's
        for event in run.events(repair=write):
            if "id" in event:
                run.completed[event["id"]] = event
        return run

    def events(self, repair: bool = False) -> list[dict[str, Any]]:
        """The logged events. A torn last line (a kill mid-append) is dropped, and with `repair`
        cut from the file; any other damage is one error naming the line."""
        log = self.path / "events.jsonl"
        raw = log.read_bytes()
        if raw and not raw.endswith(b"\n"):
            raw = raw[: raw.rfind(b"\n") + 1]  # the last line was cut short by a kill
            if repair:
                with open(log, "r+b") as f:
                    f.truncate(len(raw))
        out = []
        for number, line in enumerate(raw.split(b"\n")[:-1], 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line.decode("utf-8"))
                what = None if isinstance(event, dict) and isinstance(event.get("type"), str) else "not an event"
            except UnicodeDecodeError:
                what = "invalid UTF-8"
            except ValueError:
                what = "not JSON"
            if what:
                raise LocaloraError(
                    f"{log}: line {number} is damaged ({what}); the log is only ever appended to, so something "
                    f"else changed it. Restore the file, or keep lines 1-{number - 1} (e.g. `head -n {number - 1}`) "
                    f"to resume from the steps before it")
            out.append(event)
        return out

    def close(self) -> None:
        """Release the run's lock and remove .lock: another process may resume it now."""
        if self._lock is not None:
            release_lock(self._lock, self.path / ".lock")
            self._lock = None

    # ------------------------------------------------------------ writing

    def log(self, event: dict[str, Any]) -> None:
        """Append one event; it is on disk (fsynced) before the run goes on."""
        line = json.dumps(event, ensure_ascii=False, default=str) + "\n"
        with open(self.path / "events.jsonl", "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if "id" in event:
            self.completed[event["id"]] = event

    def save_image(self, rendered, rel: str | None = None) -> str:
        """Store a render under images/ by its key (a copy of the cached PNG), or at `rel` to put
        back an image a resumed run is missing; returns the path relative to the run."""
        rel = rel or f"images/{rendered.key[:20]}.png"
        target = self.path / rel
        # Waits for the cache file (written in the background) and raises its write's error, so
        # the event the caller logs next names an image that is on disk.
        source = rendered.path
        if not target.is_file():
            atomic_write(target, lambda p: shutil.copyfile(source, p))
        return rel

    def image(self, rel: str) -> Image.Image:
        return open_image(self.path / rel)

    def write_json(self, name: str, data: Any) -> None:
        write_json(self.path / name, data)

    def set_setting(self, key: str, value: Any) -> None:
        """Add or change one top-level field of run.json (e.g. "memory": what fit on the card)."""
        self.settings[key] = value
        write_json(self.path / "run.json", {"format": FORMAT, **self.settings})

    def copy(self, rel: str, name: str) -> None:
        atomic_write(self.path / name, lambda p: shutil.copyfile(self.path / rel, p))


def result(path: Path, weights: dict[str, float], iteration: int, renders: int | None) -> dict[str, Any]:
    """A finished run's result, where its files are: compose's --json document, a batch line's."""
    return {"weights": weights, "iteration": iteration, "renders": renders, "run_folder": str(path),
            "image": str(path / "final.png"), "report": str(path / "report.html")}


def _take_lock(path: Path) -> Any:
    lock = hold_lock(path / ".lock")
    if lock is None:
        raise LocaloraError(f"{path}: this run is being written by {lock_owner(path / '.lock')}; wait for it to "
                            f"finish (or stop it), then resume")
    return lock


def _unstarted(path: Path) -> bool:
    """A run folder in which nothing was done yet: settings, an empty log, no images."""
    names = {p.name for p in path.iterdir()}
    return (names <= {"run.json", "events.jsonl", "images", ".lock"} and "run.json" in names
            and (path / "events.jsonl").is_file() and (path / "events.jsonl").stat().st_size == 0
            and (path / "images").is_dir() and not any((path / "images").iterdir()))
