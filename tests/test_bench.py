"""The bench end to end on the tiny testbed (real renderer, VLM, CLIP and judge): SQLite rows,
kill and resume, accumulating sizes, the report, and bad input."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from rich.console import Console

from localora.bench import report as bench_report
from localora.bench.plan import DEFAULT_REFERENCE_SEEDS
from localora.bench.store import DB_FILE
from localora.ui.progress import LiveProgress
from localora.scoring import judge
from localora.cli import main
from localora.errors import LocaloraError
from localora.export import read_source
from support import one_error_line

SETS = ("demo-character_demo-clothing", "demo-character_demo-style")  # the tiny testbed's 2-element sets
METHODS = ("merge", "switch", "composite", "reflect")
ARGS = ("bench", "--testbed", "tiny", "--elements", "2", "--methods", ",".join(METHODS),
        "--iterations", "1", "--candidates", "2", "--seeds", "0")
KILL_AFTER = 9  # set 1 complete (4 rows + 3 pairs), then set 2's merge and switch
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def localora(*args) -> subprocess.Popen:
    # LOCALORA_HOME is the session's (conftest), so the tiny models are built once for all tests.
    # PYTHONPATH: the checkout under test, wherever an editable install of localora points.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, (
        str(ROOT), os.environ.get("PYTHONPATH"))))}
    return subprocess.Popen([sys.executable, "-m", "localora", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def table(out: Path, name: str) -> dict[tuple, dict]:
    """A bench table keyed by (set, seed, method), every column including rowid."""
    with sqlite3.connect(out / DB_FILE) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute(f"SELECT rowid, * FROM {name}")]
    return {(r["set_id"], r["seed"], r["method"]): r for r in rows}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, localora_home):
    """A bench killed (SIGKILL) after KILL_AFTER finished rows, then rerun with the same arguments."""
    out = tmp_path_factory.mktemp("bench") / "tiny"
    proc = localora(*ARGS, "--out", out)
    seen = 0
    for line in proc.stdout:
        if line.startswith("["):
            seen += 1
            if seen == KILL_AFTER:
                proc.kill()
                break
    first_output, _ = proc.communicate(timeout=120)
    assert proc.returncode == -9, first_output
    before = {"results": table(out, "results"), "pairs": table(out, "pairs")}
    images = {k: (out / r["image"]).stat().st_mtime_ns for k, r in before["results"].items()}
    loop_logs = {p.parent.name: p.read_bytes() for p in (out / "runs").glob("*/events.jsonl")}

    proc = localora(*ARGS, "--out", out)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    return out, before, images, loop_logs, output


@pytest.mark.slow
def test_a_finished_bench_holds_every_row(resumed):
    out = resumed[0]
    results, pairs = table(out, "results"), table(out, "pairs")
    assert set(results) == {(s, 0, m) for s in SETS for m in METHODS}
    assert set(pairs) == {(s, 0, m) for s in SETS for m in METHODS if m != "merge"}
    for (set_id, _, method), r in results.items():
        ids = set_id.split("_")
        assert json.loads(r["loras"]) == ids and r["elements"] == 2
        assert r["prompt"] == "best quality, " + ", ".join(
            {"demo-character": "demo character, red hair", "demo-clothing": "demo clothing, blue jacket",
             "demo-style": "demo style, watercolor"}[i] for i in ids)
        weights = json.loads(r["weights"])
        assert set(weights) == set(ids) == set(json.loads(r["clip_i_each"]))
        if method == "reflect":
            assert all(0.0 <= w <= 1.5 for w in weights.values()) and r["vlm_calls"] in (3, 4)  # generate (maybe again), feedback, refine
            assert (out / "runs" / f"{set_id}-s0" / "final.json").is_file()
        else:
            assert set(weights.values()) == {0.8} and r["vlm_calls"] == 0
        assert -1 <= r["clip_t"] <= 1 and -1 <= r["clip_i"] <= 1
        assert r["clip_i"] == pytest.approx(statistics.fmean(json.loads(r["clip_i_each"]).values()))
        assert (out / r["image"]).read_bytes().startswith(PNG_SIGNATURE)
        # a copy of the render's PNG, with the metadata that says how it was made
        assert read_source(out / r["image"]).info.method == ("merge" if method == "reflect" else method)
    for p in pairs.values():
        assert p["baseline"] == "merge" and p["vlm_calls"] == 2  # both orders, one repeat
        answers = json.loads(p["answers"])
        assert sorted(a["first"] for a in answers) == ["a", "b"]
        scores = judge.PairScores({d: p[f"{d}_a"] for d in judge.DIMENSIONS}, {d: p[f"{d}_b"] for d in judge.DIMENSIONS})
        assert {d: p[d] for d in judge.DIMENSIONS} == judge.verdict(scores)
    # The single-LoRA CLIP-I references were rendered at the held-out seeds, once per LoRA.
    assert sorted(p.name for p in (out / "images" / "references").glob("*.png")) == [
        f"{lora}-s{seed}.png" for lora in ("demo-character", "demo-clothing", "demo-style")
        for seed in DEFAULT_REFERENCE_SEEDS]


@pytest.mark.slow
def test_a_killed_bench_resumes_without_redoing_finished_rows(resumed):
    out, before, images, loop_logs, output = resumed
    results, pairs = table(out, "results"), table(out, "pairs")
    done = len(before["results"]) + len(before["pairs"])
    assert KILL_AFTER <= done < 2 * (2 * len(METHODS) - 1)
    # Finished rows are untouched: same rowid, timestamp, session and values; their images too.
    for name, now in (("results", results), ("pairs", pairs)):
        assert all(now[k] == row for k, row in before[name].items())
    assert all((out / results[k]["image"]).stat().st_mtime_ns == t for k, t in images.items())
    finished_loops = {f"{s}-s0" for s, _, m in before["results"] if m == "reflect"}
    for name in finished_loops:
        assert (out / "runs" / name / "events.jsonl").read_bytes() == loop_logs[name]
    new = [r for k, r in results.items() if k not in before["results"]]
    new_pairs = [r for k, r in pairs.items() if k not in before["pairs"]]
    sessions = {r["session"] for r in [*before["results"].values(), *before["pairs"].values()]}
    assert len(sessions) == 1 and {r["session"] for r in new + new_pairs} == {max(sessions) + 1}
    # The rerun's own totals (renderer and VLM counters, not the rows) are exactly the new rows'
    # work: nothing was rendered, scored or judged again for a finished row.
    lines = output.splitlines()
    assert lines[0] == f"bench: {len(new) + len(new_pairs)} rows to make, {done} already done"
    assert sum(line.startswith("[") for line in lines) == len(new) + len(new_pairs)
    m = re.fullmatch(r"bench: (\d+) rows made, (\d+) already done; (\d+) renders \((\d+) from the cache\), "
                     r"(\d+) VLM calls\. Report: .*", lines[-1])
    assert m, lines[-1]
    made, skipped, renders, hits, calls = map(int, m.groups())
    assert (made, skipped) == (len(new) + len(new_pairs), done)
    assert renders == sum(r["renders"] for r in new) and hits == sum(r["cache_hits"] for r in new)
    assert calls == sum(r["vlm_calls"] for r in new + new_pairs)


@pytest.mark.slow
def test_a_complete_bench_reruns_as_a_no_op(resumed):
    out = resumed[0]
    result = cli(*ARGS, "--out", out)
    assert result.exit_code == 0, result.output
    assert "0 rows to make, 14 already done" in result.output and "0 VLM calls" in result.output


@pytest.mark.slow
def test_a_folder_refuses_a_bench_with_other_settings(resumed):
    out = resumed[0]
    args = [a if a != "2" or prev != "--candidates" else "3" for prev, a in zip(("",) + ARGS, ARGS)]
    one_error_line(cli(*args, "--out", out), str(out), "other settings", "candidates 2 there, 3 now")


# ------------------------------------------------------------------ the report

@pytest.fixture(scope="module")
def reported(tmp_path_factory, localora_home):
    """A 2-element bench (its first set: every method and judged pair, in process) plus a 3-element
    one in the same folder, then `localora report`. Its own folder, not the killed-and-resumed one
    (slow), so the report is checked in the default run too."""
    out = tmp_path_factory.mktemp("report") / "tiny"
    for args in ((*ARGS, "--limit", "1"),
                 ("bench", "--testbed", "tiny", "--elements", "3", "--methods", "merge,switch", "--iterations", "1",
                  "--candidates", "2", "--seeds", "0")):
        result = cli(*args, "--out", out)
        assert result.exit_code == 0, result.output
    result = cli("report", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def _md_table(text: str, heading: str) -> list[list[str]]:
    """The cells of the first markdown table after `heading`."""
    lines = iter(text.split(heading + "\n", 1)[1].splitlines())
    rows = [next(ln for ln in lines if ln.startswith("|"))]
    rows += itertools.takewhile(lambda ln: ln.startswith("|"), lines)
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in rows[2:]]  # past header and rule


def _over_seeds(rows, value):
    """The mean over sets per seed, then mean ± std over seeds; the mean alone for one seed."""
    seeds = sorted({r["seed"] for r in rows})
    means = [statistics.fmean(value(r) for r in rows if r["seed"] == s) for s in seeds]
    return f"{statistics.fmean(means):.4f}" + (f" ± {statistics.stdev(means):.4f}" if len(means) > 1 else "")


def _clip_row(method, rows, categories):
    cells = [_over_seeds(rows, lambda r: r["clip_t"]), _over_seeds(rows, lambda r: r["clip_i"])]
    for c in categories:
        mine = [r for r in rows if c in json.loads(r["clip_i_elements"])]
        cells.append(_over_seeds(mine, lambda r: json.loads(r["clip_i_elements"])[c]) if mine else "–")
    sets, seeds = len({r["set_id"] for r in rows}), len({r["seed"] for r in rows})
    return [method, *cells, f"{sets} set{'s' * (sets != 1)} × {seeds} seed{'s' * (seeds != 1)}"]


@pytest.mark.slow  # two whole benches and a report (the default run stays within 4 minutes)
def test_report_table_matches_the_database(reported):
    out, _ = reported
    text = (out / "report.md").read_text()
    results = list(table(out, "results").values())
    assert sorted({r["elements"] for r in results}) == [2, 3]
    for heading, rows in (("## CLIP scores", results),
                          ("### 2 elements", [r for r in results if r["elements"] == 2]),
                          ("### 3 elements", [r for r in results if r["elements"] == 3])):
        categories = [c for c in ("character", "clothing", "style")
                      if any(c in json.loads(r["clip_i_elements"]) for r in rows)]
        expected = [_clip_row(m, [r for r in rows if r["method"] == m], categories)
                    for m in METHODS if any(r["method"] == m for r in rows)]
        assert _md_table(text, heading) == expected, heading
        header = text.split(heading + "\n", 1)[1].strip().splitlines()[0]
        assert header == "| Method | CLIP-T | CLIP-I | " + "".join(f"CLIP-I {c} | " for c in categories) + "n |"
    for r in results:  # per element by category, the mean of them is CLIP-I
        by_category = json.loads(r["clip_i_elements"])
        assert r["clip_i"] == pytest.approx(statistics.fmean(by_category.values()))
        assert list(by_category) == [{"demo-character": "character", "demo-clothing": "clothing",
                                      "demo-style": "style"}[i] for i in json.loads(r["loras"])]
    pairs = list(table(out, "pairs").values())
    judged = _md_table(text, "### Averaged verdicts")
    for m in ("switch", "composite", "reflect"):
        for d in judge.DIMENSIONS:
            verdicts = [p[d] for p in pairs if p["method"] == m]
            row = next(r for r in judged if r[:2] == [m, d])
            counts = [int(re.search(r"\((\d+)\)", cell)[1]) for cell in row[2:5]]
            assert counts == [verdicts.count("win"), verdicts.count("tie"), verdicts.count("loss")]
            assert int(row[5]) == len(verdicts)
    assert "#### 2 elements" in text and "#### 3 elements" in text


@pytest.mark.slow  # two whole benches and a report (the default run stays within 4 minutes)
def test_report_plots_are_png_files(reported):
    out, printed = reported
    for name in (bench_report.WINRATE_PNG, bench_report.BY_ELEMENTS_PNG):
        path = out / name
        assert path.read_bytes().startswith(PNG_SIGNATURE) and f"]({name})" in (out / "report.md").read_text()
        with Image.open(path) as im:
            im.verify()
        assert str(path) in printed


def test_report_counts_wins_ties_and_losses():
    # The tiny judge only ties; a constructed table checks the arithmetic and a mixed plot.
    def pair(method, comp, qual, n=2):
        return {"method": method, "baseline": "merge", "elements": n, "composition_a": comp[0],
                "composition_b": comp[1], "quality_a": qual[0], "quality_b": qual[1]}

    pairs = [pair("reflect", (7, 5), (6, 6)), pair("reflect", (4, 5), (7, 6)), pair("reflect", (8, 6), (5, 5)),
             pair("switch", (5, 5), (3, 4), n=3)]
    results = [{"method": m, "set_id": f"s{i}", "seed": 0, "elements": 2, "clip_i": 0.5 + i / 10, "clip_t": 0.3,
                "image": f"images/s{i}/s0-{m}.png"}
               for m in ("merge", "reflect") for i in range(2)]
    settings = {"testbed": "t", "profile": "p", "lora_scale": 0.8, "baseline": "merge", "iterations": 1,
                "candidates": 2, "fewshot": False, "repeats": 1}
    text = bench_report.markdown(results, pairs, settings, [])
    judged = _md_table(text, "### Averaged verdicts")
    assert judged[0] == ["switch", "composition", "0.0% (0)", "100.0% (1)", "0.0% (0)", "1", "5.00 / 5.00"]
    assert judged[2] == ["reflect", "composition", "66.7% (2)", "0.0% (0)", "33.3% (1)", "3", "6.33 / 5.33"]
    assert judged[3] == ["reflect", "quality", "33.3% (1)", "66.7% (2)", "0.0% (0)", "3", "6.00 / 5.67"]
    assert _md_table(text, "## CLIP scores")[0] == ["merge", "0.3000", "0.5500", "2 sets × 1 seed"]
    # Every judged pair in both directions: reflect won 2 of 3 in composition against merge.
    # Every judged pair counts in both directions: row's win rate vs column, composition / quality.
    assert _md_table(text, "## Method × method") == [
        ["merge", "–", "0% / 100% (1)", "33% / 0% (3)"],
        ["switch", "0% / 0% (1)", "–", "–"],
        ["reflect", "67% / 33% (3)", "–", "–"]]
    assert "one seed (n = 1)" in text and "± 0.0000" not in text


# ------------------------------------------------------------------ progress

def test_live_progress_shows_bar_eta_current_step_and_rows():
    console = Console(record=True, width=160, force_terminal=True)
    ui = LiveProgress(console)
    with ui:
        ui.start(4, 2)
        ui.working("demo-character_demo-style seed 0 reflect iter1/generate")
        ui.finished("demo-character_demo-style seed 0 merge     CLIP-T 0.1000 CLIP-I 0.2000")
        console.print(ui.bar.get_renderable())
    text = console.export_text()
    for fragment in ("4 rows to make, 2 already done", "1/4", "ETA", "reflect iter1/generate", "CLIP-T 0.1000"):
        assert fragment in text


# ------------------------------------------------------------------ bad input

def test_report_on_an_empty_folder(tmp_path):
    one_error_line(cli("report", tmp_path), "not a bench folder", "empty")


def test_report_on_a_folder_that_is_not_a_bench(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    one_error_line(cli("report", tmp_path), "not a bench folder", DB_FILE)
    (tmp_path / DB_FILE).write_text("not sqlite")
    one_error_line(cli("report", tmp_path), "not a localora bench database")


def test_bench_with_an_unknown_method(tmp_path):
    one_error_line(cli("bench", "--testbed", "tiny", "--methods", "merge,lora-blend", "--out", tmp_path / "b"),
                   "unknown method", "lora-blend", "merge, switch, composite, cmlora, reflect")
    assert not (tmp_path / "b").exists()


def test_bench_with_more_elements_than_categories(tmp_path):
    one_error_line(cli("bench", "--testbed", "tiny", "--elements", "4", "--out", tmp_path / "b"),
                   "composition size 4", "1 to 3")


def test_bench_baseline_must_be_one_of_the_methods(tmp_path):
    one_error_line(cli("bench", "--testbed", "tiny", "--methods", "switch,reflect", "--out", tmp_path / "b"),
                   "--judge-baseline merge")


def test_bench_into_a_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    one_error_line(cli("bench", "--testbed", "tiny", "--methods", "merge", "--out", tmp_path), "not a bench folder")


# ------------------------------------------------------------------ the store's schema versions

OLD = Path(__file__).parent / "data" / "bench-format1"  # made by localora 0.1 (user_version 0)


def old_folder(tmp_path: Path) -> tuple[Path, dict[str, list], dict]:
    """A copy of OLD, its rows and the settings its bench ran with, read before anything opens it."""
    folder = tmp_path / "old"
    shutil.copytree(OLD, folder)
    with sqlite3.connect(folder / DB_FILE) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        rows = {t: conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall() for t in ("results", "pairs")}
        settings = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()[0])
    return folder, rows, settings


@pytest.mark.parametrize("path", ["report", "bench"])
def test_a_bench_folder_made_by_the_previous_version_opens_and_is_migrated(tmp_path, path):
    from localora.bench.store import SCHEMA_VERSION, Store

    folder, before, settings = old_folder(tmp_path)
    # Each path on a fresh copy, so each is the one that migrates it: report reads, bench
    # reopens it for more rows with the settings the old run used.
    store = Store.open(folder) if path == "report" else Store.create_or_open(folder, settings)
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert len(store.results()) == 2 and len(store.pairs()) == 1
    for table, rows in before.items():
        now = [tuple(r) for r in store.conn.execute(f"SELECT * FROM {table} ORDER BY rowid")]
        assert [r[:len(rows[0])] for r in now] == rows  # later migrations only add columns, NULL here
        assert all(v is None for r in now for v in r[len(rows[0]):])
    assert store.settings() == settings
    store.conn.close()
    assert cli("report", folder).exit_code == 0
    report = (folder / "report.md").read_text()
    assert "| merge |" in report and "| switch | composition |" in report


def test_a_bench_folder_from_a_newer_version_is_refused_untouched(tmp_path):
    from localora.bench.store import SCHEMA_VERSION, Store

    folder, _, settings = old_folder(tmp_path)
    with sqlite3.connect(folder / DB_FILE) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    data = (folder / DB_FILE).read_bytes()
    one_error_line(cli("report", folder), "newer localora", "upgrade")
    with pytest.raises(LocaloraError, match="newer localora") as refused:
        Store.create_or_open(folder, settings)
    assert "\n" not in str(refused.value)
    assert (folder / DB_FILE).read_bytes() == data  # not downgraded, not written


def test_a_failed_migration_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    from localora.bench import store

    folder, _, _ = old_folder(tmp_path)
    half = "CREATE TABLE extra (x INTEGER);\nCREATE TABLE results (x INTEGER);"  # fails on its second statement
    monkeypatch.setattr(store, "MIGRATIONS", (*store.MIGRATIONS, half))
    monkeypatch.setattr(store, "SCHEMA_VERSION", len(store.MIGRATIONS))
    conn = sqlite3.connect(folder / DB_FILE)
    with pytest.raises(sqlite3.OperationalError, match="already exists"):
        store.migrate(conn, folder / DB_FILE)
    # Migration 1 committed; the failed one left neither its first table nor its number.
    assert conn.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION - 1
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'extra'").fetchall() == []
    assert not conn.in_transaction


@pytest.mark.slow
def test_black_box_methods_bench_at_the_search_budget(tmp_path):
    out = tmp_path / "b"
    result = cli("bench", "--testbed", "tiny", "--elements", "2", "--limit", "1", "--methods",
                 "merge,random,cmaes,hybrid", "--iterations", "2", "--candidates", "2", "--seeds", "0", "--out", out)
    assert result.exit_code == 0, result.output
    rows = table(out, "results")
    assert {k[2]: r["budget"] for k, r in rows.items()} == {"merge": None, "random": 6, "cmaes": 6, "hybrid": 6}
    for method in ("random", "cmaes", "hybrid"):
        (set_id, seed, _), = [k for k in rows if k[2] == method]
        log = [json.loads(line) for line in (out / "runs" / f"{set_id}-s{seed}-{method}" / "events.jsonl").open()]
        cands = [e for e in log if e["type"] == "render" and e["role"] == "candidate"]
        assert len({e["key"] for e in cands}) == len(cands) == 6
        assert json.loads(rows[(set_id, seed, method)]["weights"]) == [e for e in log if e["type"] == "done"][-1]["weights"]
    assert cli("report", out).exit_code == 0
    text = (out / "report.md").read_text()
    assert "## Search at an equal render budget" in text and "![best objective over renders](objective.png)" in text
    assert re.search(r"\| cmaes \| [-0-9.]+ \| [-0-9.]+ \|", text)
    assert (out / "objective.png").read_bytes().startswith(PNG_SIGNATURE)
