"""Search strategies at an equal render budget: distinct candidates, random, CMA-ES, the hybrid."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from localora.cli import main
from localora.errors import LocaloraError
from localora.search.blackbox import cmaes_search, random_search
from localora.search.candidates import Taken, complete, round_rng
from support import one_error_line, signal_after

BOUNDS = (0.0, 1.5)


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ distinct candidates, no model

def test_repeats_are_asked_again_then_filled_and_never_taken_twice():
    taken = Taken(BOUNDS)
    taken.add([(1.0, 1.0)])
    first = [(1.0, 1.0), (0.5, 0.5), (0.5, 0.5001), (0.2, 0.3)]  # taken, new, a repeat at two decimals, new
    vectors, origins = complete(taken, first, [(0.2, 0.3), (0.9, 0.1)], 5, (1.0, 1.0), round_rng(0, 1))
    assert vectors[:3] == [(0.5, 0.5), (0.2, 0.3), (0.9, 0.1)] and origins[:3] == ["vlm", "vlm", "vlm-again"]
    assert origins[3:] == ["filled", "filled"]
    assert len(set(vectors)) == 5 and (1.0, 1.0) not in vectors
    assert all(BOUNDS[0] <= w <= BOUNDS[1] and round(w, 2) == w for v in vectors for w in v)
    assert set(vectors) <= taken.vectors
    again, _ = complete(Taken(BOUNDS, {(1.0, 1.0)}), first, [(0.2, 0.3), (0.9, 0.1)], 5, (1.0, 1.0), round_rng(0, 1))
    assert again == vectors  # seeded per (seed, round): a resumed run fills the same way


def test_bounds_too_narrow_to_fill_are_one_error():
    taken = Taken((0.5, 0.51))
    taken.add([(0.5, 0.5), (0.5, 0.51), (0.51, 0.5), (0.51, 0.51)])
    with pytest.raises(LocaloraError, match="too narrow"):
        complete(taken, [], None, 1, (0.5, 0.5), round_rng(0, 1))


# ------------------------------------------------------------------ the optimizers on a known quadratic

OPTIMUM = np.array([0.37, 1.12, 0.8])


def quadratic(seen: list):
    def evaluate(r, vectors, origins):
        seen.extend(vectors)
        return [-float(np.sum((np.asarray(v) - OPTIMUM) ** 2)) for v in vectors]
    return evaluate


@pytest.mark.parametrize("seed", range(4))
def test_cmaes_finds_a_known_optimum_within_the_budget_and_random_does_worse(seed):
    seen_cma, seen_random = [], []
    cma = cmaes_search(quadratic(seen_cma), (1.0, 1.0, 1.0), BOUNDS, 60, 6, seed, Taken(BOUNDS))
    rnd = random_search(quadratic(seen_random), 3, BOUNDS, 60, 6, seed, Taken(BOUNDS))
    for seen in (seen_cma, seen_random):
        assert len(seen) == 60 and len(set(seen)) == 60  # exactly the budget, no vector twice
    assert np.linalg.norm(np.asarray(cma.best[1]) - OPTIMUM) < 0.12
    assert cma.best[2] > rnd.best[2]
    again = cmaes_search(quadratic([]), (1.0, 1.0, 1.0), BOUNDS, 60, 6, seed, Taken(BOUNDS))
    assert again.evaluated == cma.evaluated


def test_cmaes_leaves_the_global_numpy_generator_alone():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    cmaes_search(quadratic([]), (1.0, 1.0, 1.0), BOUNDS, 12, 6, 0, Taken(BOUNDS))
    assert np.random.rand() == expected


def test_hybrid_tells_the_vlm_vectors_and_samples_the_rest():
    proposed = [(0.3, 1.1, 0.8), (0.4, 1.2, 0.7)]
    seen: list = []
    result = cmaes_search(quadratic(seen), (1.0, 1.0, 1.0), BOUNDS, 12, 3, 0, Taken(BOUNDS),
                          propose=lambda r, best: list(proposed) if r == 1 else [])
    assert seen[:2] == proposed and len(set(seen)) == 12
    assert result.best[1] in seen


# ------------------------------------------------------------------ compose on the tiny profile

ARGS = ["a girl", "-l", "demo-character", "-l", "demo-style", "-n", "2", "-c", "2", "--plain"]


def compose(*args, env=None):
    return CliRunner().invoke(main, ["compose", *map(str, args)], env=env)


@pytest.fixture(scope="module")
def cmaes_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmaes") / "run"
    result = compose(*ARGS, "--search", "cmaes", "--budget", "7", "--seed", "5", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def _check_budget_and_best(run: Path, budget: int) -> None:
    log = events(run)
    cands = [e for e in log if e["type"] == "render" and e["role"] == "candidate"]
    assert len(cands) == budget and len({e["key"] for e in cands}) == budget
    scores = [e for e in log if e["type"] == "scores"]
    pairs = [(f, w) for s in scores for f, w in zip(s["objective"], s["candidates"])]
    best_value, best_weights = max(pairs, key=lambda p: p[0])
    final = json.loads((run / "final.json").read_text())
    assert final["weights"] == best_weights and final["objective"] == best_value and final["renders"] == budget
    done = [e for e in log if e["type"] == "done"][-1]
    assert done["renders"] == budget


def test_cmaes_compose_spends_exactly_the_budget_and_keeps_the_best(cmaes_run):
    _check_budget_and_best(cmaes_run, 7)  # rounds of 3, the last one partial
    states = [e for e in events(cmaes_run) if e["type"] == "state"]
    assert [s["spent"] for s in states] == [3, 6, 7]
    assert {"mean", "sigma", "covariance", "rng"} <= set(states[-1]["state"])
    assert "Best objective over renders" in (cmaes_run / "report.html").read_text()


def test_a_fixed_seed_gives_the_same_search(cmaes_run, tmp_path):
    result = compose(*ARGS, "--search", "cmaes", "--budget", "7", "--seed", "5", "--out", tmp_path / "again")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "again" / "final.json").read_text()) == json.loads((cmaes_run / "final.json").read_text())


def test_random_compose_spends_exactly_the_default_budget(tmp_path):
    result = compose(*ARGS, "--search", "random", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    _check_budget_and_best(tmp_path / "run", 2 * (2 + 1))  # N (M + 1), as the vlm loop renders


def test_hybrid_compose_asks_the_vlm_each_round(tmp_path):
    result = compose(*ARGS, "--search", "hybrid", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    log = events(tmp_path / "run")
    assert [e["id"] for e in log if e["type"] == "vlm"] == ["iter1/generate", "iter2/generate"]
    cands = [e for e in log if e["type"] == "render" and e["role"] == "candidate"]
    assert len(cands) == 6 and len({e["key"] for e in cands}) == 6
    assert {e["origin"] for e in cands} <= {"vlm", "cmaes", "filled"} and "cmaes" in {e["origin"] for e in cands}


@pytest.mark.slow
def test_a_killed_cmaes_run_resumes_to_the_same_result_without_redoing_a_render(cmaes_run, tmp_path):
    from localora import paths

    home = tmp_path / "home"  # a cold render cache: every render of the cut run is real
    shutil.copytree(paths.home() / "tiny", home / "tiny")
    env = {**os.environ, "LOCALORA_HOME": str(home)}
    args = [sys.executable, "-m", "localora", "compose", *ARGS, "--search", "cmaes", "--budget", "7", "--seed", "5"]
    proc = subprocess.Popen([*args, "--out", str(tmp_path / "cut")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stop_after = random.Random(7).randint(5, 9)  # some line between the second reference and the last round
    signal_after(proc, stop_after, signal.SIGKILL)
    before = events(tmp_path / "cut")
    assert not (tmp_path / "cut" / "final.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "localora", "compose", "--resume", str(tmp_path / "cut"), "--plain"],
                             env=env, text=True, capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = events(tmp_path / "cut")[len(before):]
    done_before = {e["id"] for e in before if "id" in e}
    assert {e["id"] for e in after if "id" in e} & done_before == set()
    assert json.loads((tmp_path / "cut" / "final.json").read_text()) == json.loads((cmaes_run / "final.json").read_text())


def test_the_final_judge_picks_among_the_top_three(tmp_path):
    result = compose(*ARGS, "--search", "random", "--final-judge", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    log = events(tmp_path / "run")
    asked = [e["id"] for e in log if e["type"] == "vlm"]
    assert asked == [f"final/{i}v{j}{o}" for i, j in ((1, 2), (1, 3), (2, 3)) for o in "ab"]
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["picked_by"] == "final judge" and len(final["judge_points"]) == 3
    points = final["judge_points"]
    winner = max(range(3), key=lambda k: (points[k], -k))
    assert final["weights"] == final["top"][winner]["weights"]
    judged = [e for e in log if e["type"] == "vlm"][0]
    assert len(judged["images"]) == 2 and "demo-character" in judged["prompt"]


@pytest.mark.slow
def test_the_final_judge_replaces_the_select_step_of_the_vlm_loop(tmp_path):
    result = compose(*ARGS, "-n", "3", "--no-fewshot", "--final-judge", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    log = events(tmp_path / "run")
    steps = [e["id"] for e in log if e["type"] == "vlm" and e["id"].startswith(("final/", "select"))]
    assert steps == [f"final/{i}v{j}{o}" for i, j in ((1, 2), (1, 3), (2, 3)) for o in "ab"]
    scores = next(e for e in log if e.get("id") == "final/scores")
    refined = [e for e in log if e.get("role") == "refined"]
    assert scores["images"] == [e["image"] for e in refined] and len(scores["objective"]) == 3
    done = [e for e in log if e["type"] == "done"][-1]
    assert done["weights"] == refined[done["iteration"] - 1]["weights"] and done["renders"] == 3 * (2 + 1)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("args,fragments", [
    (["--search", "cmaes", "--budget", "2"], ["--budget 2", "one round of 3"]),
    (["--search", "anneal"], ["unknown search strategy 'anneal'", "cmaes"]),
    (["--search", "random", "--bounds", "0.5,0.51"], ["--bounds 0.5,0.51", "4 distinct"]),
    (["--budget", "9"], ["--budget applies to", "vlm"]),
])
def test_bad_search_options_are_one_line(tmp_path, args, fragments):
    one_error_line(compose(*ARGS, *args, "--out", tmp_path / "r"), *fragments)
    assert not (tmp_path / "r").exists()
