"""LoRA files: what they are (format, base architecture, rank, targets) and what they are called.

A LoRA is a .safetensors file plus a name, a category and trigger words. Those come from a
catalog (TOML), else the safetensors header (modelspec / kohya ss_* keys), else an A1111 sidecar
NAME.json ("activation text"), else civitai's NAME.civitai.info ("trainedWords"), in that order.
The A1111 sidecar's "preferred weight" is the weight when the user gives none. Only safetensors
are read, and only their header until a render needs the tensors; pickled formats are refused
without being opened.

A LoRA is named by a catalog entry, a path, or a bare name looked up by file stem in the LoRA
folders (--lora-dir, then $LOCALORA_LORA_DIRS, then lora_dirs in config.toml), the way A1111
(models/Lora/sub/x.safetensors) and ComfyUI (models/loras/x.safetensors) users name them; in a
prompt, as A1111's <lora:NAME:WEIGHT> tag.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from localora import archs
from localora.errors import LocaloraError, MissingError, check_keys
from localora.profiles import PICKLE_SUFFIXES

CATEGORIES = ("character", "clothing", "style", "background", "object")
# The bases localora renders and those it recognises only to refuse them by name (archs.py).
ARCH_NAMES = archs.LORA_BASES


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
    lbw: str | None = None  # LoRA Block Weight's lbw= item as written (a preset or a vector): blocks.parse


@dataclass(frozen=True)
class Header:
    shapes: dict[str, list[int]]
    metadata: dict[str, str]


@dataclass(frozen=True)
class LoraInfo:
    format: str  # "diffusers", "kohya" or "xlabs" (BFL-named files load as "diffusers" with their prefix)
    arch: str | None  # a key of ARCH_NAMES, or None when nothing tells
    arch_evidence: str
    rank: int
    alpha: float | None
    components: tuple[str, ...]  # unet or transformer, text_encoder, text_encoder_2
    targets: tuple[str, ...]  # module kinds, e.g. to_q, to_k, ff.net.2
    layers: int
    triggers: str
    metadata: dict[str, str] = field(default_factory=dict)
    blocks: str = ""  # which blocks it targets, e.g. "double 0-18, single 0-37" or "down 1-2, mid, up 0-1"


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
        raise MissingError(f"{path}: LoRA file not found; check the path or the catalog entry")
    try:
        with safe_open(str(path), framework="numpy") as f:  # "pt" would import torch: seconds for a header
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    except Exception as e:
        pickled = pickle_kind(path)
        if pickled:
            raise LocaloraError(
                f"{path}: this is a pickle, not safetensors ({pickled}, named .safetensors); pickles can run "
                f"code when loaded, so localora never opens them: get the .safetensors release or convert it "
                f"with a trusted tool"
            ) from None
        raise LocaloraError(
            f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]}); "
            f"the download may be truncated or corrupt, fetch it again"
        ) from None
    return Header(shapes, metadata)


def pickle_kind(path: Path) -> str | None:
    """What a file that safetensors cannot read starts like, if it is a pickle: torch.save writes
    a zip archive (PK\\x03\\x04), older torch and plain pickle.dump a protocol 2-5 pickle (\\x80 N).
    Asked only after safetensors failed: a safetensors file starts with its header's length, whose
    first bytes can be anything."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if head == b"PK\x03\x04":
        return "a zip archive, as torch.save writes"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return f"a protocol {head[1]} pickle"
    return None


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
    elif any(".proj_lora" in k and k.endswith(".down.weight") for k in keys):
        fmt = "xlabs"  # XLabs' Flux LoRAs: double_blocks.N.processor.proj_lora1.down.weight
        down = [k for k in keys if k.endswith(".down.weight")]
        modules = [k.removesuffix(".down.weight") for k in down]
        components = ["transformer"]
        alpha = None
        targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    else:
        kinds = "LyCORIS (LoHa/LoKr)" if any("hada_" in k or "lokr_" in k for k in keys) else "a full model or another network"
        raise LocaloraError(
            f"{path}: not a LoRA (no lora_down/lora_up or lora_A/lora_B tensors; looks like {kinds}); "
            f"localora composes standard LoRA files only"
        )
    check_pairs(header, down, path)
    check_finite(path)
    ranks = {header.shapes[k][0] for k in down}
    arch, evidence = _arch(header, path)
    if arch in archs.ARCHS and archs.ARCHS[arch].denoiser == "transformer":
        # kohya calls every base's denoiser "unet"; BFL files prefix it diffusion_model
        components = sorted({"transformer" if c in ("unet", "diffusion_model", "lora_unet") else c for c in components})
    return LoraInfo(
        format=fmt, arch=arch, arch_evidence=evidence, rank=max(ranks), alpha=alpha,
        components=tuple(components), targets=tuple(targets), layers=len(modules),
        triggers=triggers_from_header(header.metadata) or triggers_from_sidecar(path), metadata=header.metadata,
        blocks=targeted_blocks(modules),
    )


# Block kinds as diffusers, kohya/SGM and BFL name them -> one word each; ordered as a model runs them.
_BLOCK_KINDS = (("down", r"(?:down_blocks|input_blocks)"), ("mid", r"(?:mid_block|middle_block)"),
                ("up", r"(?:up_blocks|output_blocks)"), ("single", r"single(?:_transformer)?_blocks"),
                ("double", r"(?:double_blocks|(?<!single_)transformer_blocks)"), ("noise_refiner", r"noise_refiner"),
                ("context_refiner", r"context_refiner"),
                ("layers", r"(?<![a-z])layers(?=[._]\d+[._](?:attention|feed|adaLN))"))


def targeted_blocks(modules: list[str]) -> str:
    """Which blocks a LoRA's modules sit in, with their index ranges ("double 0-18, single 0-37")."""
    found: dict[str, set[int]] = {}
    for m in modules:
        for kind, pattern in _BLOCK_KINDS:
            hit = re.search(pattern + r"(?:[._](\d+))?", m)
            if hit:
                found.setdefault(kind, set())
                if hit.group(1) is not None and kind != "mid":
                    found[kind].add(int(hit.group(1)))
                break
        else:
            if m.startswith(("lora_te", "text_encoder", "te_", "te1", "te2")):
                found.setdefault("text encoder", set())
    parts = []
    for kind in [k for k, _ in _BLOCK_KINDS] + ["text encoder"]:
        if kind in found:
            idx = sorted(found[kind])
            parts.append(kind if not idx else f"{kind} {idx[0]}" if len(idx) == 1 else f"{kind} {idx[0]}-{idx[-1]}")
    return ", ".join(parts)


def _up_key(down: str) -> str:
    if ".proj_lora" in down:  # xlabs
        return down.removesuffix(".down.weight") + ".up.weight"
    return down.replace(".lora_down.", ".lora_up.").replace(".lora_A.", ".lora_B.").replace(".lora.down.", ".lora.up.")


def check_pairs(header: Header, down: list[str], path: Path) -> None:
    """Every down (A) matrix has its up (B) matrix, of the same rank: B A is what a LoRA adds, and
    a file where they disagree fails deep inside peft, or loads half its layers. The header's
    shapes tell, so this costs nothing."""
    for d in down:
        up = _up_key(d)
        if up not in header.shapes:
            raise LocaloraError(f"{path}: {d} has no matching {up}; the file is damaged or not a plain LoRA, "
                                f"fetch it again or export it again")
        rank, up_rank = header.shapes[d][0], header.shapes[up][1] if len(header.shapes[up]) > 1 else None
        if rank != up_rank:
            raise LocaloraError(f"{path}: mismatched ranks: {d} has rank {rank} but {up} has rank {up_rank}; "
                                f"the file is damaged, fetch it again or export it again")


# sha256 of a LoRA file -> the first tensor holding NaN/Inf, or None. Reading every tensor costs
# about what hashing the file does (a 200 MB LoRA: a fraction of a second), and a render hashes
# its LoRAs anyway (adapter names, cache keys), so a file is checked once per content per process:
# inspect is called at `loras inspect`, and before every adapter load, and renaming or copying a
# file does not read it again, while a file changed in place gets a new hash and is read again.
_NONFINITE: dict[str, str | None] = {}


def check_finite(path: Path) -> None:
    """One line if a tensor of the file holds NaN or Inf: such a LoRA turns every render black."""
    from localora.files import file_hash

    digest = file_hash(path)
    if digest not in _NONFINITE:
        _NONFINITE[digest] = _first_nonfinite(path)
    bad = _NONFINITE[digest]
    if bad is not None:
        raise LocaloraError(f"{path}: tensor {bad} holds NaN/Inf values, so every render with it would be "
                            f"black or noise; the file is damaged or was saved from a diverged training run: "
                            f"fetch it again or use another epoch")


# safetensors float dtype -> (numpy view of its bits, the exponent mask): a value is NaN or Inf
# exactly when all its exponent bits are set. Reading bits works for bfloat16, which numpy lacks,
# and needs no torch, so `loras inspect` stays quick.
_FLOAT_BITS = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00),
               "BF16": ("<u2", 0x7F80)}


def _raw_header(path: Path) -> tuple[int, dict]:
    """The safetensors header as stored: its length, and name -> {dtype, shape, data_offsets}."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        return size, json.loads(f.read(size))


def _first_nonfinite(path: Path) -> str | None:
    import numpy as np

    size, header = _raw_header(path)
    if path.stat().st_size <= 8 + size:
        return None  # no tensor data at all
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    for key, entry in header.items():
        if key == "__metadata__" or entry.get("dtype") not in _FLOAT_BITS:
            continue
        view, mask = _FLOAT_BITS[entry["dtype"]]
        start, end = entry["data_offsets"]
        bits = data[start:end].view(view)
        if bool(((bits & mask) == mask).any()):
            return key
    return None


# safetensors dtype -> struct format of one element; BF16 is the high half of an F32.
_SCALAR_FORMATS = {"F64": "<d", "F32": "<f", "F16": "<e", "BF16": "<f", "I64": "<q", "I32": "<i", "I16": "<h",
                   "I8": "<b", "U8": "<B"}


def _scalar(path: Path, key: str) -> float:
    """A one-element tensor (kohya's alpha) read from the file's bytes: no torch, any dtype (numpy has
    no bfloat16)."""
    size, header = _raw_header(path)
    entry = header[key]
    start, end = entry["data_offsets"]
    with open(path, "rb") as f:
        f.seek(8 + size + start)
        raw = f.read(end - start)
    fmt = _SCALAR_FORMATS.get(entry["dtype"])
    if fmt is None or len(raw) != (2 if entry["dtype"] == "BF16" else struct.calcsize(fmt)):
        raise LocaloraError(f"{path}: {key} is not a one-number tensor ({entry['dtype']}, {len(raw)} bytes)")
    return struct.unpack(fmt, b"\x00\x00" + raw if entry["dtype"] == "BF16" else raw)[0]


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


FLUX_KEYS = ("single_transformer_blocks", "lora_unet_double_blocks_", "lora_unet_single_blocks_",
             "double_blocks.", "single_blocks.")
# Z-Image's refiners and its single-stream layers' names (diffusers, ai-toolkit and kohya forms).
ZIMAGE_KEYS = ("noise_refiner", "context_refiner", ".attention.to_q", "_attention_to_q", "feed_forward.w1",
               "_feed_forward_w1", "all_x_embedder", "cap_embedder")
# Qwen-Image's dual-stream blocks name their MLPs and modulations per stream.
QWENIMAGE_KEYS = (".img_mlp.", ".txt_mlp.", ".img_mod.", ".txt_mod.")


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
        if "stable-diffusion-v3" in spec:
            return "sd3", f"modelspec.architecture = {spec}"
        if spec.startswith("flux-2") or spec.startswith("flux2"):
            return "flux2", f"modelspec.architecture = {spec}"
        if spec.startswith("flux"):
            return "flux", f"modelspec.architecture = {spec}"
        if spec.startswith(("z-image", "zimage")):
            return "zimage", f"modelspec.architecture = {spec}"
        if spec.startswith("qwen-image"):
            return "qwenimage", f"modelspec.architecture = {spec}"
    base = md.get("ss_base_model_version", "")
    if base.startswith("sdxl"):
        return "sdxl", f"ss_base_model_version = {base}"
    if base.startswith("sd_v1"):
        return "sd15", f"ss_base_model_version = {base}"
    if base.startswith("sd_v2"):
        return "sd2", f"ss_base_model_version = {base}"
    if base.startswith("sd3"):
        return "sd3", f"ss_base_model_version = {base}"
    if base.startswith("flux2"):
        return "flux2", f"ss_base_model_version = {base}"
    if base.startswith("flux"):
        return "flux", f"ss_base_model_version = {base}"
    if base.startswith("zimage"):
        return "zimage", f"ss_base_model_version = {base}"
    keys = header.shapes
    # Transformer bases have no UNet: their block names tell (diffusers, kohya and ComfyUI names).
    # Flux first: its double-stream blocks have "context" parts too, like SD3's joint blocks.
    for k in keys:
        if any(part in k for part in FLUX_KEYS):
            return "flux", f"key {k}"
    for k in keys:
        if any(part in k for part in ZIMAGE_KEYS):
            return "zimage", f"key {k}"
    for k in keys:
        if any(part in k for part in QWENIMAGE_KEYS):
            return "qwenimage", f"key {k}"
    for k in keys:
        if "joint_blocks" in k or (k.startswith("transformer.transformer_blocks.") and "context" in k):
            return "sd3", f"key {k}"
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


def _json_sidecar(side: Path) -> dict:
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        raise LocaloraError(f"{side}: sidecar is not valid JSON; fix or delete it") from None
    if not isinstance(data, dict):
        raise LocaloraError(f"{side}: sidecar must hold a JSON object ({{...}}); fix or delete it")
    return data


def _sidecar(path: Path) -> dict:
    """A1111's NAME.json next to the LoRA: activation text, preferred weight, sd version."""
    return _json_sidecar(path.with_suffix(".json"))


def _civitai_info(path: Path) -> dict:
    """NAME.civitai.info, the civitai API answer that download helpers save next to the file."""
    return _json_sidecar(path.with_name(path.stem + ".civitai.info"))


def triggers_from_sidecar(path: Path) -> str:
    """A1111's "activation text", else civitai's "trainedWords" (comma-joined)."""
    text = str(_sidecar(path).get("activation text", "")).strip()
    if text:
        return text
    words = _civitai_info(path).get("trainedWords", [])
    if not isinstance(words, list):
        side = path.with_name(path.stem + ".civitai.info")
        raise LocaloraError(f"{side}: \"trainedWords\" must be a list of strings; fix or delete the file")
    return ", ".join(str(w).strip() for w in words if str(w).strip())


def preferred_weight(path: Path) -> float | None:
    """A1111's sidecar "preferred weight": the weight when the user gives none (0 means unset, as in A1111)."""
    value = _sidecar(path).get("preferred weight")
    if value is None or value == "":
        return None
    try:
        weight = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        weight = math.nan
    if not math.isfinite(weight):
        raise LocaloraError(f"{path.with_suffix('.json')}: \"preferred weight\" must be a number, got {value!r}; "
                            f"fix or delete it")
    return weight or None


def lora_from_file(path: Path, name: str | None = None, category: str | None = None, triggers: str | None = None,
                   references: tuple[Path, ...] = ()) -> Lora:
    """A Lora for a file, filling what the caller did not give from header, then sidecar."""
    header = read_header(path)
    name = name or header.metadata.get("ss_output_name") or header.metadata.get("modelspec.title") or path.stem
    if triggers is None:
        triggers = triggers_from_header(header.metadata) or triggers_from_sidecar(path)
    return Lora(name=name, path=path.resolve(), category=category, triggers=triggers, references=references)


# ------------------------------------------------------------------ catalogs

CATALOG_KEYS = ("file", "category", "triggers", "references")


def read_catalog(path: Path) -> dict[str, Lora]:
    """[loras.NAME] tables: file (relative to the catalog), category, triggers, references."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LocaloraError(f"{path}: LoRA catalog not found") from None
    except tomllib.TOMLDecodeError as e:
        raise LocaloraError(f"{path}: not valid TOML ({e})") from None
    check_keys(data, ("loras",), (), str(path))
    out = {}
    for name, t in data.get("loras", {}).items():
        where = f"{path} [loras.{name}]"
        if not isinstance(t, dict) or "file" not in t:
            raise LocaloraError(f"{where}: needs at least file = \"NAME.safetensors\"")
        # A misspelt key (trigger, categroy) would be dropped, and the entry's empty triggers would
        # then also hide the file's own trigger words.
        check_keys(t, CATALOG_KEYS, ("file",), where)
        for key in ("file", "triggers"):
            if key in t and not isinstance(t[key], str):
                raise LocaloraError(f"{where}: '{key}' must be a string, got {t[key]!r}")
        if not isinstance(t.get("references", []), list) or not all(isinstance(r, str) for r in t.get("references", [])):
            raise LocaloraError(f"{where}: 'references' must be a list of image paths, got {t['references']!r}")
        category = t.get("category")
        if category is not None and category not in CATEGORIES:
            raise LocaloraError(f"{where}: category '{category}' is not one of {', '.join(CATEGORIES)}")
        base = Path(path).resolve().parent
        file = (base / Path(t["file"]).expanduser()).resolve()
        check_suffix(file)
        refs = tuple((base / r).resolve() for r in t.get("references", []))
        out[name] = Lora(name=name, path=file, category=category, triggers=str(t.get("triggers", "")), references=refs)
    return out


def split_weight(text: str, where: str) -> tuple[str, float | None]:
    """'NAME_OR_PATH[:WEIGHT]' -> (target, weight or None). Negative weights are legal (as in A1111)."""
    if ":" not in text:
        return text, None
    head, tail = text.rsplit(":", 1)
    if len(head) == 1 and head.isalpha():  # leave Windows drive letters alone
        return text, None
    return head, _weight(tail, where)


def _weight(text: str, where: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise LocaloraError(f"{where}: weight '{text}' is not a number (use NAME:0.8)") from None
    if not math.isfinite(weight):
        raise LocaloraError(f"{where}: weight must be a finite number, got '{text}'")
    return weight


def split_lbw(text: str) -> tuple[str, str | None]:
    """'NAME[:WEIGHT]:lbw=SPEC' -> ('NAME[:WEIGHT]', 'SPEC'); the lbw= item is always the last."""
    head, sep, tail = text.rpartition(":")
    if sep and tail.strip().lower().startswith("lbw="):
        return head, tail.strip()[4:]
    return text, None


def parse_choice(text: str, catalog: dict[str, Lora], folders: LoraFolders | None = None) -> LoraChoice:
    """'NAME_OR_PATH[:WEIGHT][:lbw=SPEC]' -> LoraChoice; see choose for how the name resolves."""
    rest, lbw = split_lbw(text)
    target, weight = split_weight(rest, f"--lora {text}")
    return choose(target, weight, catalog, folders, f"--lora {target}", lbw)


def choose(target: str, weight: float | None, catalog: dict[str, Lora], folders: LoraFolders | None,
           where: str, lbw: str | None = None) -> LoraChoice:
    """A LoraChoice for a name: a catalog entry, else a path, else a file stem in the LoRA folders.
    Without a weight, the A1111 sidecar's preferred weight (else None: the method's default)."""
    lora = find_lora(target, catalog, folders, where)
    return LoraChoice(lora, weight if weight is not None else preferred_weight(lora.path), lbw)


def find_lora(target: str, catalog: dict[str, Lora], folders: LoraFolders | None, where: str) -> Lora:
    if target in catalog:  # a user's own catalog entry wins over a file of the same name in a folder
        lora = catalog[target]
        if not lora.path.is_file():
            raise MissingError(f"{lora.path}: LoRA file of catalog entry '{target}' not found; fix its `file`")
        if not lora.triggers:  # an entry without triggers keeps the file's own (header, then sidecar)
            lora = lora_from_file(lora.path, lora.name, lora.category, None, lora.references)
        return lora
    path = Path(target).expanduser()
    check_suffix(path)
    if path.is_file():
        return lora_from_file(path)
    found = folders.find(target) if folders is not None and not path.is_absolute() else None
    if found is not None:
        return lora_from_file(found)
    if path.suffix.lower() == ".safetensors" or path.exists():
        raise MissingError(f"{path}: LoRA file not found; check the path")
    known = ", ".join(sorted(catalog)) or "none"
    searched = folders.describe() if folders is not None else "no LoRA folders given"
    raise LocaloraError(f"{where}: no such LoRA name or .safetensors file; known names: {known}; {searched}")


# ------------------------------------------------------------------ LoRA folders

LORA_DIRS_ENV = "LOCALORA_LORA_DIRS"


@dataclass(frozen=True)
class LoraDir:
    path: Path
    source: str  # where it was given: --lora-dir, $LOCALORA_LORA_DIRS or the config file


@dataclass
class LoraFolders:
    """The LoRA folders, searched in order; each is listed once, on first use."""

    dirs: tuple[LoraDir, ...]
    _files: dict[Path, list[Path]] = field(default_factory=dict, repr=False)

    def files(self, folder: LoraDir) -> list[Path]:
        """Every .safetensors under the folder, subfolders included (pickles are never listed)."""
        if folder.path not in self._files:
            self._files[folder.path] = sorted(
                p for p in folder.path.rglob("*") if p.suffix.lower() == ".safetensors" and p.is_file()
            ) if folder.path.is_dir() else []
        return self._files[folder.path]

    def find(self, name: str) -> Path | None:
        """The file a bare name means: its stem (or 'sub/stem' path), case-insensitive, in the first
        folder that has one. Two in the same folder is an error listing both."""
        key = name.replace("\\", "/").strip().strip("/").lower()
        key = key.removesuffix(".safetensors")
        for folder in self.dirs:
            matches = [p for p in self.files(folder) if _key(p, folder.path, "/" in key) == key]
            if len(matches) > 1:
                raise LocaloraError(f"LoRA '{name}' is ambiguous in {folder.path}: {', '.join(map(str, matches))}; "
                                    f"name it by its subfolder (sub/{Path(name).name}) or by path")
            if matches:
                return matches[0]
        return None

    def describe(self) -> str:
        if not self.dirs:
            return (f"no LoRA folders to search (give --lora-dir, ${LORA_DIRS_ENV} or lora_dirs in "
                    f"{_config_name()})")
        parts = [f"{d.path}" + ("" if d.path.is_dir() else " (missing)") for d in self.dirs]
        return "searched folders: " + ", ".join(parts)


def _key(path: Path, root: Path, with_subfolders: bool) -> str:
    if with_subfolders:
        return path.relative_to(root).with_suffix("").as_posix().lower()
    return path.stem.lower()


def _config_name() -> str:
    from localora import paths

    return str(paths.config_toml())


def lora_folders(given: Sequence[str | Path] = ()) -> LoraFolders:
    """The LoRA folders in search order: --lora-dir, then $LOCALORA_LORA_DIRS (os.pathsep-separated),
    then lora_dirs in config.toml (relative to that file). A --lora-dir that is not a folder is an
    error; a missing configured folder (an unplugged drive) is skipped, and named when a name is
    not found."""
    from localora import paths

    dirs: list[LoraDir] = []
    for d in given:
        path = Path(d).expanduser()
        if not path.is_dir():
            raise LocaloraError(f"--lora-dir {d}: no such folder; give a folder holding .safetensors LoRAs")
        dirs.append(LoraDir(path, "--lora-dir"))
    for d in os.environ.get(LORA_DIRS_ENV, "").split(os.pathsep):
        if d.strip():
            dirs.append(LoraDir(Path(d.strip()).expanduser(), f"${LORA_DIRS_ENV}"))
    config = paths.read_config()
    for d in config.lora_dirs:
        dirs.append(LoraDir(d, str(config.path)))
    unique: dict[Path, LoraDir] = {}
    for d in dirs:
        unique.setdefault(d.path.resolve(), d)
    return LoraFolders(tuple(unique.values()))


# ------------------------------------------------------------------ <lora:NAME:WEIGHT> tags in prompts

# A1111's extra-network syntax: <lora:ARGS> where ARGS (anything but '>') split on ':' are the name
# (so a name holds no ':', but may hold spaces), then the text-encoder and UNet multipliers;
# KEY=VALUE items (te=, unet=, dyn=) are named.
_TAG = re.compile(r"<lora:([^>]*)>", re.IGNORECASE)


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float | None]]]:
    """The prompt without its <lora:...> tags, and (name, weight or None) for each tag in order
    (lora_tags gives their lbw= items too)."""
    text, tags = lora_tags(prompt)
    return text, [(name, weight) for name, weight, _ in tags]


def lora_tags(prompt: str) -> tuple[str, list[tuple[str, float | None, str | None]]]:
    """The prompt without its <lora:...> tags (spaces and commas around them tidied), and
    (name, weight or None, lbw= text or None) for each tag in order.

    localora gives a LoRA one weight for all of its layers, so A1111's <lora:NAME:TE:UNET> is
    accepted only when the two are equal (a different mix would render something A1111 does not);
    otherwise, and for dyn= and unknown KEY=VALUE items, it is an error naming the tag. The LoRA
    Block Weight extension's lbw= item (a preset or one value per block) is kept for blocks.parse.
    """
    tags = []
    for m in _TAG.finditer(prompt):
        tags.append(_parse_tag(m.group(0), m.group(1)))
    if not tags:
        return prompt, []
    pieces = _TAG.split(prompt)[::2]  # split keeps the group: every other piece is the tag's args
    text = pieces[0]
    for piece in pieces[1:]:
        text = _join(text, piece)
    return text.strip().strip(",").strip(), tags  # a tag at either end leaves a dangling comma


def _parse_tag(tag: str, args: str) -> tuple[str, float | None, str | None]:
    items = args.split(":")
    name = items[0].strip()
    if not name:
        raise LocaloraError(f"prompt tag {tag}: no LoRA name (write <lora:NAME> or <lora:NAME:0.8>)")
    positional = [i.strip() for i in items[1:] if "=" not in i]
    named = dict(tuple(x.strip() for x in i.split("=", 1)) for i in items[1:] if "=" in i)
    unknown = sorted(set(named) - {"te", "unet", "lbw"})
    if unknown or len(positional) > 2:
        extra = ", ".join(f"{k}=" for k in unknown) or f"a fourth item ({positional[2]})"
        raise LocaloraError(f"prompt tag {tag}: localora does not support {extra}; write <lora:{name}:WEIGHT>")
    te = named.get("te", positional[0] if positional else None)
    unet = named.get("unet", positional[1] if len(positional) > 1 else None)
    if unet is not None and te is None:
        te = "1"  # A1111: an unset text-encoder multiplier is 1 (only an unset UNet one follows the other)
    weights = {_weight(w, f"prompt tag {tag}") for w in (te, unet) if w is not None}
    if len(weights) > 1:
        raise LocaloraError(f"prompt tag {tag}: separate text-encoder and UNet weights are not supported "
                            f"(localora gives a LoRA one weight); write <lora:{name}:WEIGHT>")
    return name, weights.pop() if weights else None, named.get("lbw")


def _join(left: str, right: str) -> str:
    """Glue the text on both sides of a removed tag: one space, or one comma where either side had one."""
    left, right = left.rstrip(), right.lstrip()
    if left.endswith(",") and right.startswith(","):
        right = right[1:].lstrip()
    if not left:
        return right.lstrip(",").lstrip()
    if not right or right.startswith(","):
        return left + right
    return left + " " + right


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
