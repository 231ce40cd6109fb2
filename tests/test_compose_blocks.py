"""compose --blocks: the searched vector is one weight per LoRA and block group (tiny SDXL)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from localora.cli import main
from localora.diffusion import blocks as blocklib
from localora.search.config import ComposeConfig
from support import one_error_line, signal_after

LORAS = ("demo-character", "demo-style")
GROUPS = ("in", "mid", "out")
DIMS = [f"{n}.{g}" for n in LORAS for g in GROUPS]
ARGS = ["compose", "a girl", "-l", LORAS[0], "-l", LORAS[1], "-n", "2", "-c", "2", "--fewshot-levels", "0.5,1.0",
        "--seed", "3", "--width", "64", "--height", "64", "--steps", "2", "--blocks", "in,mid,out", "--plain"]


def localora(*args, home: Path) -> subprocess.Popen:
    env = {**os.environ, "LOCALORA_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "localora", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def uncut(localora_home, tmp_path_factory):
    """One whole `compose --blocks in,mid,out` run (in the session's home, which builds the tiny models)."""
    out = tmp_path_factory.mktemp("blocks") / "ref"
    proc = localora(*ARGS, "--out", out, home=localora_home)
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text
    return out


def test_a_blocks_run_searches_distinct_k_by_3_vectors_within_bounds(uncut):
    log = events(uncut)
    cands = [e for e in log if e.get("type") == "render" and e.get("role") in ("candidate", "refined", "grid")]
    assert cands
    vectors = []
    for e in cands:
        assert list(e["weights"]) == DIMS  # k x 3 weights, named NAME.GROUP
        assert all(0.0 <= w <= 1.5 for w in e["weights"].values())
        vectors.append(tuple(e["weights"].values()))
    candidates = [tuple(e["weights"].values()) for e in cands if e["role"] == "candidate"]
    assert len(set(candidates)) == len(candidates)  # never one vector twice
    assert not set(candidates) & {v for e, v in zip(cands, vectors) if e["role"] == "grid"}
    final = json.loads((uncut / "final.json").read_text())
    assert list(final["weights"]) == DIMS
    # The VLM was asked for NAME.GROUP weights, and told what the groups are.
    ask = next(e for e in log if e.get("type") == "vlm" and e["step"] == "generate")
    assert "demo-style.mid" in ask["prompt"] and "block group" in ask["prompt"]
    # The report shows each candidate's weights as a LoRA x group table.
    html = (uncut / "report.html").read_text()
    assert html.count("<table class=blocks>") >= 4 and "<th>mid</th>" in html


def test_a_blocks_vector_renders_as_each_loras_lbw_vector(uncut, sdxl_renderer):
    """The image of a candidate is the render of its group weights as lbw vectors (the render cache key)."""
    cfg = ComposeConfig.from_settings(json.loads((uncut / "run.json").read_text())["config"])
    assert cfg.blocks == GROUPS and cfg.dims == DIMS
    e = next(e for e in events(uncut) if e.get("role") == "candidate")
    weights, vectors = cfg.render_args(list(e["weights"].values()), "sdxl")
    assert weights == (1.0, 1.0)
    names = blocklib.LAYOUTS["sdxl"]
    for k, lbw in enumerate(vectors):
        values = dict(zip(names, lbw))
        assert values["M00"] == e["weights"][f"{LORAS[k]}.mid"]
        assert values["IN04"] == values["IN08"] == e["weights"][f"{LORAS[k]}.in"]
        assert values["OUT00"] == values["OUT05"] == e["weights"][f"{LORAS[k]}.out"]
        # the text encoder, not searched, takes the mean of the groups
        assert values["BASE"] == pytest.approx(sum(e["weights"][f"{LORAS[k]}.{g}"] for g in GROUPS) / 3)


@pytest.mark.parametrize("search", ["cmaes", "hybrid"])
def test_black_box_strategies_search_block_vectors(search, tmp_path):
    result = CliRunner().invoke(main, [*ARGS[:-1], "--search", search, "--budget", "4", "-n", "1", "-c", "1",
                                       "--bounds", "0.2,1.2", "--plain", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    cands = [e for e in events(tmp_path / "r") if e.get("role") == "candidate"]
    assert len(cands) == 4
    vectors = [tuple(e["weights"][d] for d in DIMS) for e in cands]
    assert len(set(vectors)) == 4 and all(0.2 <= w <= 1.2 for v in vectors for w in v)
    assert list(json.loads((tmp_path / "r" / "final.json").read_text())["weights"]) == DIMS


def test_start_weights_and_presets_span_every_group():
    assert blocklib.groups_of("unet") == ("in", "mid", "out")
    assert blocklib.groups_of("all") == ("te", "in", "mid", "out")
    assert blocklib.groups_of(None) == ()


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("blocks, fragment", [("in,foo", "--blocks in,foo"), ("in,in", "distinct"),
                                              ("sideways", "preset")])
def test_unknown_groups_are_one_line(blocks, fragment, tmp_path):
    result = CliRunner().invoke(main, [*ARGS[:-2], blocks, "--out", str(tmp_path / "r")])
    one_error_line(result, fragment)
    assert result.exit_code == 2 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("profile, label", [("tiny-flux", "Flux.1"), ("tiny-zimage", "Z-Image")])
def test_blocks_on_a_transformer_base_is_one_line(profile, label, tmp_path):
    result = CliRunner().invoke(main, [*ARGS, "-p", profile, "--out", str(tmp_path / "r")])
    one_error_line(result, "--blocks", label, "no block layout")
    assert result.exit_code == 2 and not (tmp_path / "r").exists()


# ------------------------------------------------------------------ kill and resume

@pytest.mark.slow
def test_a_killed_blocks_run_resumes_to_the_same_result(localora_home, uncut, tmp_path):
    home = tmp_path / "cut-home"  # models only: no render cache shared with the uncut run
    shutil.copytree(localora_home / "tiny", home / "tiny")
    total = len(events(uncut))
    stop_after = random.Random(9).randint(3, total - 3)
    proc = localora(*ARGS, "--out", tmp_path / "cut", home=home)
    signal_after(proc, stop_after, signal.SIGKILL)
    assert proc.returncode != 0
    before = events(tmp_path / "cut")
    done_before = {e["id"] for e in before if "id" in e}
    assert done_before and not (tmp_path / "cut" / "final.json").exists()

    resumed = localora("compose", "--resume", tmp_path / "cut", "--plain", home=home)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    after = events(tmp_path / "cut")[len(before):]
    assert after[0]["type"] == "resume"
    assert not {e["id"] for e in after if "id" in e} & done_before
    ref = json.loads((uncut / "final.json").read_text())
    cut = json.loads((tmp_path / "cut" / "final.json").read_text())
    assert cut["weights"] == ref["weights"] and list(cut["weights"]) == DIMS
    assert (tmp_path / "cut" / "final.png").read_bytes() == (uncut / "final.png").read_bytes()
