"""A run folder: settings, an append-only event log, images, and the final pick.

    DIR/run.json       every setting, the profile, LoRA files and hashes, versions
    DIR/events.jsonl   one JSON object per line: every render, every VLM call, progress
    DIR/images/        every image the run used, named by render key
    DIR/final.png, DIR/final.json

Events with an "id" are completed steps. Resuming replays the run and takes each completed step
from the log instead of doing it again, so an interrupted run (Ctrl-C or a kill) loses at most
the step in flight. A line cut short by a kill is dropped when the folder is reopened.
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
from localora.files import atomic_write, open_image, write_json

FORMAT = "localora-run/1"


@dataclass
class RunFolder:
    path: Path
    settings: dict[str, Any]
    completed: dict[str, dict[str, Any]] = field(default_factory=dict)

    # ------------------------------------------------------------ opening

    @classmethod
    def create(cls, path: Path, settings: dict[str, Any]) -> RunFolder:
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise LocaloraError(f"{path}: output folder exists and is not empty; choose a new --out or --resume it")
        try:
            (path / "images").mkdir(parents=True, exist_ok=True)
            write_json(path / "run.json", {"format": FORMAT, **settings})
            (path / "events.jsonl").touch()
        except OSError as e:
            raise LocaloraError(f"{path}: cannot write the run folder ({e.strerror}); choose another --out") from None
        return cls(path, settings)

    @classmethod
    def open(cls, path: Path) -> RunFolder:
        path = Path(path)
        try:
            settings = json.loads((path / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise LocaloraError(f"{path}: not a localora run folder (no readable run.json)") from None
        if settings.pop("format", None) != FORMAT or not (path / "events.jsonl").is_file():
            raise LocaloraError(f"{path}: not a localora run folder (run.json has another format)")
        run = cls(path, settings)
        for event in run.events(repair=True):
            if "id" in event:
                run.completed[event["id"]] = event
        return run

    def events(self, repair: bool = False) -> list[dict[str, Any]]:
        log = self.path / "events.jsonl"
        raw = log.read_bytes()
        if raw and not raw.endswith(b"\n"):
            raw = raw[: raw.rfind(b"\n") + 1]  # the last line was cut short by a kill
            if repair:
                with open(log, "r+b") as f:
                    f.truncate(len(raw))
        return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]

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

    def save_image(self, rendered) -> str:
        """Store a render under images/ by its key (a copy of the cached PNG); returns the path
        relative to the run."""
        rel = f"images/{rendered.key[:20]}.png"
        target = self.path / rel
        if not target.is_file():
            atomic_write(target, lambda p: shutil.copyfile(rendered.path, p))
        return rel

    def image(self, rel: str) -> Image.Image:
        return open_image(self.path / rel)

    def write_json(self, name: str, data: Any) -> None:
        write_json(self.path / name, data)

    def copy(self, rel: str, name: str) -> None:
        atomic_write(self.path / name, lambda p: shutil.copyfile(self.path / rel, p))
