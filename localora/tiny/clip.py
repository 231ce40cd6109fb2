"""A tiny random-initialised open_clip model, written the way a real one is shipped.

The folder holds `open_clip_config.json` (model_cfg + preprocess_cfg, the layout of the
open_clip repos on the hub) and `open_clip_model.safetensors`, so the scorer loads it through
the same `local-dir:` path as a real CLIP. The text tower uses open_clip's built-in tokenizer
(the real 49,408-token CLIP BPE, shipped with the package), so no hub access is needed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

# ~1.6 M parameters, most of them the token embedding; 32x32 images in 16 patches of 8x8.
MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
# OpenAI CLIP's normalisation, as real checkpoints declare it.
PREPROCESS_CFG = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def build(out_dir: Path, seed: int) -> None:
    """Write a deterministic random tiny CLIP into `out_dir`."""
    import open_clip
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # Created from the folder itself (no weights there yet: random init), so what we save is
    # exactly what the loader will rebuild. fork_rng keeps the caller's global RNG untouched.
    # open_clip warns (on the root logger) that no weights were found: expected here, so muted.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(f"local-dir:{out_dir}")
    finally:
        root.setLevel(level)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "open_clip_model.safetensors"))
