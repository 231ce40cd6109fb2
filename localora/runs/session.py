"""Runs the product's main job: set up the components for a profile and drive a compose run.

The CLI calls this; this calls the components (renderer, VLM, CLIP scorer, loop, report). It is
the only place that knows how they are wired together on one device.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from localora import __version__, events, package_version
from localora.devices import DeviceManager, Placement
from localora.diffusion.render import Renderer
from localora.errors import LocaloraError
from localora.files import file_hash, slug
from localora.profiles import Profile, load_profile
from localora.runs import report
from localora.runs.folder import RunFolder
from localora.search import STRATEGIES
from localora.search.config import ComposeConfig, Final
from localora.search.steps import Steps


@dataclass
class Components:
    """The loaded models of one profile. A batch's runs share one set (models load once per
    process): attach() says which run logs their moves and which UI shows their progress."""

    devices: DeviceManager
    renderer: Renderer
    vlm: Any
    scorer: Any
    run: RunFolder | None = None  # where model loads and moves are logged now
    ui: Any = None

    def attach(self, run: RunFolder | None, ui: Any) -> None:
        self.run, self.ui = run, ui
        self.renderer.on_step = getattr(ui, "step", None)
        self.vlm.on_tokens = getattr(ui, "generating", None)
        memory = self.renderer.memory
        # What fit on the card is kept for the whole run (a resumed one starts from it) and in run.json.
        memory.on_learn = None if run is None else (lambda learned: run.set_setting("memory", learned))
        if run is not None:
            memory.resume(run.settings.get("memory"))
            if memory.retries:  # learned by an earlier run of a batch: this run starts from it too
                run.set_setting("memory", memory.learned())


def model_names(profile: Profile) -> dict[str, str]:
    """The device manager's component names -> the profile's names of those models."""
    return {"diffusion": profile.diffusion.name, "vlm": profile.vlm.name, "clip": profile.clip.name}


def components(profile: Profile, ui: Any = None, run: RunFolder | None = None, batch: int = 0,
               compiled: bool = False) -> Components:
    """Renderer, VLM and CLIP scorer for `profile`, sharing one device under its placement.

    Every load, move and drop of a model is shown by `ui` and, with a `run`, logged in its events;
    `ui` also sees each denoising step and each token the VLM decodes, where it has a method for
    them (`step`, `generating`, `placement`: a bench's progress may lack some). `compiled`: --compile.
    """
    from localora.scoring.clip import ClipScorer
    from localora.vlm.model import VLM

    names = model_names(profile)

    def placement(p: Placement) -> None:
        # Read at each change, not at build time: attach() moves the models on to the next run.
        if parts.run is not None and p.done:
            parts.run.log(events.ModelEvent(type="model", model=p.component, action=p.action,
                                            seconds=round(p.seconds, 3), bytes=p.bytes, memory=p.memory_bytes,
                                            resident=list(p.resident), detail=p.detail))
        show = getattr(parts.ui, "placement", None)
        if show is not None:
            # An announced change says which model: the profile's name (the manager knows its source).
            show(p if p.done else replace(p, detail=names.get(p.component, "")))

    devices = DeviceManager.for_profile(profile, log=placement)
    renderer = Renderer(profile, devices, batch=batch, compile=compiled)
    vlm = VLM(profile.vlm, devices=devices)
    parts = Components(devices, renderer, vlm, ClipScorer.load(profile.clip, devices))
    parts.attach(run, ui)
    return parts


def default_out(prompt: str, parent: Path = Path("runs")) -> Path:
    return parent / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug(prompt)}"


def _versions() -> dict[str, str]:
    packages = ("torch", "diffusers", "transformers", "peft", "xgrammar", "open_clip_torch", "bitsandbytes")
    return {"localora": __version__, **{p: package_version(p) for p in packages}}


def start(cfg: ComposeConfig, profile: Profile, out: Path) -> RunFolder:
    from localora.vlm.model import identity

    cfg.check(profile.diffusion)  # every option, before the run folder exists: a bad one blocks no --out
    # "vlm": which VLM answers (name, source, revision, family); a resume uses it again (--vlm).
    # The CLI checked the weights are here (profiles.require); a VLM that is not is recorded by name.
    try:
        vlm = identity(profile.vlm)
    except LocaloraError:
        vlm = {"name": profile.vlm.name, "source": profile.vlm.source, "revision": None, "family": None}
    return RunFolder.create(out, {"config": cfg.settings(), "profile": profile.name, "profile_spec": asdict(profile),
                                  "vlm": vlm,
                                  "versions": _versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def reopen(path: Path, loras: list | None = None) -> tuple[RunFolder, ComposeConfig, Profile]:
    """A run folder to resume, its settings and profile; refuses a run whose inputs changed."""
    run = RunFolder.open(path)
    try:
        return (run, *_resume_settings(run, path, loras))
    except BaseException:
        run.close()
        raise


def _resume_settings(run: RunFolder, path: Path, loras: list | None) -> tuple[ComposeConfig, Profile]:
    try:
        cfg = ComposeConfig.from_settings(run.settings["config"])
    except (KeyError, TypeError):
        raise LocaloraError(f"{path}: run.json is not a compose run's; cannot resume it") from None
    if loras is not None and [str(lo.path.resolve()) for lo in loras] != [str(lo.path.resolve()) for lo in cfg.loras]:
        used = ", ".join(lo.name for lo in cfg.loras)
        raise LocaloraError(f"{path}: this run used the LoRAs {used}; resume it without --lora or with the same ones")
    if cfg.prompts_dir and not Path(cfg.prompts_dir).is_dir():  # else its rounds would ask with the shipped prompts
        raise LocaloraError(f"{cfg.prompts_dir}: this run's --prompts folder is gone; put it back to resume {path}")
    for stored, lo in zip(run.settings["config"]["loras"], cfg.loras):
        if not lo.path.is_file() or file_hash(lo.path) != stored["sha256"]:
            raise LocaloraError(f"{lo.path}: this LoRA file changed or is gone since the run started; cannot resume")
    profile = load_profile(run.settings["profile"], vlm=(run.settings.get("vlm") or {}).get("name"))
    if json.loads(json.dumps(asdict(profile))) != run.settings.get("profile_spec"):
        raise LocaloraError(f"{path}: profile '{profile.name}' in models.toml changed since this run started; "
                            f"resuming would mix two settings (start a new run instead)")
    return cfg, profile


def compose(cfg: ComposeConfig, profile: Profile, run: RunFolder, ui: Any, batch: int = 0,
            parts: Components | None = None, compiled: bool = False) -> Final:
    """Run (or finish) the search in `run`, then write report.html; the run's lock is released
    however this ends. `parts`: models already loaded for `profile` (a batch's earlier runs), used
    instead of loading them again."""
    try:
        if parts is None:
            parts = components(profile, ui, run, batch, compiled)
        else:
            if parts.renderer.profile != profile:
                raise ValueError(f"components of profile {parts.renderer.profile.name} given for a run "
                                 f"of {profile.name}")
            parts.attach(run, ui)
        if hasattr(ui, "status"):
            # The first line: the models are found (else one error line, and nothing before it)
            # but none is loaded yet, which takes a while.
            ui.status(f"run {run.path}, profile {profile.name} "
                      f"({', '.join(f'{k} {v}' for k, v in model_names(profile).items())}); "
                      f"each model loads on first use")
        emit = ui.event if ui is not None else (lambda e: None)
        steps = Steps(run, parts.renderer, parts.vlm, parts.scorer, emit)
        if run.completed:
            steps.event(events.resume_summary(list(run.completed.values())))
        try:
            # Every pending render-cache write finishes (or raises) before the run ends, however it ends.
            with parts.renderer:
                final = STRATEGIES[cfg.search].run(cfg, steps)
        except BaseException:
            try:
                report.write(run)  # what was done so far, for the user to look at
            except OSError:
                pass  # (a full disk fails here too) the error to show is the first one, naming its file
            raise
        report.write(run)
        return final
    finally:
        if parts is not None:
            parts.attach(None, None)  # a later move is not this run's, and its log is closed
        run.close()
