"""LoRA files: what they are (format, base architecture, rank, targets) and what they are called.

A LoRA is a .safetensors file plus a name, a category and trigger words. Those come from a
catalog (TOML), else the safetensors header (modelspec / kohya ss_* keys), else an A1111 sidecar
.json, in that order. Only safetensors are read, and only their header until a render needs the
tensors; pickled formats are refused without being opened.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from localora.errors import LocaloraError

CATEGORIES = ("character", "clothing", "style", "background", "object")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
ARCH_NAMES = {"sdxl": "SDXL", "sd15": "SD1.5", "sd2": "SD2"}


@dataclass(frozen=True)
class Lora:
    name: str
    path: Path
    category: str | None = None
    triggers: str = ""
    references: tuple[Path, ...] = ()


@dataclass(frozen=True)
class LoraChoice:
    """A LoRA picked for a render, with the weight the user gave (None: method default)."""

    lora: Lora
    weight: float | None = None


@dataclass(frozen=True)
class Header:
    shapes: dict[str, list[int]]
    metadata: dict[str, str]


@dataclass(frozen=True)
class LoraInfo:
    format: str  # "diffusers" or "kohya"
    arch: str | None  # "sdxl", "sd15", "sd2" or None when nothing tells
    arch_evidence: str
    rank: int
    alpha: float | None
    components: tuple[str, ...]  # unet, text_encoder, text_encoder_2
    targets: tuple[str, ...]  # module kinds, e.g. to_q, to_k, ff.net.2
    layers: int
    triggers: str
    metadata: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------ reading files

def check_suffix(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LocaloraError(
            f"{path}: {path.suffix} files are pickles and can run code when loaded; localora reads "
            f"only .safetensors (convert it with a trusted tool, or get the .safetensors release)"
        )


def read_header(path: Path) -> Header:
    """Tensor shapes and metadata from the safetensors header; one clear error if unreadable."""
    from safetensors import safe_open

    check_suffix(path)
    if not path.is_file():
        raise LocaloraError(f"{path}: LoRA file not found; check the path or the catalog entry")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    except Exception as e:
        raise LocaloraError(
            f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]}); "
            f"the download may be truncated or corrupt, fetch it again"
        ) from None
    return Header(shapes, metadata)


def inspect(path: Path) -> LoraInfo:
    header = read_header(path)
    keys = list(header.shapes)
    if any(k.startswith(("lora_unet_", "lora_te")) and ".lora_down." in k for k in keys):
        fmt = "kohya"
        down = [k for k in keys if k.endswith(".lora_down.weight")]
        modules = [k.removesuffix(".lora_down.weight") for k in down]
        components = sorted({_kohya_component(m) for m in modules})
        alphas = {float(_scalar(path, m + ".alpha")) for m in modules if m + ".alpha" in header.shapes}
        alpha = alphas.pop() if len(alphas) == 1 else None
        targets = sorted({_kohya_target(m) for m in modules})
    elif any(".lora_A." in k or ".lora.down." in k for k in keys):
        fmt = "diffusers"
        down = [k for k in keys if ".lora_A." in k or ".lora.down." in k]
        modules = [k.split(".lora_A.")[0].split(".lora.down.")[0] for k in down]
        components = sorted({m.split(".")[0] for m in modules})
        alpha = _peft_alpha(header.metadata)
        targets = sorted({_diffusers_target(m) for m in modules})
    else:
        kinds = "LyCORIS (LoHa/LoKr)" if any("hada_" in k or "lokr_" in k for k in keys) else "a full model or another network"
        raise LocaloraError(
            f"{path}: not a LoRA (no lora_down/lora_up or lora_A/lora_B tensors; looks like {kinds}); "
            f"localora composes standard LoRA files only"
        )
    ranks = {header.shapes[k][0] for k in down}
    arch, evidence = _arch(header, path)
    return LoraInfo(
        format=fmt, arch=arch, arch_evidence=evidence, rank=max(ranks), alpha=alpha,
        components=tuple(components), targets=tuple(targets), layers=len(modules),
        triggers=triggers_from_header(header.metadata) or triggers_from_sidecar(path), metadata=header.metadata,
    )


def _scalar(path: Path, key: str) -> float:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(key).item()


def _kohya_component(module: str) -> str:
    if module.startswith("lora_te2_"):
        return "text_encoder_2"
    if module.startswith(("lora_te_", "lora_te1_")):
        return "text_encoder"
    return "unet"


def _kohya_target(module: str) -> str:
    for t in ("to_q", "to_k", "to_v", "to_out_0", "proj_in", "proj_out", "ff_net_0_proj", "ff_net_2",
              "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "conv1", "conv2", "conv_shortcut"):
        if module.endswith(t):
            return t.replace("_0", ".0").replace("ff_net_", "ff.net.")
    return module.rsplit("_", 1)[-1]


def _diffusers_target(module: str) -> str:
    parts = module.split(".")
    if parts[-1].isdigit():
        return ".".join(parts[-2:])
    if parts[-2:-1] == ["proj"] or (len(parts) > 2 and parts[-3] == "ff"):
        return ".".join(parts[-3:])
    return parts[-1]


def _peft_alpha(metadata: dict[str, str]) -> float | None:
    for key in ("lora_adapter_metadata", "unet.lora_adapter_metadata"):
        if key in metadata:
            try:
                return float(json.loads(metadata[key]).get("lora_alpha"))
            except (ValueError, TypeError, AttributeError):
                return None
    return None


def _arch(header: Header, path: Path) -> tuple[str | None, str]:
    md = header.metadata
    spec = md.get("modelspec.architecture", "")
    if spec:
        if "stable-diffusion-xl" in spec:
            return "sdxl", f"modelspec.architecture = {spec}"
        if "stable-diffusion-v1" in spec:
            return "sd15", f"modelspec.architecture = {spec}"
        if "stable-diffusion-v2" in spec:
            return "sd2", f"modelspec.architecture = {spec}"
    base = md.get("ss_base_model_version", "")
    if base.startswith("sdxl"):
        return "sdxl", f"ss_base_model_version = {base}"
    if base.startswith("sd_v1"):
        return "sd15", f"ss_base_model_version = {base}"
    if base.startswith("sd_v2"):
        return "sd2", f"ss_base_model_version = {base}"
    keys = header.shapes
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl", "has second text encoder (text_encoder_2) tensors"
    # Cross-attention key/value projections read the text embedding: its width tells the base.
    for k, shape in keys.items():
        if ("attn2" in k and ("to_k" in k) and (".lora_down." in k or ".lora_A." in k)):
            dim = shape[1]
            arch = {2048: "sdxl", 768: "sd15", 1024: "sd2"}.get(dim)
            if arch:
                return arch, f"cross-attention width {dim}"
            break
    sidecar = _sidecar(path).get("sd version", "")
    table = {"SDXL": "sdxl", "SD1": "sd15", "SD1.5": "sd15", "SD15": "sd15", "SD2": "sd2"}
    if sidecar.upper() in table:
        return table[sidecar.upper()], f"sidecar 'sd version' = {sidecar}"
    return None, "nothing in the file says"


# ------------------------------------------------------------------ trigger words

def triggers_from_header(metadata: dict[str, str]) -> str:
    phrase = metadata.get("modelspec.trigger_phrase", "").strip()
    if phrase:
        return phrase
    raw = metadata.get("ss_tag_frequency")
    if raw:
        try:
            freq: dict[str, int] = {}
            for tags in json.loads(raw).values():
                for tag, n in tags.items():
                    freq[tag.strip()] = freq.get(tag.strip(), 0) + int(n)
        except (ValueError, AttributeError, TypeError):
            return ""
        if freq:
            # Trigger tags appear in every caption of the training set: the top count.
            top = max(freq.values())
            return ", ".join(t for t, n in freq.items() if n == top and t)
    return ""


def _sidecar(path: Path) -> dict:
    side = path.with_suffix(".json")
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        raise LocaloraError(f"{side}: sidecar is not valid JSON; fix or delete it") from None
    return data if isinstance(data, dict) else {}


def triggers_from_sidecar(path: Path) -> str:
    return str(_sidecar(path).get("activation text", "")).strip()


def lora_from_file(path: Path, name: str | None = None, category: str | None = None, triggers: str | None = None,
                   references: tuple[Path, ...] = ()) -> Lora:
    """A Lora for a file, filling what the caller did not give from header, then sidecar."""
    header = read_header(path)
    name = name or header.metadata.get("ss_output_name") or header.metadata.get("modelspec.title") or path.stem
    if triggers is None:
        triggers = triggers_from_header(header.metadata) or triggers_from_sidecar(path)
    return Lora(name=name, path=path.resolve(), category=category, triggers=triggers, references=references)


# ------------------------------------------------------------------ catalogs

def read_catalog(path: Path) -> dict[str, Lora]:
    """[loras.NAME] tables: file (relative to the catalog), category, triggers, references."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LocaloraError(f"{path}: LoRA catalog not found") from None
    except tomllib.TOMLDecodeError as e:
        raise LocaloraError(f"{path}: not valid TOML ({e})") from None
    out = {}
    for name, t in data.get("loras", {}).items():
        where = f"{path} [loras.{name}]"
        if not isinstance(t, dict) or "file" not in t:
            raise LocaloraError(f"{where}: needs at least file = \"NAME.safetensors\"")
        category = t.get("category")
        if category is not None and category not in CATEGORIES:
            raise LocaloraError(f"{where}: category '{category}' is not one of {', '.join(CATEGORIES)}")
        base = Path(path).resolve().parent
        file = (base / Path(t["file"]).expanduser()).resolve()
        check_suffix(file)
        refs = tuple((base / r).resolve() for r in t.get("references", []))
        out[name] = Lora(name=name, path=file, category=category, triggers=str(t.get("triggers", "")), references=refs)
    return out


def parse_choice(text: str, catalog: dict[str, Lora]) -> LoraChoice:
    """'NAME_OR_PATH[:WEIGHT]' -> LoraChoice. Negative weights are legal (as in A1111)."""
    target, weight = text, None
    if ":" in text:
        head, tail = text.rsplit(":", 1)
        if not (len(head) == 1 and head.isalpha()):  # leave Windows drive letters alone
            target = head
            try:
                weight = float(tail)
            except ValueError:
                raise LocaloraError(f"--lora {text}: weight '{tail}' is not a number (use NAME:0.8)") from None
            if not math.isfinite(weight):
                raise LocaloraError(f"--lora {text}: weight must be a finite number, got '{tail}'")
    if target in catalog:
        lora = catalog[target]
        if not lora.path.is_file():
            raise LocaloraError(f"{lora.path}: LoRA file of catalog entry '{target}' not found; fix its `file`")
        return LoraChoice(lora, weight)
    path = Path(target).expanduser()
    check_suffix(path)
    if path.suffix.lower() == ".safetensors" or path.exists():
        if not path.is_file():
            raise LocaloraError(f"{path}: LoRA file not found; check the path")
        return LoraChoice(lora_from_file(path), weight)
    known = ", ".join(sorted(catalog)) or "none"
    raise LocaloraError(f"--lora {target}: no such LoRA name or .safetensors file; known names: {known}")


def switch_order(loras: list[Lora]) -> list[int]:
    """Indices in LoRA Switch order: character first, then clothing, style, background, object."""
    rank = {c: i for i, c in enumerate(CATEGORIES)}
    return sorted(range(len(loras)), key=lambda i: rank.get(loras[i].category or "", len(CATEGORIES)))


def with_triggers(prompt: str, loras: list[Lora]) -> str:
    """The prompt followed by each LoRA's trigger words (those it does not already contain)."""
    parts = [prompt.strip()] if prompt.strip() else []
    parts += [lora.triggers for lora in loras if lora.triggers and lora.triggers not in prompt]
    return ", ".join(parts)


def known_loras(arch: str, tiny_profile: bool, catalogs: list[Path] = ()) -> dict[str, Lora]:
    """LoRAs that can be named: the demo set on tiny profiles, $LOCALORA_HOME/loras.toml, then
    the catalogs given (later ones win)."""
    from localora import paths

    known: dict[str, Lora] = {}
    if tiny_profile:
        from localora import tiny

        known.update(read_catalog(tiny.ensure(f"loras-{arch}") / "catalog.toml"))
    user = paths.home() / "loras.toml"
    for cat in ([user] if user.is_file() else []) + list(catalogs):
        known.update(read_catalog(Path(cat)))
    return known
