"""Model profiles from models.toml: which diffusion base, VLM and CLIP model a run uses.

This module only reads and checks the file and says where weights are; it loads nothing heavy.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localora import archs, paths
from localora.errors import LocaloraError, MissingError, check_keys

ARCHS = tuple(archs.ARCHS)
SCHEDULERS = ("euler", "euler_a", "dpmpp_2m", "ddim", "flow_euler")  # flow_euler: the flow-matching bases' own
DTYPES = ("float32", "float16", "bfloat16")
QUANTIZATIONS = ("none", "nf4", "int8")
PLACEMENTS = ("auto", "swap", "resident", "reload")  # see localora/devices.py
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class DiffusionSpec:
    name: str
    arch: str
    source: str
    scheduler: str = "euler"
    steps: int = 30
    guidance: float = 7.0
    width: int = 1024
    height: int = 1024
    dtype: str = "float16"
    vae: str | None = None
    negative_prompt: str = ""
    # A1111's "Model hash" (AutoV2: first 10 hex of the checkpoint file's sha256) of the same
    # weights, for the infotext; a diffusers folder has no single file to hash.
    a1111_hash: str | None = None
    # Text tokens the prompt is encoded to (T5 / Qwen3 encoders; None: the pipeline's default, 512)
    max_sequence_length: int | None = None
    # The denoiser and large text encoder in 4-bit NF4 or 8-bit (bitsandbytes), for 12-24 GB cards
    quantization: str = "none"


@dataclass(frozen=True)
class VLMSpec:
    name: str
    source: str
    quantization: str = "nf4"
    dtype: str = "bfloat16"
    min_pixels: int = 200704
    max_pixels: int = 401408


@dataclass(frozen=True)
class ClipSpec:
    name: str
    source: str
    # Few-shot selection drops grid images whose weakest LoRA scores under this CLIP-T cosine;
    # where a LoRA "shows" depends on the CLIP model, so the threshold belongs to it.
    fewshot_threshold: float = 0.18


@dataclass(frozen=True)
class Profile:
    name: str
    diffusion: DiffusionSpec
    vlm: VLMSpec
    clip: ClipSpec
    description: str = ""
    # "auto": keep models on the accelerator while they fit, else move them (localora/devices.py).
    placement: str = "auto"
    device: str = "auto"


@dataclass(frozen=True)
class Catalog:
    path: Path
    default_profile: str
    profiles: dict[str, Profile] = field(default_factory=dict)
    vlms: dict[str, VLMSpec] = field(default_factory=dict)  # every [vlm.NAME] table, for --vlm

    def get(self, name: str | None, vlm: str | None = None) -> Profile:
        """Profile `name` (None: the default); with `vlm`, its VLM replaced by [vlm.VLM] (--vlm)."""
        name = name or self.default_profile
        if name not in self.profiles:
            known = ", ".join(sorted(self.profiles))
            raise LocaloraError(f"unknown profile '{name}' (in {self.path}); known profiles: {known}")
        profile = self.profiles[name]
        return profile if vlm is None else dataclasses.replace(profile, vlm=self.vlm(vlm))

    def vlm(self, name: str) -> VLMSpec:
        if name not in self.vlms:
            raise LocaloraError(f"--vlm {name}: no [vlm.{name}] in {self.path}; known VLMs: {', '.join(sorted(self.vlms))}")
        return self.vlms[name]


def _build(cls: type, name: str, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise LocaloraError(f"{where}: expected a table, got {type(table).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "name"}
    check_keys(table, fields, [k for k, f in fields.items() if f.default is dataclasses.MISSING], where)
    for key, value in table.items():
        want = fields[key].type
        ok = {
            "str": isinstance(value, str),
            "str | None": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "int | None": isinstance(value, int) and not isinstance(value, bool) and value > 0,
            "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        }.get(str(want), True)
        if not ok:
            raise LocaloraError(f"{where}: '{key}' must be {want}, got {value!r}")
    return cls(name=name, **table)


def _choice(value: str, allowed: tuple[str, ...], where: str) -> None:
    if value not in allowed:
        raise LocaloraError(f"{where}: '{value}' is not one of {', '.join(allowed)}")


def check_tiny_source(source: str, kind: str, where: str) -> None:
    """A "tiny:NAME" source must name a tiny part of this kind; found when the file is read, not at
    first use."""
    if not is_tiny(source):
        return
    from localora import tiny  # light: the builders are imported only when a part is built

    name = source.removeprefix("tiny:")
    if name not in tiny.KINDS[kind]:
        known = ", ".join("tiny:" + n for n in tiny.KINDS[kind])
        raise LocaloraError(f"{where}: no tiny {kind} model '{source}'; known: {known}")


TOP_LEVEL_KEYS = ("default_profile", "profiles", "diffusion", "vlm", "clip")


def load_catalog(path: Path | None = None) -> Catalog:
    """Read and check models.toml; every error names the file and the table at fault."""
    path = Path(path) if path else paths.models_toml()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LocaloraError(f"{path}: models file not found; set LOCALORA_MODELS to a models.toml") from None
    except tomllib.TOMLDecodeError as e:
        raise LocaloraError(f"{path}: not valid TOML ({e}); fix the file or restore it from the project") from None

    # A misspelt table ([profile.x] for [profiles.x]) would otherwise be silently ignored.
    check_keys(data, TOP_LEVEL_KEYS, (), str(path))
    comps: dict[str, dict[str, Any]] = {}
    for kind, cls in (("diffusion", DiffusionSpec), ("vlm", VLMSpec), ("clip", ClipSpec)):
        comps[kind] = {n: _build(cls, n, t, f"{path} [{kind}.{n}]") for n, t in data.get(kind, {}).items()}
    for kind, specs in comps.items():
        for n, spec in specs.items():
            check_tiny_source(spec.source, kind, f"{path} [{kind}.{n}] source")
    for n, d in comps["diffusion"].items():
        _choice(d.arch, ARCHS, f"{path} [diffusion.{n}] arch")
        if is_tiny(d.source) and d.source != f"tiny:{d.arch}":
            raise LocaloraError(f"{path} [diffusion.{n}]: source {d.source} is not a {d.arch} model; "
                                f"use source = \"tiny:{d.arch}\" or arch = \"{d.source.removeprefix('tiny:')}\"")
        _choice(d.scheduler, SCHEDULERS, f"{path} [diffusion.{n}] scheduler")
        if archs.arch(d.arch).flow != (d.scheduler == "flow_euler"):
            want = "flow_euler" if archs.arch(d.arch).flow else "one of euler, euler_a, dpmpp_2m, ddim"
            raise LocaloraError(f"{path} [diffusion.{n}]: scheduler '{d.scheduler}' does not fit the "
                                f"{archs.arch(d.arch).label} base; use {want}")
        _choice(d.quantization, QUANTIZATIONS, f"{path} [diffusion.{n}] quantization")
        _choice(d.dtype, DTYPES, f"{path} [diffusion.{n}] dtype")
        if d.a1111_hash is not None and not re.fullmatch(r"[0-9a-f]{10}", d.a1111_hash):
            raise LocaloraError(f"{path} [diffusion.{n}]: a1111_hash '{d.a1111_hash}' is not 10 lowercase hex digits "
                                f"(A1111's AutoV2 hash, as its infotext shows it); fix it or remove the key")
        multiple = archs.arch(d.arch).size_multiple
        if d.steps < 1 or d.width % multiple or d.height % multiple:
            raise LocaloraError(f"{path} [diffusion.{n}]: steps must be >= 1 and width/height multiples of {multiple}")
    for n, v in comps["vlm"].items():
        _choice(v.quantization, QUANTIZATIONS, f"{path} [vlm.{n}] quantization")
        _choice(v.dtype, DTYPES, f"{path} [vlm.{n}] dtype")
        if not 0 < v.min_pixels <= v.max_pixels:
            raise LocaloraError(f"{path} [vlm.{n}]: min_pixels {v.min_pixels} and max_pixels {v.max_pixels} "
                                f"need 0 < min_pixels <= max_pixels")

    profiles: dict[str, Profile] = {}
    for pname, table in data.get("profiles", {}).items():
        where = f"{path} [profiles.{pname}]"
        if not isinstance(table, dict):
            raise LocaloraError(f"{where}: expected a table")
        table = dict(table)
        resolved = {}
        for kind in ("diffusion", "vlm", "clip"):
            ref = table.pop(kind, None)
            if ref is None:
                raise LocaloraError(f"{where}: missing key '{kind}'")
            if ref not in comps[kind]:
                raise LocaloraError(f"{where}: {kind} '{ref}' is not defined; add a [{kind}.{ref}] table")
            resolved[kind] = comps[kind][ref]
        extra = set(table) - {"description", "placement", "device"}
        if extra:
            raise LocaloraError(f"{where}: unknown key(s) {', '.join(sorted(extra))}")
        _choice(table.get("placement", "auto"), PLACEMENTS, f"{where} placement")
        if not DEVICE.match(str(table.get("device", "auto"))):
            raise LocaloraError(f"{where}: device '{table['device']}' is not auto, cpu, mps, cuda or cuda:N")
        profiles[pname] = Profile(name=pname, **resolved, **table)

    default = data.get("default_profile", "tiny")
    if default not in profiles:
        raise LocaloraError(f"{path}: default_profile '{default}' is not a defined profile")
    user = paths.read_config()  # the user's own default wins over the file's
    if user.default_profile is not None:
        if user.default_profile not in profiles:
            raise LocaloraError(f"{user.path}: default_profile '{user.default_profile}' is not a profile of {path}; "
                                f"known profiles: {', '.join(sorted(profiles))}")
        default = user.default_profile
    return Catalog(path=path, default_profile=default, profiles=profiles, vlms=comps["vlm"])


def load_profile(name: str | None = None, path: Path | None = None, vlm: str | None = None) -> Profile:
    """Profile `name` of models.toml; `vlm` names a [vlm.NAME] table to use instead of its VLM."""
    return load_catalog(path).get(name, vlm)


def run_dtype(spec_dtype: str, device_type: str, cpu: str = "float32") -> str:
    """The dtype a model runs in: $LOCALORA_DTYPE if set (every model), else the profile's on an
    accelerator and float32 on a CPU, where half precision is slow unless asked for (bfloat16 on a
    CPU exercises the half-precision code a GPU user runs)."""
    override = os.environ.get("LOCALORA_DTYPE")
    if override:
        if override not in DTYPES:
            raise LocaloraError(f"LOCALORA_DTYPE={override}: not one of {', '.join(DTYPES)}")
        return override
    return spec_dtype if device_type != "cpu" else cpu


# ------------------------------------------------------------------ where the weights are

def is_tiny(source: str) -> bool:
    return source.startswith("tiny:")


def is_local_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().exists()


def locate(source: str, what: str) -> Path:
    """The local path of a model source, or one LocaloraError saying how to get it.

    Never downloads: a hub id must already be in the local HF cache.
    """
    if is_tiny(source):
        from localora import tiny  # builds on first use, so only when asked for

        return tiny.ensure(source.removeprefix("tiny:"))
    if source.startswith("hf-hub:"):
        source = source.removeprefix("hf-hub:")
    if is_local_path(source):
        p = Path(source).expanduser()
        if not p.exists():
            raise MissingError(f"{what}: local path {p} does not exist; fix `source` in models.toml")
        return p
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception:
        raise _not_cached(what, source) from None


NOT_CACHED = "is not in the local Hugging Face cache"  # how availability() says a model was not downloaded


def _not_cached(what: str, repo_id: str) -> MissingError:
    # Here the profile is not known (require() names it): the repo's own command, and pull's form.
    return MissingError(
        f"{what}: '{repo_id}' {NOT_CACHED}; fetch it once with `hf download {repo_id}` "
        f"(or with `localora pull` and the name of a profile that uses it), or set `source` in models.toml to a "
        f"local folder")


def _cached_snapshot(repo_id: str) -> Path | None:
    """The main revision's snapshot in the local HF cache, as snapshot_download(local_files_only=True)
    finds it, read directly: importing huggingface_hub's client takes seconds `localora models` need not spend."""
    from huggingface_hub.constants import HF_HUB_CACHE

    folder = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    ref = folder / "refs" / "main"
    snapshot = folder / "snapshots" / ref.read_text().strip() if ref.is_file() else None
    return snapshot if snapshot is not None and snapshot.is_dir() else None


# Files that are pickles (they can run code when loaded): refused as LoRAs, named as model weights.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def check_no_pickled_weights(path: Path, what: str) -> None:
    """After a load with use_safetensors failed: if a folder of the model holds pickled weights and
    no safetensors (a component saved the old way), say so in one line; the loader's own message is
    about missing files. A pickle beside safetensors (a repo's training_args.bin) is not the cause."""
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    with_safetensors = {p.parent for p in files if p.suffix.lower() == ".safetensors"}
    pickled = sorted(p.relative_to(path).as_posix() for p in files
                     if p.suffix.lower() in PICKLE_SUFFIXES and p.parent not in with_safetensors)
    if pickled:
        shown = ", ".join(pickled[:3]) + (f" and {len(pickled) - 3} more" if len(pickled) > 3 else "")
        raise LocaloraError(f"{what}: {path} has pickled weights ({shown}) where its .safetensors should be; "
                            f"pickles can run code when loaded, so localora loads only safetensors: fetch the "
                            f"model's .safetensors files, or convert them with a trusted tool")


# The file that makes a folder a model of each kind; without it, a folder is not "ok" (an empty
# folder, or the wrong one, would otherwise pass until the first load).
MODEL_FILES = {"diffusion": "model_index.json", "vae": "config.json", "vlm": "config.json",
               "clip": "open_clip_config.json"}


def model_sources(profile: Profile) -> list[tuple[str, str, str]]:
    """(role, name, source) of each model of `profile`: diffusion, its separate VAE if any, vlm, clip."""
    d = profile.diffusion
    return [("diffusion", d.name, d.source), *([("vae", d.vae, d.vae)] if d.vae else []),
            ("vlm", profile.vlm.name, profile.vlm.source), ("clip", profile.clip.name, profile.clip.source)]


def pull_command(profile: Profile, vlm: str | None = None) -> str:
    return f"localora pull {profile.name}" + (f" --vlm {vlm}" if vlm else "")


def missing_error(profile: Profile, states: list[tuple[str, str]], vlm: str | None = None,
                  judges: list[tuple[str, str]] = ()) -> MissingError | None:
    """The one line for the models of `profile` whose availability() state is missing, and for
    extra VLMs (`judges`: name, state; each fetched with the profile's pull and --vlm NAME); None
    when all are here. A local folder that is gone or not a model says to fix models.toml:
    pulling would not help."""
    for name, state in [*states, *judges]:
        if state.startswith("missing") and NOT_CACHED not in state:
            return MissingError(f"{name}: {state.removeprefix('missing: ')}")
    names = [name for name, state in states if state.startswith("missing")]
    extra = [name for name, state in judges if state.startswith("missing") and name not in names]
    if not names and not extra:
        return None
    commands = ([pull_command(profile, vlm)] if names else []) + [pull_command(profile, j) for j in extra]
    return MissingError(f"{', '.join(names + extra)} not here; fetch with "
                        f"{' and '.join(f'`{c}`' for c in commands)} (on a connected machine, then copy the "
                        f"Hugging Face cache)")


def require(profile: Profile, roles: tuple[str, ...] = ("diffusion", "vlm", "clip"), vlm: str | None = None,
            judges: tuple[VLMSpec, ...] = ()) -> None:
    """One line naming every model of `profile` in `roles` (a separate VAE goes with diffusion),
    and every VLM of `judges`, that is not here, with the commands that fetch them: before a
    command writes anything. A tiny model not built yet is fine (it is built on first use)."""
    roles = (*roles, "vae") if "diffusion" in roles else roles
    states = [(name, availability(source, role)) for role, name, source in model_sources(profile) if role in roles]
    judged = [(j.name, availability(j.source, "vlm")) for j in judges]
    if missing_error(profile, states, vlm, judged) is None:
        return
    listed = load_catalog().profiles.get(profile.name)
    if vlm is None and listed is not None and listed.vlm.name != profile.vlm.name:  # --vlm NAME: say it again
        vlm = profile.vlm.name
    raise missing_error(profile, states, vlm, judged)


NOT_DOWNLOADED = "missing (not downloaded)"


def listed(state: str) -> str:
    """An availability() state for a list of models that ends with the profile's pull command: a
    model not in the Hugging Face cache is two words there, not the whole sentence again."""
    return NOT_DOWNLOADED if NOT_CACHED in state else state


def availability(source: str, kind: str | None = None) -> str:
    """'ok', 'built on first use' or the reason it is missing; for `localora models`. A local
    folder must hold the file of a model of `kind` (any kind's when not given)."""
    if is_tiny(source):
        from localora import tiny

        return "ok" if tiny.is_built(source.removeprefix("tiny:")) else "built on first use"
    repo_id = source.removeprefix("hf-hub:")
    if not is_local_path(repo_id):
        return "ok" if _cached_snapshot(repo_id) else "missing: " + str(_not_cached(source, repo_id)).split(": ", 1)[1]
    try:
        path = locate(source, source)
    except LocaloraError as e:
        return "missing: " + str(e).split(": ", 1)[1]
    if path.is_dir():
        wanted = [MODEL_FILES[kind]] if kind else sorted(set(MODEL_FILES.values()))
        if not any((path / name).is_file() for name in wanted):
            what = f"a {kind} model" if kind else "a model"
            return f"missing: {path} has no {' or '.join(wanted)}, so it is not {what} folder; fix `source` in models.toml"
    return "ok"
