"""`localora pull`: a profile's models into the local Hugging Face cache, the one network use.

    pull(profile, echo)   for each model: tiny -> built here; local path -> left alone;
                          hub id -> sizes listed, then snapshot_download (resumable, with progress)

localora never downloads at run time. A studio runs `pull` on a connected machine and copies the
Hugging Face cache (~/.cache/huggingface/hub, or $HF_HOME) to the offline one. Only what localora
loads is fetched: safetensors weights, configs, tokenizer and processor files; never pickled
weights (.bin/.ckpt/.pt), other frameworks' weights, or fp16 variants of diffusers weights
(localora loads the main files and casts them).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from pathlib import Path

from localora import profiles
from localora.errors import LocaloraError

IGNORE = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.tflite",
          "*.ot", "*.mlmodel", "*.gguf", "*fp16*", "*.png", "*.jpg", "*.gif", "*.md"]
# A diffusers repo's root may also hold single-file checkpoints of several GB that
# from_pretrained does not read; only its model_index.json is needed at the root.
DIFFUSERS_ROOT = ["model_index.json", "*/*"]


def models(profile: profiles.Profile) -> list[tuple[str, str, str]]:
    """(role, name, source) of every model the profile needs."""
    d = profile.diffusion
    out = [("diffusion", d.name, d.source)]
    if d.vae:
        out.append(("vae", d.vae, d.vae))
    return out + [("vlm", profile.vlm.name, profile.vlm.source), ("clip", profile.clip.name, profile.clip.source)]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def pull(profile: profiles.Profile, echo: Callable[[str], None]) -> list[Path]:
    """Fetch (or build) every model of `profile`; the local folder of each."""
    hub = [(role, name, src) for role, name, src in models(profile)
           if not profiles.is_tiny(src) and not profiles.is_local_path(src)]
    if hub and _offline():
        raise LocaloraError(f"pull {profile.name}: HF_HUB_OFFLINE is set, so nothing can be downloaded; run "
                            f"`localora pull {profile.name}` on a connected machine and copy its Hugging Face cache here")
    folders = []
    for role, name, source in models(profile):
        if profiles.is_tiny(source) or profiles.is_local_path(source):
            from localora import tiny

            there = profiles.is_tiny(source) and tiny.is_built(source.removeprefix("tiny:"))
            path = profiles.locate(source, f"{role} '{name}'")
            what = ("already built" if there else "built") if profiles.is_tiny(source) else "local folder"
            echo(f"{role:9} {name}: {what} {path}")
            folders.append(path)
            continue
        folders.append(_download(role, name, source.removeprefix("hf-hub:"), echo))
    return folders


def _download(role: str, name: str, repo: str, echo: Callable[[str], None]) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()  # localora turns them off for model loading; a download wants them
    allow = DIFFUSERS_ROOT if role == "diffusion" else None
    try:
        info = HfApi().model_info(repo, files_metadata=True)
        files = [f for f in info.siblings if _wanted(f.rfilename, allow)]
        total = sum(f.size or 0 for f in files)
        echo(f"{role:9} {name}: {repo}, {len(files)} files, {total / 2**30:.2f} GiB")
        return Path(snapshot_download(repo, allow_patterns=allow, ignore_patterns=IGNORE))
    except OSError as e:  # connection errors and HTTP errors are OSErrors in huggingface_hub
        raise LocaloraError(f"pull {repo}: cannot download ({str(e).splitlines()[0][:160]}); check the network "
                            f"and the repo id in models.toml, then run pull again (it resumes)") from None


def _wanted(path: str, allow: list[str] | None) -> bool:
    if any(fnmatch.fnmatch(path, p) for p in IGNORE):
        return False
    return allow is None or any(fnmatch.fnmatch(path, p) for p in allow)
