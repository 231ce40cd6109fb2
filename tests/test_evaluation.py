"""Evaluation as the papers run it, on a tiny bench: judge outcomes per repeat and order, position
bias, held-out CLIP-I references, seeds, ablation variants and the report's tables and grid.

One module-scoped bench (one 2-element set, two seeds, two repeats) serves every test; the
expected numbers are counted here from the stored rows, independently of bench/report.py.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import statistics

import pytest

from localora.bench.plan import DEFAULT_REFERENCE_SEEDS
from localora.bench.store import DB_FILE
from localora.scoring.clipscore import clipscore
from localora.scoring import judge
from test_bench import cli

SEEDS = (0, 1)
REPEATS = 2
ARGS = ("bench", "--testbed", "tiny", "--elements", "2", "--limit", "1", "--methods", "merge,switch,random",
        "--iterations", "1", "--candidates", "2", "--seeds", ",".join(map(str, SEEDS)), "--repeats", str(REPEATS))


def rows(out, name: str) -> list[dict]:
    with sqlite3.connect(out / DB_FILE) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(f"SELECT * FROM {name}")]


def md_table(text: str, heading: str) -> list[list[str]]:
    """The cells of the first markdown table after `heading`, past its header and rule."""
    lines = iter(text.split(heading + "\n", 1)[1].splitlines())
    first = next(ln for ln in lines if ln.startswith("|"))
    body = [first, *itertools.takewhile(lambda ln: ln.startswith("|"), lines)]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in body[2:]]


def bench_and_report(tmp_path_factory, name: str, args) -> tuple:
    """A bench folder made by `args`, reported: (folder, report.md's text)."""
    out = tmp_path_factory.mktemp(name) / "b"
    for command in ((*args, "--out", out), ("report", out)):
        result = cli(*command)
        assert result.exit_code == 0, result.output
    return out, (out / "report.md").read_text()


@pytest.fixture(scope="module")
def bench(tmp_path_factory, localora_home):
    return bench_and_report(tmp_path_factory, "eval", ARGS)


@pytest.mark.slow  # a whole judged bench and its report (the default run stays within 4 minutes)
def test_each_pair_and_seed_stores_both_orders_of_every_repeat(bench):
    out, _ = bench
    pairs, outcomes = rows(out, "pairs"), rows(out, "outcomes")
    assert {(p["seed"], p["method"]) for p in pairs} == {(s, m) for s in SEEDS for m in ("switch", "random")}
    for p in pairs:
        mine = [o for o in outcomes if (o["set_id"], o["seed"], o["method"], o["baseline"]) ==
                (p["set_id"], p["seed"], p["method"], p["baseline"])]
        assert sorted((o["repeat"], o["first"]) for o in mine) == [(r, f) for r in range(REPEATS) for f in "ab"]
        assert p["vlm_calls"] == 2 * REPEATS
        assert {o["temperature"] for o in mine} == {judge.REPEAT_TEMPERATURE} and {o["judge"] for o in mine} == {"tiny-qwen2-vl"}
        for o in mine:
            assert o["explanation_a"] and o["explanation_b"]
            for d in judge.DIMENSIONS:
                diff = o[f"{d}_a"] - o[f"{d}_b"]
                assert o[d] == ("win" if diff > 0 else "loss" if diff < 0 else "tie")
        # The averaged view is the mean of the same answers.
        for d in judge.DIMENSIONS:
            assert p[f"{d}_a"] == pytest.approx(sum(o[f"{d}_a"] for o in mine) / len(mine))


@pytest.mark.slow  # a whole judged bench and its report (the default run stays within 4 minutes)
def test_the_reports_win_rates_are_a_count_over_stored_outcomes(bench):
    out, text = bench
    outcomes = rows(out, "outcomes")
    table = md_table(text, "### Over outcomes")
    for d in judge.DIMENSIONS:
        verdicts = [o[d] for o in outcomes if o["method"] == "switch"]
        n = len(verdicts)
        assert n == len(SEEDS) * REPEATS * 2
        counts = [verdicts.count(v) for v in ("win", "tie", "loss")]
        lo, hi = judge.wilson(counts[0], n)
        expected = ["switch", d, *(f"{c / n:.1%} ({c})" for c in counts), str(n),
                    f"{counts[0] / n:.1%} [{lo:.1%}, {hi:.1%}]"]
        assert next(r for r in table if r[:2] == ["switch", d]) == expected
    assert "### Averaged verdicts" in text


@pytest.mark.slow  # a whole judged bench and its report (the default run stays within 4 minutes)
def test_the_report_shows_position_bias_per_judge_model(bench):
    out, text = bench
    outcomes = rows(out, "outcomes")
    table = md_table(text, "## Position bias")
    for d in judge.DIMENSIONS:
        first_won = [o for o in outcomes if o[d] == ("win" if o["first"] == "a" else "loss")]
        ties = [o for o in outcomes if o[d] == "tie"]
        repeats = {}
        for o in outcomes:
            repeats.setdefault((o["seed"], o["method"], o["repeat"]), {})[o["first"]] = o[d]
        agree = sum(v["a"] == v["b"] for v in repeats.values())
        n = len(outcomes)
        second = n - len(first_won) - len(ties)
        assert next(r for r in table if r[:2] == ["tiny-qwen2-vl", d]) == [
            "tiny-qwen2-vl", d, f"{len(first_won) / n:.1%} ({len(first_won)})", f"{second / n:.1%} ({second})",
            f"{len(ties) / n:.1%} ({len(ties)})", f"{agree / len(repeats):.1%} ({agree} of {len(repeats)})"]


@pytest.mark.parametrize("extra, fragment", [
    (("--repeats", "0"), "--repeats 0"),
    (("--judge-temperature", "-0.5"), "--judge-temperature -0.5"),
])
def test_bad_judge_settings_are_one_line(tmp_path, extra, fragment):
    from support import one_error_line

    one_error_line(cli("bench", "--testbed", "tiny", "--methods", "merge,switch", *extra, "--out", tmp_path / "b"),
                   fragment)
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------ CLIP-I against unseen references

@pytest.mark.slow  # a whole judged bench and its report (the default run stays within 4 minutes)
def test_clip_i_references_are_rendered_at_seeds_no_search_used(bench):
    out, _ = bench
    results = rows(out, "results")
    searched = {r["seed"] for r in results}
    # The search runs' own seeds, from their run folders: every render there is at that seed.
    runs = [json.loads(p.read_text()) for p in (out / "runs").glob("*/run.json")]
    assert len(runs) == len(SEEDS)  # random, once per seed
    searched |= {run["config"]["sampling"]["seed"] for run in runs}
    for r in results:
        refs = json.loads(r["clip_i_references"])
        assert list(refs) == json.loads(r["loras"])
        seeds = {x["seed"] for xs in refs.values() for x in xs}
        assert seeds == set(DEFAULT_REFERENCE_SEEDS) and not seeds & searched
        assert all((out / x["image"]).is_file() for xs in refs.values() for x in xs)
    assert searched == set(SEEDS)


@pytest.mark.slow  # a whole judged bench and its report (the default run stays within 4 minutes)
def test_clip_i_is_reported_per_element_and_as_their_mean(bench):
    out, text = bench
    results = rows(out, "results")
    table = md_table(text, "## CLIP scores")
    header = text.split("## CLIP scores\n", 1)[1].strip().splitlines()[0]
    assert header == "| Method | CLIP-T | CLIP-I | CLIP-I character | CLIP-I clothing | n |"
    for row in table:
        mine = [r for r in results if r["method"] == row[0]]
        for cell, value in zip(row[2:5], (lambda r: r["clip_i"],
                                          lambda r: json.loads(r["clip_i_elements"])["character"],
                                          lambda r: json.loads(r["clip_i_elements"])["clothing"])):
            per_seed = [statistics.fmean(value(r) for r in mine if r["seed"] == s) for s in SEEDS]
            assert cell == f"{statistics.fmean(per_seed):.4f} ± {statistics.stdev(per_seed):.4f}"
        assert row[-1] == "1 set × 2 seeds"


@pytest.mark.slow  # a whole judged bench and its report (the default run stays within 4 minutes)
def test_report_clipscore_sets_clipscore_beside_the_cosine(bench, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(bench[0], out)
    assert cli("report", out, "--clipscore").exit_code == 0
    text = (out / "report.md").read_text()
    header = text.split("## CLIP scores\n", 1)[1].strip().splitlines()[0]
    assert header.startswith("| Method | CLIP-T | CLIPScore-T | CLIP-I | CLIPScore-I |")
    merge = [r for r in rows(out, "results") if r["method"] == "merge"]
    row = next(r for r in md_table(text, "## CLIP scores") if r[0] == "merge")
    per_seed = [statistics.fmean(250 * max(r["clip_t"], 0) for r in merge if r["seed"] == s) for s in SEEDS]
    assert row[2] == f"{statistics.fmean(per_seed):.4f} ± {statistics.stdev(per_seed):.4f}"
    assert clipscore(0.34) == pytest.approx(85.0) and clipscore(-0.2) == 0.0


def test_seeds_that_meet_the_reference_seeds_are_refused(tmp_path):
    from support import one_error_line

    seed = DEFAULT_REFERENCE_SEEDS[1]
    one_error_line(cli("bench", "--testbed", "tiny", "--methods", "merge", "--seeds", f"0,{seed}",
                       "--out", tmp_path / "b"), f"--seeds {seed}", "CLIP-I references")


# ------------------------------------------------------------------ ablations, every pair, the grid

ABLATED = ("bench", "--testbed", "tiny", "--elements", "2", "--limit", "1", "--methods", "merge,switch",
           "--switch-every", "2", "--drop-triggers", "clothing", "--judge-baseline", "all", "--seeds", "0")
VARIANTS = ("merge", "merge-drop-clothing", "switch", "switch-drop-clothing", "switch-every-2")


@pytest.fixture(scope="module")
def ablated(tmp_path_factory, localora_home):
    return bench_and_report(tmp_path_factory, "ablated", ABLATED)


@pytest.mark.slow  # a whole ablation bench (the default run stays within 4 minutes)
def test_ablations_are_method_variants_in_one_folder(ablated):
    out, text = ablated
    results = {r["method"]: r for r in rows(out, "results")}
    assert set(results) == set(VARIANTS)
    full = "best quality, demo character, red hair, demo clothing, blue jacket"
    assert results["merge"]["prompt"] == results["switch-every-2"]["prompt"] == full
    assert results["merge-drop-clothing"]["prompt"] == "best quality, demo character, red hair"
    # A variant is its own render: Switch every 2 steps differs from every 5 (4 steps: 0-2, 3)
    # only in when the second LoRA takes over; dropped trigger words change the prompt.
    keys = {m: (out / r["image"]).read_bytes() for m, r in results.items()}
    assert keys["merge"] != keys["merge-drop-clothing"] and keys["switch"] != keys["switch-every-2"]
    assert "`switch-every-2` is switch rotating every 2 step(s)" in text
    assert "`merge-drop-clothing` is merge without the clothing LoRA's trigger words in the prompt" in text
    assert [r[0] for r in md_table(text, "## CLIP scores")] == list(VARIANTS)


@pytest.mark.slow  # a whole ablation bench (the default run stays within 4 minutes)
def test_every_pair_is_judged_and_the_method_by_method_table_counts_them(ablated):
    out, text = ablated
    outcomes = rows(out, "outcomes")
    judged = {(o["method"], o["baseline"]) for o in outcomes}
    assert judged == {(a, b) for i, b in enumerate(VARIANTS) for a in VARIANTS[i + 1:]}
    table = md_table(text, "## Method × method")
    assert [r[0] for r in table] == list(VARIANTS)
    for i, row in enumerate(table):
        for j, cell in enumerate(row[1:]):
            r, c = VARIANTS[i], VARIANTS[j]
            if r == c:
                assert cell == "–"
                continue
            mine = [o for o in outcomes if (o["method"], o["baseline"]) in ((r, c), (c, r))]
            wins = [sum(o[d] == ("win" if o["method"] == r else "loss") for o in mine) for d in judge.DIMENSIONS]
            assert cell == " / ".join(f"{w / len(mine):.0%}" for w in wins) + f" ({len(mine)})"


@pytest.mark.slow  # a whole ablation bench (the default run stays within 4 minutes)
def test_the_report_has_the_image_grid(ablated):
    from PIL import Image

    out, text = ablated
    with Image.open(out / "grid.png") as im:
        assert im.size == (220 + 160 * len(VARIANTS), 24 + 160)  # one set, one column per method
    assert "![image grid](grid.png)" in text
    grid = md_table(text, "## Images")
    assert grid == [["demo-character_demo-clothing",
                     *(f"![{m}](images/demo-character_demo-clothing/s0-{m}.png)" for m in VARIANTS)]]


@pytest.mark.parametrize("extra, fragments", [
    (("--drop-triggers", "hat"), ("--drop-triggers hat", "character, clothing, style")),
    (("--switch-every", "3,5"), ("--switch-every 5", "4 denoising steps")),
    (("--methods", "merge,switch-every-9"), ("--switch-every 9", "4 denoising steps")),
    (("--methods", "merge,merge-every-2"), ("merge-every-2", "Switch's interval")),
    (("--methods", "merge,switch", "--no-fewshot"), ("--no-fewshot", "reflect")),
])
def test_bad_ablations_are_one_line(tmp_path, extra, fragments):
    from support import one_error_line

    args = ("bench", "--testbed", "tiny", "--methods", "merge,switch", *extra, "--out", tmp_path / "b")
    one_error_line(cli(*args), *fragments)
    assert not (tmp_path / "b").exists()


def test_no_fewshot_runs_reflect_without_examples_beside_reflect():
    from localora.bench.plan import BenchConfig, plan

    p = plan(BenchConfig("tiny", out=None, methods=("merge", "reflect"), no_fewshot=True, seeds=(0,)))
    assert p.methods == ("merge", "reflect", "reflect-nofewshot")
    assert p.variants["reflect"].fewshot and not p.variants["reflect-nofewshot"].fewshot
    assert p.variants["reflect-nofewshot"].base == "reflect"
