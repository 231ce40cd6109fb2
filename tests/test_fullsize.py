"""Full-size model shapes (scripts/check_fullsize.py): off by default, `python -m pytest -m fullsize`.

Published parameter counts, doctor's estimates within 10%, a kohya LoRA with real key names fully
applied to SDXL and SD1.5, one step of each method, one VLM call through the real processor caps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_fullsize.py"
PUBLISHED = {("sdxl", "unet"): 2_567_463_684, ("sdxl", "text_encoder"): 123_060_480,
             ("sdxl", "text_encoder_2"): 694_659_840, ("sdxl", "vae"): 83_653_863,
             ("sd15", "unet"): 859_520_964, ("sd15", "text_encoder"): 123_060_480}


@pytest.mark.fullsize
def test_full_size_shapes(tmp_path):
    out = tmp_path / "fullsize.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for (arch, part), count in PUBLISHED.items():
        assert abs(report["counts"][arch]["parameters"][part] - count) <= 0.01 * count, (arch, part)
    assert abs(report["counts"]["qwen2_vl_2b"]["total"] - 2.21e9) <= 0.01 * 2.21e9
    for model in ("sdxl", "sd15", "qwen2_vl_2b"):
        assert 0.9 <= report["counts"][model]["doctor_ratio"] <= 1.1, model
    for arch in ("sdxl", "sd15"):
        assert report[arch]["all_keys_applied"], report[arch]
        for method in ("merge", "switch", "composite"):
            assert report[arch][method]["finite"], (arch, method)
    assert report["vlm"]["new_tokens"] >= 1 and report["vlm"]["visual_tokens"] > 0
    assert report["set_adapters"]["lora_wrapped_layers"] > 500
    flow = report["flow"]
    assert flow["counts"]["flux"]["params"]["transformer"] == 11_901_408_320  # Flux.1-dev as published (11.9B)
    assert flow["counts"]["flux"]["params"]["text_encoder_2"] == 4_762_310_656  # T5-XXL's encoder
    assert abs(flow["counts"]["zimage"]["params"]["transformer"] - 6.15e9) <= 0.01 * 6.15e9  # Z-Image: "6B"
    for arch in ("flux", "zimage"):
        assert flow["counts"][arch]["doctor_error"] <= 0.01, arch
        for method in ("merge", "switch", "composite"):
            assert flow[f"{arch}_step"][method]["finite"], (arch, method)
    assert flow["kohya_flux"]["all_mapped"], flow["kohya_flux"]
