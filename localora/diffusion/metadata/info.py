"""What a render was, in the terms every export format needs: one RenderInfo.

    render_info(job, profile, device) -> RenderInfo    from a resolved RenderJob at render time
    RenderInfo.entry() -> dict                          the compact `localora` entry of the infotext
    RenderInfo.from_entry(entry) -> RenderInfo          back, when reading a PNG

The entry carries everything that decides the pixels (prompt, method, weights, LoRA files by
sha256, every sampling field, the model and the dtype it ran in), so a render can be reproduced
exactly even when the same cached image is later reached through LoRA files at other paths or
names: the sha256 stays true, the names are what the render at hand used.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from localora import profiles
from localora.diffusion.sampling import Sampling
from localora.errors import LocaloraError
from localora.files import file_hash, safetensors_data_hash
from localora.profiles import DiffusionSpec, Profile

ENTRY_FORMAT = 1


# The folders A1111/Forge (models/Lora, models/LyCORIS, models/Stable-diffusion) and ComfyUI
# (models/loras, models/checkpoints) list models under: each lists a file by its path below it.
LORA_ROOTS = ("Lora", "loras", "LyCORIS")
CHECKPOINT_ROOTS = ("Stable-diffusion", "checkpoints")


def listed_name(path: Path, roots: tuple[str, ...], folders: tuple[Path, ...] = ()) -> str:
    """How ComfyUI and A1111 list a model file: its path relative to the model folder it sits in
    ("characters/hero.safetensors"), that folder being one of `folders` (localora's LoRA folders)
    or the nearest parent named as in `roots`; else the file name alone."""
    path = Path(path).resolve()
    for folder in folders:
        try:
            return path.relative_to(Path(folder).resolve()).as_posix()
        except ValueError:
            continue
    for parent in path.parents:
        if parent.name in roots:
            return path.relative_to(parent).as_posix()
    return path.name


def _lora_folders() -> tuple[Path, ...]:
    from localora.diffusion.loras import lora_folders

    try:
        return tuple(d.path for d in lora_folders().dirs)
    except LocaloraError:
        return ()


@dataclass(frozen=True)
class LoraFile:
    name: str  # the file's stem: what A1111's <lora:NAME:W> and Lora hashes use
    file: str  # the file as ComfyUI's LoraLoader lists it: its path below the LoRA folder
    sha256: str  # of the whole file: what localora's cache and the entry use
    short_hash: str  # A1111's "addnet" hash: sha256 of the tensor data after the header, 12 hex

    @classmethod
    def of(cls, path: Path) -> LoraFile:
        path = Path(path)
        return cls(path.stem, listed_name(path, LORA_ROOTS, _lora_folders()), file_hash(path),
                   safetensors_data_hash(path)[:12])


@dataclass(frozen=True)
class RenderInfo:
    prompt: str
    loras: tuple[LoraFile, ...]
    weights: tuple[float, ...]
    method: str
    seed: int
    negative_prompt: str
    steps: int
    guidance: float
    width: int
    height: int
    switch_every: int | None  # Switch only
    profile: str
    model: str  # the profile's diffusion model name
    arch: str
    source: str
    vae: str | None
    scheduler: str  # localora's name: euler, euler_a, dpmpp_2m, ddim
    sigmas: str  # "default", "karras", "exponential" or "beta", from the scheduler's config
    dtype: str  # the dtype the render ran in
    device: str
    model_hash: str | None = None  # A1111's AutoV2 hash of the checkpoint, when the profile knows it
    max_sequence_length: int | None = None  # text tokens of a T5 / Qwen3 encoder (transformer bases)
    # Per LoRA its LoRA Block Weight vector or None (diffusion/blocks.py); () when none has one,
    # and then absent from the entry, so entries without block weights are what they were.
    blocks: tuple[tuple[float, ...] | None, ...] = ()
    cache_interval: int | None = None  # CMLoRA only
    spacing: str = "leading"  # the scheduler config's timestep_spacing (entries before it: every profile's "leading")

    def entry(self) -> dict[str, Any]:
        d = asdict(self)
        d["loras"] = [{"name": x.name, "file": x.file, "sha256": x.sha256, "short_hash": x.short_hash}
                      for x in self.loras]
        if d["switch_every"] is None:
            del d["switch_every"]
        if d["max_sequence_length"] is None:  # UNet bases: left out, so their entries read as before
            del d["max_sequence_length"]
        if d["cache_interval"] is None:
            del d["cache_interval"]
        if not self.blocks:
            del d["blocks"]
        else:
            d["blocks"] = [None if b is None else list(b) for b in self.blocks]
        return {"format": ENTRY_FORMAT, **d}

    def entry_json(self) -> str:
        return json.dumps(self.entry(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_entry(cls, entry: dict[str, Any], where: str) -> RenderInfo:
        try:
            if entry.get("format") != ENTRY_FORMAT:
                raise ValueError(f"entry format {entry.get('format')!r}")
            fields = {k: v for k, v in entry.items() if k in cls.__dataclass_fields__}
            fields["loras"] = tuple(LoraFile(**x) for x in entry["loras"])
            fields["weights"] = tuple(float(w) for w in entry["weights"])
            fields.setdefault("switch_every", None)
            fields["blocks"] = tuple(None if b is None else tuple(float(v) for v in b)
                                     for b in entry.get("blocks") or ())
            return cls(**fields)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise LocaloraError(f"{where}: the localora entry of its infotext is damaged or from another "
                                f"localora ({e}); render the image again with this localora") from None

    @property
    def reproducible_elsewhere(self) -> bool:
        """Only a Merge is a stock LoRA stack; Switch and Composite need localora's own loop."""
        return self.method == "merge"


@functools.lru_cache(maxsize=None)  # read once per model per process
def sigma_schedule(spec: DiffusionSpec) -> str:
    """Which sigma spacing the profile's scheduler config asks for (the pipeline builds its
    scheduler from that config, so the same flags hold for the render)."""
    config = scheduler_config(spec)
    if spec.scheduler == "flow_euler":  # flow matching: evenly spaced sigmas, shifted by resolution or not
        return "dynamic" if config.get("use_dynamic_shifting") else "simple"
    for flag, name in (("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "exponential"),
                       ("use_beta_sigmas", "beta")):
        if config.get(flag):
            return name
    return "default"


@functools.lru_cache(maxsize=None)
def timestep_spacing(spec: DiffusionSpec) -> str:
    """How the scheduler config spaces the timesteps: "leading" (diffusers' default, and every
    Stable Diffusion config's), "trailing" or "linspace"."""
    return str(scheduler_config(spec).get("timestep_spacing") or "leading")


def scheduler_config(spec: DiffusionSpec) -> dict[str, Any]:
    """The diffusers scheduler config of a model folder; {} for a single-file checkpoint."""
    path = profiles.locate(spec.source, f"diffusion model '{spec.name}'")
    config = path / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return {}
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


@functools.lru_cache(maxsize=None)
def model_hash(spec: DiffusionSpec) -> str | None:
    """A1111's model hash (AutoV2: the first 10 hex of the checkpoint file's sha256): the profile's
    `a1111_hash`, else computed for a single-file checkpoint; a diffusers folder has none."""
    if spec.a1111_hash:
        return spec.a1111_hash
    if profiles.is_tiny(spec.source):
        return None
    path = profiles.locate(spec.source, f"diffusion model '{spec.name}'")
    return file_hash(path)[:10] if path.is_file() else None


def render_info(prompt: str, lora_paths: list[Path], weights: list[float], method: str, sampling: Sampling,
                profile: Profile, device: str, blocks: tuple = ()) -> RenderInfo:
    """The RenderInfo of a render, from its resolved Sampling."""
    spec = profile.diffusion
    return RenderInfo(
        prompt=prompt, loras=tuple(LoraFile.of(p) for p in lora_paths), weights=tuple(float(w) for w in weights),
        method=method, seed=int(sampling.seed), negative_prompt=sampling.negative_prompt or "",
        steps=int(sampling.steps), guidance=float(sampling.guidance), width=int(sampling.width),
        height=int(sampling.height),
        switch_every=int(sampling.switch_every) if method in ("switch", "cmlora") else None,
        cache_interval=int(sampling.cache_interval) if method == "cmlora" else None,
        profile=profile.name, model=spec.name, arch=spec.arch, source=spec.source, vae=spec.vae,
        scheduler=spec.scheduler, sigmas=sigma_schedule(spec), dtype=profiles.run_dtype(spec.dtype, device),
        device=device, model_hash=model_hash(spec), max_sequence_length=sampling.max_sequence_length,
        blocks=tuple(blocks), spacing=timestep_spacing(spec))
