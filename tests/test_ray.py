"""The bench on a local Ray cluster of 2 CPU workers (real actors, renderer, VLM, CLIP and judge):
the same rows and image bytes as one process, a killed worker, a killed driver, and bad input.

Each Ray bench runs under its own LOCALORA_HOME (a fresh render cache, so its images are rendered
by its workers and not read from the single-process bench's cache) that shares the session's
tiny models, so both benches use the same LoRA files byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from localora import cluster
from localora.bench import distributed, runner
from localora.bench import report as bench_report
from localora.bench.plan import BenchConfig
from localora.bench.store import DB_FILE
from localora.cli import main
from localora.runs import distributed as distributed_compose
from support import ctrl_c_works, one_error_line

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("merge", "switch", "reflect")
CONFIG = dict(testbed="tiny", methods=METHODS, elements=2, seeds=(0,), iterations=1, candidates=2)
ARGS = ("bench", "--testbed", "tiny", "--elements", "2", "--methods", ",".join(METHODS), "--iterations", "1",
        "--candidates", "2", "--seeds", "0")
ROWS = 2 * len(METHODS) + 2 * (len(METHODS) - 1)  # 2 sets: a result per method, a pair per non-baseline
# How the work was shared, not what it made: a search resumed from its folder (its first worker
# or driver was killed mid-loop) takes its finished steps from the log, so makes fewer VLM calls.
WORK = {"rowid", "renders", "cache_hits", "vlm_calls", "seconds", "session", "finished"}


class Rows:
    """A Progress that keeps the finished rows' lines and can act on the n-th."""

    def __init__(self, on_row=None):
        self.lines: list[str] = []
        self.on_row = on_row

    def start(self, total: int, done: int) -> None:
        self.total = total

    def working(self, what: str) -> None: ...

    def finished(self, line: str) -> None:
        self.lines.append(line)
        if self.on_row:
            self.on_row(len(self.lines))


@contextlib.contextmanager
def own_home(path: Path, shared: Path):
    """LOCALORA_HOME=path (with the session's tiny models) for this process and the Ray workers it starts."""
    path.mkdir(parents=True)
    (path / "tiny").symlink_to(shared / "tiny", target_is_directory=True)
    old = os.environ["LOCALORA_HOME"]
    os.environ["LOCALORA_HOME"] = str(path)
    try:
        yield path
    finally:
        os.environ["LOCALORA_HOME"] = old


def contents(out: Path) -> dict:
    """What a bench made: every row without its work columns, and every image by sha256."""
    with sqlite3.connect(out / DB_FILE) as conn:
        conn.row_factory = sqlite3.Row
        tables = {t: sorted(json.dumps({k: r[k] for k in r.keys() if k not in WORK}, sort_keys=True)
                            for r in conn.execute(f"SELECT rowid, * FROM {t}")) for t in ("results", "pairs", "outcomes")}
    images = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "images").rglob("*.png")}
    finals = {p.parent.name: json.loads(p.read_text()) for p in (out / "runs").glob("*/final.json")}
    return {**tables, "images": images, "final.json": finals}


def stored(out: Path) -> dict[tuple, dict]:
    """Every stored row with all its columns, by ("result" | "pair", set, seed, method[, baseline])."""
    with sqlite3.connect(out / DB_FILE) as conn:
        conn.row_factory = sqlite3.Row
        rows = {("result", r["set_id"], r["seed"], r["method"]): dict(r) for r in conn.execute("SELECT * FROM results")}
        rows.update({("pair", r["set_id"], r["seed"], r["method"], r["baseline"]): dict(r)
                     for r in conn.execute("SELECT * FROM pairs")})
    return rows


def worker_log(home: Path, out: Path) -> list[dict]:
    """Every task the workers of this bench finished, from their logs on this node."""
    return [json.loads(line) for p in sorted(cluster.log_dir(distributed.bench_id(out), home).glob("worker-*.jsonl"))
            for line in p.read_text().splitlines()]


def report_text(out: Path) -> str:
    bench_report.write(out, False)
    return (out / "report.md").read_text().replace(str(out), "OUT")


@pytest.fixture(scope="module")
def single(tmp_path_factory, localora_home):
    out = tmp_path_factory.mktemp("single") / "bench"
    runner.run(BenchConfig(out=out, **CONFIG), Rows())
    return out


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, localora_home):
    base = tmp_path_factory.mktemp("ray")
    with own_home(base / "home", localora_home) as home:
        progress = Rows()
        summary = distributed.run(BenchConfig(out=base / "bench", **CONFIG), progress, "local", workers=2)
    return base / "bench", home, summary, progress


@pytest.fixture(scope="module")
def killed_worker(tmp_path_factory, localora_home):
    """A Ray bench whose worker that finished the first row is killed (SIGKILL) right then."""
    base = tmp_path_factory.mktemp("ray-kill")
    out = base / "bench"
    killed = []

    def kill(n: int) -> None:
        if n == 1:
            pid = int(sorted(cluster.log_dir(distributed.bench_id(out), home).glob("worker-*.jsonl"))[0].stem.split("-")[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    with own_home(base / "home", localora_home) as home:
        summary = distributed.run(BenchConfig(out=out, **CONFIG), Rows(kill), "local", workers=2)
    return out, home, summary, killed


@pytest.mark.slow
def test_two_workers_store_exactly_the_single_process_rows_and_images(single, two_workers):
    out, home, summary, progress = two_workers
    assert summary.made == ROWS == len(progress.lines) and summary.retried == 0
    assert contents(out) == contents(single)
    # Both workers made rows, each row once, and the render cache was this bench's own.
    log = worker_log(home, out)
    assert len(log) == ROWS and len({tuple(t["row"]) for t in log}) == ROWS
    assert len({p.stem for p in cluster.log_dir(distributed.bench_id(out), home).glob("worker-*.jsonl")}) == 2
    assert sum(t["renders"] for t in log) > 0
    # A rerun finds every row stored and starts no worker.
    again = distributed.run(BenchConfig(out=out, **CONFIG), Rows(), "local", workers=2)
    assert (again.made, again.skipped) == (0, ROWS)


@pytest.mark.slow
def test_a_killed_worker_has_its_row_retried_and_every_row_stored_once(single, killed_worker):
    out, home, summary, killed = killed_worker
    assert len(killed) == 1 and summary.retried == 1 and summary.made == ROWS
    assert contents(out) == contents(single)
    assert report_text(out) == report_text(single)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "interrupted"])
def test_a_stopped_driver_resumes_without_computing_a_stored_row_again(single, tmp_path, localora_home, how):
    """The driver SIGKILLed (with its local cluster), or Ctrl-C'd (SIGINT: it says so, exits 130
    and stops the cluster), after 3 stored rows; then rerun (--resume for the interrupted one)."""
    out = tmp_path / "bench"
    home = tmp_path / "home"
    home.mkdir()
    (home / "tiny").symlink_to(localora_home / "tiny", target_is_directory=True)
    env = {**os.environ, "LOCALORA_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}

    def bench(*extra: str) -> subprocess.Popen:
        # Its own process group: the Ray processes the driver starts are killed with it.
        return subprocess.Popen([sys.executable, "-m", "localora", *ARGS, "--out", str(out), "--plain", "--ray", "local",
                                 "--workers", "2", *extra], env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=ctrl_c_works)

    proc, seen, lines = bench(), 0, []
    for line in proc.stdout:
        lines.append(line)
        seen += bool(re.match(r"\[\d\d:\d\d\] \d+/\d+ ", line))  # a stored row's line
        if seen == 3:
            if how == "killed":
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                os.kill(proc.pid, signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=120)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything of Ray's left behind
    outlived(proc.pid)
    if how == "killed":
        assert proc.returncode == -9, "".join(lines) + rest
    else:
        assert proc.returncode == 130 and "interrupted; finished rows are saved" in rest, "".join(lines) + rest
    first = stored(out)
    assert 3 <= len(first) < ROWS
    rerun_started = time.time()
    proc = bench(*(["--resume"] if how == "interrupted" else []))
    output, _ = proc.communicate(timeout=600)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything of Ray's left behind
    assert proc.returncode == 0, output
    final = stored(out)
    assert all(final[k] == row for k, row in first.items())  # untouched: same session, time and values
    rerun = {row["session"] for k, row in final.items() if k not in first}
    assert len(rerun) == 1 and not rerun & {row["session"] for row in first.values()}
    redone = [tuple(t["row"]) for t in worker_log(home, out) if t["session"] in rerun]
    assert all(t["finished"] >= rerun_started for t in worker_log(home, out) if t["session"] in rerun)
    assert len(redone) == len(set(redone)) == ROWS - len(first)
    assert not set(redone) & set(first)
    assert set(redone) | set(first) == set(final) and len(final) == ROWS
    assert contents(out) == contents(single)


def outlived(session: int, within: float = 120) -> None:
    """Wait until no process of session `session` is left. Ray starts each worker in a process
    group of its own, so a SIGKILL of the driver's group leaves the workers running until they
    notice their raylet is gone (seconds; longer on a loaded machine), and one may finish, and
    log, a row of the killed run while the rerun starts. Waits on each process's pidfd, which
    becomes readable when it exits (a zombie has exited already)."""
    deadline = time.monotonic() + within
    while True:
        fds = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):  # gone meanwhile
                fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp session
                if int(fields[3]) == session and fields[0] != "Z":
                    fds.append(os.pidfd_open(int(stat.parent.name)))
        if not fds:
            return
        try:
            while fds:
                ready, _, _ = select.select(fds, [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise AssertionError(f"{len(fds)} processes of the killed bench were still running after {within:g} s")
                for fd in ready:
                    fds.remove(fd)
                    os.close(fd)
        finally:
            for fd in fds:
                os.close(fd)


def bench_cli(*args):
    return CliRunner().invoke(main, [*ARGS, *map(str, args)])


def test_an_address_nobody_answers_is_one_line_in_seconds(tmp_path):
    started = time.monotonic()
    result = bench_cli("--out", tmp_path / "b", "--ray", "127.0.0.1:1")
    one_error_line(result, "--ray 127.0.0.1:1", "no Ray cluster answers", "ray start --head")
    assert time.monotonic() - started < 30 and not (tmp_path / "b").exists()


@pytest.mark.slow  # starts a local Ray cluster (several seconds), as the other cluster runs
def test_a_cluster_without_gpu_for_a_gpu_profile_is_one_line(tmp_path):
    result = bench_cli("--out", tmp_path / "b", "--ray", "local", "--profile", "sdxl-realistic")
    one_error_line(result, "has no GPU", "sdxl-realistic", "float16")
    assert not (tmp_path / "b").exists()  # rerun with a CPU profile into the same folder


def test_ray_not_installed_is_one_line_saying_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = bench_cli("--out", tmp_path / "b", "--ray", "local")
    one_error_line(result, 'pip install "localora[ray]"')
    assert result.exit_code == 3


def test_worker_options_without_ray_and_resume_without_a_bench(tmp_path):
    one_error_line(bench_cli("--out", tmp_path / "b", "--workers", "2"), "--ray")
    one_error_line(bench_cli("--out", tmp_path / "b", "--resume"), "--resume", DB_FILE)


LINES = [{"prompt": "a girl in a garden", "loras": ["demo-character", "demo-style"]},
         {"prompt": "a girl on a beach", "loras": ["demo-character", "demo-clothing"], "seed": 3},
         {"prompt": "a girl in a city", "loras": ["demo-clothing", "demo-style"], "name": "city"}]
COMPOSE = ("compose", "--profile", "tiny", "--iterations", "1", "--candidates", "2", "--no-fewshot")


def run_folders(out: Path) -> dict[str, tuple]:
    """Each line's folder: its final pick and the bytes of its final image."""
    return {p.name: (json.loads((p / "final.json").read_text()), hashlib.sha256((p / "final.png").read_bytes()).hexdigest())
            for p in sorted(out.iterdir()) if p.is_dir()}


@pytest.mark.slow
def test_a_batch_compose_on_two_workers_writes_the_single_process_folders(tmp_path, localora_home):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    result = CliRunner().invoke(main, [*COMPOSE, "--prompts", str(prompts), "--out", str(tmp_path / "single")])
    assert result.exit_code == 0, result.output
    with own_home(tmp_path / "home", localora_home):
        ray_args = [*COMPOSE, "--prompts", str(prompts), "--out", str(tmp_path / "ray"), "--ray", "local",
                    "--workers", "2", "--json"]
        result = CliRunner().invoke(main, ray_args)
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        assert [r["status"] for r in doc["lines"]] == ["done"] * 3
        assert run_folders(tmp_path / "ray") == run_folders(tmp_path / "single")
        assert json.loads((tmp_path / "ray" / "batch.json").read_text())["lines"] == doc["lines"]
        # Both workers composed, each line once; a rerun has nothing to do and starts no cluster.
        logs = [json.loads(line) for p in cluster.log_dir(distributed_compose.batch_id(tmp_path / "ray"))
                .glob("worker-*.jsonl") for line in p.read_text().splitlines()]
        assert sorted(t["line"] for t in logs) == [1, 2, 3]
        stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*") if p.parent.name != "ray"}
        result = CliRunner().invoke(main, ray_args)
        assert result.exit_code == 0, result.output
        assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_compose_ray_needs_a_batch(tmp_path):
    result = CliRunner().invoke(main, [*COMPOSE, "a prompt", "--lora", "demo-character", "--lora", "demo-style",
                                       "--ray", "local"])
    one_error_line(result, "--ray", "--prompts FILE.jsonl")


@pytest.mark.slow  # starts a local Ray cluster (several seconds), as the other cluster runs
def test_a_node_without_a_lora_file_gets_the_drivers_bytes_once_under_its_name(tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("LOCALORA_HOME", str(tmp_path / "node-home"))
    lora = tmp_path / "driver" / "loras" / "my-style.safetensors"
    lora.parent.mkdir(parents=True)
    lora.write_bytes(b"weights" * 1000)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             object_store_memory=cluster.LOCAL_OBJECT_STORE)
    try:
        assert cluster.ship_files(ray, [lora], nodes=1) == cluster.Shipped()  # one node: its files are the driver's
        shipped = cluster.ship_files(ray, [lora, lora], nodes=2)
        assert cluster.local_file(lora, shipped, ray) == lora  # this node has it, with that content
        data = lora.read_bytes()
        lora.rename(lora.with_suffix(".moved"))  # a node that lacks the driver's file
        here = cluster.local_file(lora, shipped, ray)
        assert here.name == "my-style.safetensors" and here.read_bytes() == data
        assert here.is_relative_to(tmp_path / "node-home" / "cluster" / "files")
        stamp = here.stat().st_mtime_ns
        assert cluster.local_file(lora, shipped, ray) == here and here.stat().st_mtime_ns == stamp  # kept, not rewritten
    finally:
        ray.shutdown()


def test_a_packed_run_folder_replaces_the_old_one_whole(tmp_path):
    made = tmp_path / "worker" / "run"
    (made / "images").mkdir(parents=True)
    (made / "final.json").write_text("{}")
    (made / "images" / "a.png").write_bytes(b"png")
    (made / ".lock").write_text("123")  # the worker's lock stays with the worker
    target = tmp_path / "bench" / "runs" / "run"
    target.mkdir(parents=True)
    (target / "events.jsonl").write_text("partial")
    cluster.unpack(cluster.pack(made), target)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["final.json", "images", "images/a.png"]
    assert [p.name for p in target.parent.iterdir()] == ["run"]  # no temporary left beside it


def test_a_worker_runs_the_profile_on_its_own_gpu_numbering():
    from dataclasses import replace

    from localora.profiles import load_profile

    tiny = load_profile("tiny")
    assert cluster.worker_profile(replace(tiny, device="cuda:1")).device == "cuda"  # Ray shows it as cuda:0
    assert cluster.worker_profile(tiny) == tiny and cluster.worker_profile(replace(tiny, device="cpu")).device == "cpu"
    assert cluster.needs_gpu(load_profile("sdxl-realistic")) and not cluster.needs_gpu(tiny)


def test_worker_counts_below_one_are_refused_by_the_option(tmp_path):
    result = bench_cli("--out", tmp_path / "b", "--ray", "local", "--workers", "0")
    assert result.exit_code == 2 and "--workers" in result.output and not (tmp_path / "b").exists()
