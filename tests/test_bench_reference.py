"""scripts/bench_reference.py: localora's methods against the Multi-LoRA Composition reference.

Without a checkout the script says, in one line, how to fetch one. With $LOCALORA_REFERENCE set
to a checkout (CI has no network, so it is skipped there), a tiny run's images equal the
reference's and its JSON has every field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_reference.py"
CLONE = "git clone https://github.com/maszhongming/Multi-LoRA-Composition"
METHOD_FIELDS = {"localora_seconds", "reference_seconds", "ratio_reference_over_localora",
                 "ratio_best_reference_over_localora", "max_abs_diff",
                 "equal", "close", "localora_all", "reference_all"}


def bench(*args, reference: str | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LOCALORA_REFERENCE"}
    if reference:
        env["LOCALORA_REFERENCE"] = reference
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("where", ["none", "missing", "not-a-checkout"])
def test_without_a_reference_checkout_one_error_line(where, tmp_path):
    args = {"none": [], "missing": ["--reference", tmp_path / "nope"], "not-a-checkout": ["--reference", tmp_path]}[where]
    proc = bench(*args, "--out", tmp_path / "b.json")
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert CLONE in lines[0]
    if where == "none":
        assert "--reference DIR" in lines[0] and "LOCALORA_REFERENCE" in lines[0]
    else:
        assert str(args[1]) in lines[0]
    if where == "not-a-checkout":
        assert "callbacks.py" in lines[0] and "pipeline/pipeline_0.26.3.py" in lines[0]
    assert not (tmp_path / "b.json").exists()


@pytest.mark.skipif(not os.environ.get("LOCALORA_REFERENCE"), reason="needs $LOCALORA_REFERENCE: a checkout of "
                    "maszhongming/Multi-LoRA-Composition")
def test_tiny_run_matches_the_reference(tmp_path):
    out = tmp_path / "bench.json"
    proc = bench("--steps", 3, "--size", 32, "--repeats", 1, "--switch-every", 1, "--out", out,
                 reference=os.environ["LOCALORA_REFERENCE"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["arch"] == "sd15" and report["steps"] == 3 and report["size"] == [32, 32]
    assert report["switch_every"] == 1 and report["repeats"] == 1 and len(report["loras"]) == 3
    assert report["reference"]["dir"] == os.environ["LOCALORA_REFERENCE"]
    assert set(report["methods"]) == {"merge", "switch", "composite"}
    for name, m in report["methods"].items():
        assert METHOD_FIELDS <= set(m), name
        assert m["localora_seconds"] > 0 and m["reference_seconds"] > 0
        assert m["ratio_reference_over_localora"] == pytest.approx(m["reference_seconds"] / m["localora_seconds"])
        assert len(m["localora_all"]) == len(m["reference_all"]) == 1
        assert m["close"], (name, m["max_abs_diff"])
    # Merge and Switch run the same stock loop on both sides: the same pixels.
    assert report["methods"]["merge"]["equal"] and report["methods"]["switch"]["equal"]
    # The methods' images differ, so the equalities above are not two renders that ignored their LoRAs.
    assert all(d > 0 for d in report["max_abs_diff_between_methods"].values()), report["max_abs_diff_between_methods"]
    for name in report["methods"]:
        assert name in proc.stdout  # the table
