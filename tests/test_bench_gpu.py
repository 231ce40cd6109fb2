"""`scripts/bench_gpu.py --random-fullsize --smoke` on the CPU: full-size SDXL, Qwen2-VL-2B and
CLIP-L with random weights through the same compose, judge and report as a GPU run, at 64x64 and
1 step. Off by default (marker fullsize: minutes, ~15 GB of RAM): `python -m pytest -m fullsize`.
It must pass before any GPU run is attempted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_gpu.py"
STAGE_FIELDS = {"stage", "seconds", "renders", "cached", "vlm_calls", "prompt_tokens", "new_tokens", "loads", "moves",
                "moved_bytes", "move_seconds", "peak_gib"}


@pytest.mark.fullsize
def test_random_fullsize_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LOCALORA_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--random-fullsize", "--smoke", "--models", str(tmp_path / "m"),
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "smoke" and report["fits"] is True and report["error"] is None
    assert (report["rounds"], report["candidates"], report["loras"], report["lora_rank"]) == (1, 2, 3, 32)
    assert report["size"] == [64, 64] and report["steps"] == 1
    assert [s["stage"] for s in report["stages"]] == ["merge", "composite", "judge"]
    for stage in report["stages"]:
        assert STAGE_FIELDS <= set(stage), stage["stage"]
    merge, composite, judged = report["stages"]
    assert merge["renders"] >= 1 and composite["renders"] >= 1  # Composite's images are new renders
    assert merge["vlm_calls"] >= 2 and merge["new_tokens"] > 0 and merge["prompt_tokens"] > merge["new_tokens"]
    assert judged["vlm_calls"] == 2 and judged["renders"] == 0  # both orders, no render
    assert merge["loads"] == 3  # diffusion, vlm, clip: loaded once and shared by both runs
    assert composite["loads"] == 0 and judged["loads"] == 0
    assert set(report["model_bytes"]) == {"diffusion", "vlm", "clip"}
    # Full size: SDXL's 3.5 B parameters in bf16 are about 6.5 GiB.
    assert report["model_bytes"]["diffusion"] > 6 * 2**30
    assert report["peak_gib"] > 6 and report["total_seconds"] > 0
    assert report["vlm_calls"] == sum(s["vlm_calls"] for s in report["stages"])
    assert "stage" in proc.stderr and "fits: True" in proc.stderr  # the short table
