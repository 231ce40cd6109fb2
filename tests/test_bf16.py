"""Half precision, as every GPU user runs it, exercised on the CPU in bfloat16 (LOCALORA_DTYPE).

Tolerance: bfloat16 keeps 8 bits of mantissa, a relative rounding of 2^-8 (0.4%) per operation;
through a few denoising steps and the VAE that moves 8-bit pixels by a few levels (measured on the
tiny models: mean 0.5-0.7, max 3-5 of 255). A path that computes in the wrong precision or
skips a cast (noise scaled in bf16 at a large sigma, an un-upcast VAE) moves them by tens. So:
mean difference under 2 levels, max under 16, and far under what a change of weights does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from localora.devices import DeviceManager
from localora.diffusion.render import Renderer, RenderJob
from localora.diffusion.sampling import Sampling
from localora.profiles import load_profile

SMALL = dict(seed=1, steps=3, width=32, height=32, switch_every=1)


def render(profile, loras, method, dtype, monkeypatch, tmp_path, weights=(1.0, 0.6, 0.8)):
    monkeypatch.setenv("LOCALORA_DTYPE", dtype)
    renderer = Renderer(profile, devices=DeviceManager(device=torch.device("cpu")), cache_dir=tmp_path / dtype)
    image = renderer.render(RenderJob("a cat", tuple(loras), weights, method, Sampling(**SMALL))).image
    assert renderer.pipeline().unet.dtype == getattr(torch, dtype)  # the test runs what it claims to
    return np.asarray(image).astype(np.float64)


@pytest.mark.parametrize("profile,method", [("tiny", "merge"), ("tiny", "switch"), ("tiny", "composite"),
                                            ("tiny-sd15", "composite")])
def test_every_method_in_bfloat16_is_close_to_float32(profile, method, demo_loras, monkeypatch, tmp_path):
    prof = load_profile(profile)
    loras = demo_loras[prof.diffusion.arch]
    full = render(prof, loras, method, "float32", monkeypatch, tmp_path)
    half = render(prof, loras, method, "bfloat16", monkeypatch, tmp_path)
    other = render(prof, loras, method, "float32", monkeypatch, tmp_path, weights=(0.2, 1.4, 0.3))
    assert np.isfinite(half).all() and half.std() > 5  # not black, not constant
    diff = np.abs(full - half)
    assert diff.mean() < 2 and diff.max() < 16, (diff.mean(), diff.max())
    assert np.abs(full - other).mean() > 5 * diff.mean()  # the weights matter far more than the dtype


@pytest.mark.slow
def test_one_compose_iteration_in_bfloat16(tmp_path, localora_home):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LOCALORA_DTYPE": "bfloat16"}
    proc = subprocess.run([sys.executable, "-m", "localora", "compose", "a girl", "-l", "demo-character",
                           "-l", "demo-style", "-n", "1", "-c", "2", "--no-fewshot", "--plain", "--steps", "2",
                           "--width", "32", "--height", "32", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    loads = {e["model"]: e["detail"] for e in events if e["type"] == "model" and e["action"] == "load"}
    assert "bfloat16" in loads["diffusion"] and "bfloat16" in loads["vlm"]
    assert (out / "final.png").is_file() and any(e["type"] == "done" for e in events)


def test_a_bad_dtype_setting_is_one_line(monkeypatch):
    from localora import profiles
    from localora.errors import LocaloraError

    monkeypatch.setenv("LOCALORA_DTYPE", "float8")
    with pytest.raises(LocaloraError, match="LOCALORA_DTYPE=float8: not one of"):
        profiles.run_dtype("float16", "cpu")
