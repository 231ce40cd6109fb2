"""--json on score, judge and bench: one JSON document, the same numbers as the lines."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from localora.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(5)
    paths = []
    for name in ("a", "b"):
        path = folder / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_score_json_carries_the_printed_numbers(pictures):
    a, b = pictures
    args = ("score", a, "--prompt", "a cat", "--reference", b, "--clipscore", "--profile", "tiny")
    human, data = cli(*args), cli(*args, "--json")
    assert human.exit_code == 0 and data.exit_code == 0, human.output + data.output
    d = json.loads(data.stdout)
    t, i = (float(x) for x in re.findall(r"CLIP-[TI] (-?\d\.\d{4})", human.stdout))
    assert round(d["clip_t"], 4) == t and round(d["clip_i"], 4) == i
    assert f"CLIPScore {d['clipscore_t']:.2f}" in human.stdout and d["references"] == [str(b)]


def test_judge_json_carries_the_printed_verdict_and_outcomes(pictures):
    a, b = pictures
    args = ("judge", a, b, "--profile", "tiny", "--element", "character (Hero): red hair", "--repeats", "2")
    human, data = cli(*args), cli(*args, "--json")
    assert human.exit_code == 0 and data.exit_code == 0, human.output + data.output
    d = json.loads(data.stdout)
    assert d["answers"] == 4
    assert f"composition {d['verdict']['composition']}, quality {d['verdict']['quality']}" in human.stdout
    for dim, o in d["outcomes"].items():
        assert o["n"] == 4 and o["wins"] + o["ties"] + o["losses"] == 4
        assert f"outcomes, {dim}: {o['wins']} win / {o['ties']} tie / {o['losses']} loss of 4" in human.stdout
    line = next(ln for ln in human.stdout.splitlines() if ln.startswith("A "))
    assert [float(x) for x in line.split()[2:]] == [round(d["scores"]["a"][k], 2) for k in d["scores"]["a"]]


def test_bench_json_is_the_summary_alone_on_stdout(tmp_path):
    out = tmp_path / "bench"
    result = cli("bench", "--testbed", "tiny", "--elements", "2", "--methods", "merge,switch", "--limit", "1",
                 "--seeds", "0", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)  # progress went to stderr: stdout parses as one document
    # two method rows and the judged pair (switch against the merge baseline)
    assert d["rows_made"] == 3 and d["rows_skipped"] == 0 and d["store"] == str(out / "bench.sqlite")
    again = cli("bench", "--testbed", "tiny", "--elements", "2", "--methods", "merge,switch", "--limit", "1",
                "--seeds", "0", "--out", out)
    assert again.exit_code == 0 and f"0 rows made, {d['rows_made']} already done" in again.stdout
