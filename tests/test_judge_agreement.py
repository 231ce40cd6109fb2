"""Judges measured against each other and against people: bench --judges A,B on the tiny testbed
(two real tiny VLMs of different families), agreement and Cohen's kappa recomputed from the stored
rows, and `localora judge-agreement` with a labels CSV."""

from __future__ import annotations

import json
import re
import sqlite3

import pytest
from click.testing import CliRunner

from localora.bench import report as bench_report
from localora.bench.store import DB_FILE
from localora.cli import main
from localora.scoring import agreement
from localora.scoring.judge import DIMENSIONS
from support import one_error_line

JUDGES = ("tiny-qwen2-vl", "tiny-gemma-3")
SET = "demo-character_demo-clothing"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def plain_kappa(x: list[str], y: list[str]) -> float:
    """Cohen's kappa from its definition, for checking: (p_o - p_e) / (1 - p_e)."""
    n = len(x)
    p_o = sum(a == b for a, b in zip(x, y)) / n
    p_e = sum((x.count(k) / n) * (y.count(k) / n) for k in set(x) | set(y))
    return (p_o - p_e) / (1 - p_e)


# ------------------------------------------------------------------ the statistics

def test_kappa_matches_its_definition_and_a_published_example():
    # Cohen (1960)-style 2x2 example from Wikipedia: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> 0.4.
    x = ["win"] * 25 + ["loss"] * 25
    y = ["win"] * 20 + ["loss"] * 5 + ["win"] * 10 + ["loss"] * 15
    assert agreement.kappa(x, y) == pytest.approx(0.4)
    assert agreement.agreement(x, y) == pytest.approx(0.7)
    z = ["tie", "win", "loss", "win", "tie", "tie"]
    w = ["tie", "loss", "loss", "win", "win", "tie"]
    assert agreement.kappa(z, w) == pytest.approx(plain_kappa(z, w))
    assert agreement.kappa(["win"] * 4, ["win"] * 4) is None  # chance agreement is already 1
    assert agreement.kappa([], []) is None


def test_bootstrap_resamples_whole_pairs_reproducibly():
    clusters = [[("win", "win"), ("win", "win")], [("loss", "win")] * 2, [("tie", "tie")] * 2, [("win", "loss")] * 2]
    lo, hi = agreement.bootstrap(clusters, agreement.agreement)
    assert agreement.bootstrap(clusters, agreement.agreement) == (lo, hi)
    # Whole pairs are drawn, so every resampled agreement is a multiple of 1/4 (pairs agree or not).
    assert lo * 4 == int(lo * 4) and hi * 4 == int(hi * 4)
    assert 0 <= lo <= 0.5 <= hi <= 1
    assert agreement.bootstrap([[("win", "win")]], agreement.kappa) is None  # never defined


# ------------------------------------------------------------------ a bench with two judges

@pytest.fixture(scope="module")
def bench(tmp_path_factory, localora_home):
    out = tmp_path_factory.mktemp("judges") / "bench"
    result = cli("bench", "--testbed", "tiny", "--elements", "2", "--methods", "merge,switch,composite", "--limit", "1",
                 "--seeds", "0", "--repeats", "2", "--judges", ",".join(JUDGES), "--out", out, "--plain")
    assert result.exit_code == 0, result.output
    assert cli("report", out).exit_code == 0
    return out


def rows(out, table):
    with sqlite3.connect(out / DB_FILE) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(f"SELECT * FROM {table}")]


@pytest.mark.slow  # a whole bench judged by two VLMs (the default run stays within 4 minutes)
def test_both_judges_answer_the_same_questions_and_are_stored(bench):
    outcomes = rows(bench, "outcomes")
    keys = {j: sorted((o["method"], o["baseline"], o["repeat"], o["first"]) for o in outcomes if o["judge"] == j)
            for j in JUDGES}
    # 2 pairs (switch, composite vs merge) x 2 repeats x 2 orders, for each judge.
    assert len(keys[JUDGES[0]]) == 8 and keys[JUDGES[0]] == keys[JUDGES[1]]
    assert {(o["judge"], o["judge_source"], o["judge_revision"]) for o in outcomes} == {
        ("tiny-qwen2-vl", "tiny:qwen2-vl", "tiny-v1"), ("tiny-gemma-3", "tiny:gemma-3", "tiny-v1")}
    pairs = rows(bench, "pairs")
    assert {p["judge"] for p in pairs} == {JUDGES[0]} and all(p["vlm_calls"] == 2 * 2 * len(JUDGES) for p in pairs)
    # The pair row's averaged scores are the first judge's answers, averaged.
    for p in pairs:
        mine = [o for o in outcomes if o["judge"] == JUDGES[0] and o["method"] == p["method"]]
        for d in DIMENSIONS:
            assert p[f"{d}_a"] == pytest.approx(sum(o[f"{d}_a"] for o in mine) / len(mine))
    assert all(r["vlm"] is None for r in rows(bench, "results"))  # the baselines ask no VLM
    settings = json.loads(dict(sqlite3.connect(bench / DB_FILE).execute("SELECT key, value FROM meta"))["settings"])
    assert [j["name"] for j in settings["judges"]] == list(JUDGES)


@pytest.mark.slow  # a whole bench judged by two VLMs (the default run stays within 4 minutes)
def test_agreement_and_kappa_recomputed_from_the_stored_rows(bench):
    outcomes = rows(bench, "outcomes")
    by = {j: {(o["set_id"], o["seed"], o["method"], o["baseline"], o["repeat"], o["first"]): o
              for o in outcomes if o["judge"] == j} for j in JUDGES}
    shared = sorted(by[JUDGES[0]])
    text = (bench / "report.md").read_text()
    computed = bench_report.judge_agreement(outcomes)[JUDGES]
    for d in DIMENSIONS:
        x = [by[JUDGES[0]][k][d] for k in shared]
        y = [by[JUDGES[1]][k][d] for k in shared]
        raw = sum(a == b for a, b in zip(x, y)) / len(x)
        kappa = None if len(set(x)) == 1 and set(x) == set(y) else plain_kappa(x, y)
        g = computed[d]
        assert (g.n, g.pairs) == (8, 2) and g.agreement == pytest.approx(raw)
        assert g.kappa == (None if kappa is None else pytest.approx(kappa))
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {JUDGES[0]} | {JUDGES[1]} | {d} |"))
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[3].startswith(f"{raw:.1%}") and cells[5] == "8 (2)"
        assert cells[4].startswith("n/a" if kappa is None else f"{kappa:.2f}")
        if g.agreement_interval:
            lo, hi = g.agreement_interval
            assert lo <= raw <= hi
    assert "## Judges" in text and f"| {JUDGES[1]} | switch |" in text


@pytest.mark.slow  # a whole bench judged by two VLMs (the default run stays within 4 minutes)
def test_a_rerun_with_other_judges_is_refused(bench):
    result = cli("bench", "--testbed", "tiny", "--elements", "2", "--methods", "merge,switch,composite", "--limit", "1",
                 "--seeds", "0", "--repeats", "2", "--judges", JUDGES[0], "--out", bench)
    one_error_line(result, "other settings", "judges")


def test_judges_must_be_vlms_of_models_toml(tmp_path):
    result = cli("bench", "--testbed", "tiny", "--elements", "2", "--methods", "merge,switch", "--judges",
                 "tiny-qwen2-vl,nope", "--out", tmp_path / "b")
    one_error_line(result, "--judges nope", "tiny-gemma-3")
    assert result.exit_code == 2


# ------------------------------------------------------------------ against people

@pytest.mark.slow  # a whole bench judged by two VLMs (the default run stays within 4 minutes)
def test_judge_agreement_with_labels(bench, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text(f"set_id,seed,method,baseline,composition,quality\n{SET},0,switch,merge,a,tie\n"
                      f"{SET},0,composite,merge,merge,composite\n")
    result = cli("judge-agreement", bench, "--labels", labels, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["pairs"] == 2 and set(data["judges"]) == set(JUDGES)
    person = {("switch", "composition"): "win", ("switch", "quality"): "tie",
              ("composite", "composition"): "loss", ("composite", "quality"): "win"}
    outcomes = rows(bench, "outcomes")
    for j in JUDGES:
        for d in DIMENSIONS:
            mine = [o for o in outcomes if o["judge"] == j]
            x = [o[d] for o in mine]
            y = [person[(o["method"], d)] for o in mine]
            got = data["judges"][j][d]
            assert got["answers"] == 8 and got["pairs"] == 2
            assert got["agreement"] == pytest.approx(sum(a == b for a, b in zip(x, y)) / 8)
            assert got["kappa"] == pytest.approx(plain_kappa(x, y))
    lines = cli("judge-agreement", bench, "--labels", labels).stdout.splitlines()
    assert len(lines) == 1 + len(JUDGES) * len(DIMENSIONS) and re.match(r"tiny-qwen2-vl\s+composition\s+\d", lines[1])


@pytest.mark.parametrize("body, where, fragment", [
    ("set_id,seed,method,baseline,composition\n{SET},0,reflect,merge,a\n", ":2:", "judged no pair"),
    ("set_id,seed,method,baseline,composition\n,0,switch,merge,a\n", ":2:", "no pair"),
    ("set_id,seed,method,baseline,style\n{SET},0,switch,merge,a\n", ":1:", "unknown criterion 'style'"),
    ("set_id,seed,method,baseline,composition\n{SET},0,switch,merge,a\n{SET},0,composite,merge,maybe\n", ":3:",
     "winner 'maybe'"),
    ("set_id,seed,method,composition\n{SET},0,switch,a\n", ":1:", "no baseline column"),
])
@pytest.mark.slow  # a whole bench judged by two VLMs (the default run stays within 4 minutes)
def test_a_bad_labels_file_is_one_line_naming_file_and_line(bench, tmp_path, body, where, fragment):
    labels = tmp_path / "labels.csv"
    labels.write_text(body.replace("{SET}", SET))
    result = cli("judge-agreement", bench, "--labels", labels)
    one_error_line(result, f"{labels}{where}", fragment)
    assert result.exit_code == 2
