"""Reading a render back from a PNG: the LoRA files it names, and the job that renders it again.

    lora_paths(source) -> [Path] | None                  the LoRA files of the run folder a PNG sits in
    source_loras(source, catalog, folders) -> [Lora]    a localora PNG's LoRA files, by sha256
    replay(source, profile, catalog, folders) -> Replay  the RenderJob a PNG describes
        localora PNG   its entry: the exact prompt, method, weights and every sampling field
        A1111 PNG      its prompt's <lora:NAME:W> tags (resolved like --lora), Steps, CFG scale,
                       Seed, Size and Negative prompt; rendered with the profile's scheduler

A localora entry names its LoRAs by sha256, so a file is only taken when its bytes are the ones
the render used: from the run folder the PNG sits in, else a catalog entry or a LoRA-folder file
of the same name, else any catalog entry with those bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from localora.diffusion import loras as loralib
from localora.diffusion.loras import Lora, LoraFolders
from localora.diffusion.sampling import Sampling
from localora.errors import LocaloraError
from localora.export import Source, parse_infotext
from localora.files import file_hash, safetensors_data_hash
from localora.profiles import Profile


@dataclass(frozen=True)
class Replay:
    prompt: str  # the text the text encoders read (trigger words included, tags removed)
    loras: tuple[Lora, ...]  # in the order the method runs them
    weights: tuple[float, ...]
    method: str
    sampling: Sampling
    notes: tuple[str, ...] = ()  # what differs from the original, said to the user
    blocks: tuple[tuple[float, ...] | None, ...] = ()  # per LoRA its lbw= vector (diffusion/blocks.py)


def lora_paths(source: Source) -> list[Path] | None:
    """The run's LoRA files, matched by sha256, when the run folder still knows them all."""
    found = _run_loras(source)
    return None if found is None else [lo.path for lo in found]


def _run_loras(source: Source) -> list[Lora] | None:
    """The LoRAs (with the run's names, categories and trigger words) of the run folder the PNG is
    in, matched by sha256; None when there is no run folder or it no longer has them all."""
    if source.run_dir is None:
        return None
    try:
        run = json.loads((source.run_dir / "run.json").read_text(encoding="utf-8"))
        known = {x["sha256"]: Lora(x["name"], Path(x["path"]), x.get("category"), x.get("triggers", ""))
                 for x in run["config"]["loras"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    out = []
    for lora in source.localora().loras:
        match = known.get(lora.sha256)
        if match is None or not match.path.is_file() or file_hash(match.path) != lora.sha256:
            return None
        out.append(match)
    return out


def source_loras(source: Source, catalog: dict[str, Lora], folders: LoraFolders) -> list[Lora]:
    """The LoRA files of a localora PNG, each checked by sha256; one error naming a missing one."""
    known = _run_loras(source)
    if known is not None:
        return known
    out = []
    for x in source.localora().loras:
        named = [lo.path for lo in catalog.values() if lo.path.name == Path(x.file).name or lo.path.stem == x.name]
        found = folders.find(x.name)
        others = [lo.path for lo in catalog.values() if lo.path not in named]
        match = next((p for p in [*named, *([found] if found else []), *others]
                      if p.is_file() and file_hash(p) == x.sha256), None)
        if match is None:
            raise LocaloraError(f"{source.path}: its LoRA {x.file} (sha256 {x.sha256[:12]}) is not in a catalog or "
                                f"LoRA folder ({folders.describe()}); put that file in a --lora-dir")
        entry = next((lo for lo in catalog.values() if lo.path == match), None)
        out.append(entry or loralib.lora_from_file(match))
    return out


def replay(source: Source, profile: Profile, catalog: dict[str, Lora], folders: LoraFolders) -> Replay:
    if source.info is not None:
        info = source.info
        if info.profile != profile.name:
            raise LocaloraError(f"{source.path}: rendered with profile '{info.profile}', not '{profile.name}'; "
                                f"give --profile {info.profile} (or leave --profile out)")
        sampling = Sampling(seed=info.seed, negative_prompt=info.negative_prompt, steps=info.steps,
                            guidance=info.guidance, width=info.width, height=info.height,
                            switch_every=info.switch_every or Sampling().switch_every,
                            max_sequence_length=info.max_sequence_length,
                            cache_interval=Sampling().cache_interval if info.cache_interval is None else info.cache_interval)
        return Replay(info.prompt, tuple(source_loras(source, catalog, folders)), info.weights, info.method, sampling,
                      blocks=info.blocks)
    return _from_a1111(source, catalog, folders, profile)


_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


def _same_lora(path: Path, want: str) -> bool:
    """Whether a LoRA file has the hash an infotext gives: A1111's addnet hash (sha256 of the
    tensor data) or Forge's (sha256 of the whole file, modules/hashes.py), each as a prefix."""
    return safetensors_data_hash(path).startswith(want) or file_hash(path).startswith(want)


# The settings --from renders with; every other field of the line is named in a note.
HONOURED = ("Steps", "CFG scale", "Seed", "Size", "Lora hashes")
UNSEEN = ("Version",)  # says who wrote the image, not how


def profile_settings(profile: Profile) -> dict[str, str]:
    """The Sampler and Schedule type fields a render on `profile` writes: the same in the image is no difference."""
    from localora.diffusion.metadata import a1111
    from localora.diffusion.metadata.info import sigma_schedule, timestep_spacing

    spec = profile.diffusion
    try:
        sigmas, spacing = sigma_schedule(spec), timestep_spacing(spec)
    except LocaloraError:  # the model is not here: the render says so in its own words
        sigmas, spacing = "default", "leading"
    sigmas = "default" if spec.scheduler in ("euler_a", "ddim") else sigmas
    label = a1111.SPACING_LABELS.get(spacing, "DDIM") if sigmas == "default" else a1111.SIGMA_LABELS[sigmas]
    return {"Sampler": a1111.SAMPLERS[spec.scheduler], "Schedule type": label}


def _unhonoured(fields: dict[str, str], own: dict[str, str]) -> list[str]:
    """One note per field of the image that this render does not follow, by name."""
    notes = []
    for key, value in fields.items():
        if key in HONOURED or key in UNSEEN or own.get(key) == value:
            continue
        notes.append(f"{key}: {value} is not used (the profile's own setting renders it)")
    return notes


def _from_a1111(source: Source, catalog: dict[str, Lora], folders: LoraFolders, profile: Profile) -> Replay:
    """A stock A1111/Forge infotext as a Merge render: its tags' LoRAs at their weights."""
    parsed = parse_infotext(source.infotext)
    prompt, tags = loralib.lora_tags(parsed["prompt"])
    if not tags:
        raise LocaloraError(f"{source.path}: its A1111 prompt has no <lora:...> tags; nothing to combine")
    fields, where = parsed["fields"], str(source.path)
    chosen = [loralib.choose(name, weight, catalog, folders, f"{where}: <lora:{name}>") for name, weight, _ in tags]
    from localora.diffusion import blocks as blocklib

    blocks = tuple(None if lbw is None else blocklib.parse(lbw, profile.diffusion.arch, f"{where}: <lora:{name}:...:lbw={lbw}>")
                   for name, _, lbw in tags)
    notes = []
    # "NAME: HASH, NAME: HASH": every key stripped (A1111 joins the pairs with ", ").
    hashes = {k.strip(): v.strip() for k, v in (h.split(":", 1) for h in fields.get("Lora hashes", "").split(",")
                                                if ":" in h)}
    for (name, _, _), choice in zip(tags, chosen):
        want = hashes.get(name.replace(":", "").replace(",", "").strip(), "").lower()
        if want and not _same_lora(choice.lora.path, want):
            notes.append(f"{choice.lora.path} is not the {name} the image was made with (Lora hash {want}); "
                         f"the render will differ")
    try:
        size = _SIZE.match(fields["Size"]) if "Size" in fields else None
        sampling = Sampling(seed=int(fields.get("Seed", 0)), negative_prompt=parsed["negative_prompt"] or None,
                            steps=int(fields["Steps"]) if "Steps" in fields else None,
                            guidance=float(fields["CFG scale"]) if "CFG scale" in fields else None,
                            width=int(size.group(1)) if size else None, height=int(size.group(2)) if size else None)
    except ValueError as e:
        raise LocaloraError(f"{where}: its A1111 settings line has a value localora cannot read ({e})") from None
    notes += _unhonoured(fields, profile_settings(profile))
    weights = tuple(1.0 if c.weight is None else c.weight for c in chosen)
    return Replay(prompt, tuple(c.lora for c in chosen), weights, "merge", sampling, tuple(notes),
                  blocks if blocklib.any_blocks(blocks) else ())
