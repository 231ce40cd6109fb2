"""Issue 27 item 22: a Ray cluster whose only node dies (its raylet killed) is noticed within
seconds and ends in one line, instead of a driver that waits for a replacement worker for ever."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ray")
pytest.importorskip("psutil")

# Runs in its own process, so the cluster it starts (and whose raylet it kills) is its own.
SCRIPT = textwrap.dedent('''
    import os, signal, sys, threading
    from pathlib import Path

    import psutil

    from localora import cluster
    from localora.errors import LocaloraError
    from localora.profiles import load_profile

    flag = Path(sys.argv[1])

    class Busy:
        def ready(self):
            return {"node": "here", "pid": os.getpid(), "device": "cpu"}

        def run(self, payload):
            Path(payload).write_text("busy")  # a FIFO: the driver's reader below wakes up
            threading.Event().wait()  # a row that never finishes

    def kill_raylet():
        flag.read_text()  # blocks until the worker has its row (opening a FIFO waits for the writer)
        for child in psutil.Process().children(recursive=True):  # the cluster this process started
            if child.name() == "raylet":
                os.kill(child.pid, signal.SIGKILL)
                print("killed raylet", child.pid, flush=True)

    c = cluster.connect("local", load_profile("tiny"), workers=1)
    pool = c.pool(Busy)
    pool.add(cluster.Task("row 1", str(flag)))
    threading.Thread(target=kill_raylet, daemon=True).start()
    try:
        for _ in pool.results():
            pass
    except LocaloraError as e:
        print("error:", e, flush=True)
        os._exit(e.code)
    os._exit(0)
''')


@pytest.mark.slow  # Ray's control store takes 10-30 s to declare the node dead
def test_a_bench_whose_only_node_dies_ends_in_one_line_within_seconds(tmp_path):
    flag = tmp_path / "busy"
    os.mkfifo(flag)
    try:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(flag)], capture_output=True, text=True, timeout=150,
                              env={**os.environ, "RAY_BACKEND_LOG_LEVEL": "error"})
    except subprocess.TimeoutExpired:
        pytest.fail("the driver was still waiting 150 s after its only node died")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert proc.returncode == 4, proc.stdout + proc.stderr[-3000:]
    assert len(lines) == 1 and "no live node" in lines[0]
