"""Runs the product's main job: set up the components for a profile and drive a compose run.

The CLI calls this; this calls the components (renderer, VLM, CLIP scorer, loop, report). It is
the only place that knows how they are wired together on one device.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from localora import __version__, report_html
from localora.devices import DeviceManager, pick_device
from localora.errors import LocaloraError
from localora.files import file_hash
from localora.profiles import Profile, load_profile
from localora.reflect import ComposeConfig, Final, Loop
from localora.render import Renderer
from localora.runlog import RunFolder


@dataclass
class Components:
    devices: DeviceManager
    renderer: Renderer
    vlm: Any
    scorer: Any


def components(profile: Profile, ui: Any = None) -> Components:
    """Renderer, VLM and CLIP scorer for `profile`, sharing one device under its placement."""
    from localora.clipscore import ClipScorer
    from localora.vlm import VLM

    devices = DeviceManager(pick_device(profile.device), profile.placement,
                            log=getattr(ui, "placement", None))
    renderer = Renderer(profile, devices, on_step=getattr(ui, "step", None))
    return Components(devices, renderer, VLM(profile.vlm, devices=devices), ClipScorer.load(profile.clip, devices))


def default_out(prompt: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "run"
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"localora": __version__}
    for pkg in ("torch", "diffusers", "transformers", "peft", "xgrammar", "open_clip_torch", "bitsandbytes"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def start(cfg: ComposeConfig, profile: Profile, out: Path) -> RunFolder:
    cfg.check()
    return RunFolder.create(out, {"config": cfg.settings(), "profile": profile.name, "profile_spec": asdict(profile),
                                  "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def reopen(path: Path, loras: list | None = None) -> tuple[RunFolder, ComposeConfig, Profile]:
    """A run folder to resume, its settings and profile; refuses a run whose inputs changed."""
    run = RunFolder.open(path)
    try:
        cfg = ComposeConfig.from_settings(run.settings["config"])
    except (KeyError, TypeError):
        raise LocaloraError(f"{path}: run.json is not a compose run's; cannot resume it") from None
    if loras is not None and [str(lo.path.resolve()) for lo in loras] != [str(lo.path.resolve()) for lo in cfg.loras]:
        used = ", ".join(lo.name for lo in cfg.loras)
        raise LocaloraError(f"{path}: this run used the LoRAs {used}; resume it without --lora or with the same ones")
    for stored, lo in zip(run.settings["config"]["loras"], cfg.loras):
        if not lo.path.is_file() or file_hash(lo.path) != stored["sha256"]:
            raise LocaloraError(f"{lo.path}: this LoRA file changed or is gone since the run started; cannot resume")
    return run, cfg, load_profile(run.settings["profile"])


def compose(cfg: ComposeConfig, profile: Profile, run: RunFolder, ui: Any) -> Final:
    """Run (or finish) the loop in `run`, then write report.html."""
    parts = components(profile, ui)
    emit = ui.event if ui is not None else (lambda e: None)
    if run.completed:
        event = {"type": "resume", "completed": len(run.completed)}
        run.log(event)
        emit(event)
    loop = Loop(cfg, run, parts.renderer, parts.vlm, parts.scorer, emit=emit)
    try:
        return loop.compose()
    finally:
        report_html.write(run)
