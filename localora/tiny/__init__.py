"""Tiny random-initialised models, built offline and deterministically on first use.

Each part is written once into $LOCALORA_HOME/tiny/v<VERSION>/<name>/ and from then on loaded
from disk through the same from_pretrained / load_lora_weights path a real model takes. Builds
go to a temporary folder and are renamed into place, under a file lock, so an interrupted or
concurrent build never leaves a half-written model behind; a build that fails (a full disk) removes
its temporary folder and says, in one line, which folder and how much space it needs. Every file
gets the umask's mode (safetensors writes its files 0600).
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

from localora import paths
from localora.errors import LocaloraError, RuntimeFailure
from localora.files import STORAGE_ERRNOS, give_umask_mode, hold_lock

# Bump when any builder changes what it writes, so old builds are not reused.
VERSION = 1
SEED = 0

# name -> "module:function"; the function takes (out_dir: Path, seed: int) and writes the part.
BUILDERS = {
    "sdxl": "localora.tiny.diffusion:build_sdxl",
    "sd15": "localora.tiny.diffusion:build_sd15",
    "loras-sdxl": "localora.tiny.diffusion:build_demo_loras_sdxl",
    "loras-sd15": "localora.tiny.diffusion:build_demo_loras_sd15",
    "flux": "localora.tiny.flow:build_flux",
    "zimage": "localora.tiny.flow:build_zimage",
    "loras-flux": "localora.tiny.flow:build_demo_loras_flux",
    "loras-zimage": "localora.tiny.flow:build_demo_loras_zimage",
    "qwen2-vl": "localora.tiny.vlm:build",
    "qwen2.5-vl": "localora.tiny.vlm:build_qwen2_5_vl",
    "qwen3-vl": "localora.tiny.vlm:build_qwen3_vl",
    "gemma-3": "localora.tiny.gemma:build",
    "clip": "localora.tiny.clip:build",
}


# Disk each built part takes, in MB, rounded up (measured with du on a build of VERSION 1).
SIZES_MB = {"sdxl": 30, "sd15": 20, "loras-sdxl": 1, "loras-sd15": 1, "qwen2-vl": 2, "clip": 8}

# Which tiny parts can stand in for which kind of model (checked when models.toml is read).
KINDS = {"diffusion": ("sdxl", "sd15", "flux", "zimage"), "vlm": ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "gemma-3"),
         "clip": ("clip",), "loras": ("loras-sdxl", "loras-sd15", "loras-flux", "loras-zimage")}


# Shown on every view of a tiny-profile run (live view, plain lines, report.html): its images and
# the VLM's words are meaningless by design, and a newcomer must not take them for a fault.
NOTE = ("tiny profile: random weights, so the images are noise and the VLM's text is random; this shows the "
        "loop working, not results. For real images: `localora models` lists the profiles, `localora pull "
        "PROFILE` fetches one, then `localora compose --profile PROFILE ...`")


def root() -> Path:
    return paths.home() / "tiny" / f"v{VERSION}"


def is_built(name: str) -> bool:
    return (root() / name / ".complete").exists()


def unbuilt(sources: list[str], arch: str) -> list[str]:
    """The tiny parts that `sources` ("tiny:NAME" model sources) and their demo LoRAs still need built."""
    names = [s.removeprefix("tiny:") for s in sources if s.startswith("tiny:")]
    if any(n in KINDS["diffusion"] for n in names):
        names.append(f"loras-{arch}")
    return [n for n in dict.fromkeys(names) if n in BUILDERS and not is_built(n)]


def ensure(name: str) -> Path:
    """Path of the built part `name`, building it first if needed."""
    if name not in BUILDERS:
        raise LocaloraError(f"no tiny model named 'tiny:{name}'; known: {', '.join('tiny:' + n for n in BUILDERS)}")
    target = root() / name
    if is_built(name):
        return target
    with hold_lock(root() / f".{name}.lock", wait=True):
        if is_built(name):
            return target
        module, func = BUILDERS[name].split(":")
        tmp = root() / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            getattr(importlib.import_module(module), func)(tmp, SEED)
            (tmp / ".complete").write_text("ok\n")
            give_umask_mode(tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)  # a half-built part must not stay behind for good
            if e.errno not in STORAGE_ERRNOS:
                raise
            raise RuntimeFailure(f"{root()}: cannot build the tiny model 'tiny:{name}' there "
                                 f"({STORAGE_ERRNOS[e.errno]}); it needs about {SIZES_MB[name]} MB free: free "
                                 f"space or set LOCALORA_HOME to another folder") from None
    return target
