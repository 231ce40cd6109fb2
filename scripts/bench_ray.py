"""Bench throughput in one process and on a local Ray cluster, side by side (a benchmark, not a test).

    python scripts/bench_ray.py [--workers 2] [--sets 2] [--seeds 0,1] [--methods merge,switch,composite]
                                [--profile tiny] [--out bench_ray.json]

Runs the same `localora bench` twice in fresh interpreters, each with its own empty render cache
(LOCALORA_HOME with the tiny models linked in, so nothing is served from the other's cache):
once in one process, once with `--ray local --workers N`. Prints rows per minute for each, the
ratio, and whether both stored the same rows and image bytes; writes all of it to --out as JSON.
Wall time includes starting the cluster and every worker's model load, as a user sees it. On a
machine with fewer cores than workers + 1 the Ray run is slower, not faster: each worker needs
its own core (or GPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = {"rowid", "renders", "cache_hits", "vlm_calls", "seconds", "session", "finished"}


def contents(out: Path) -> dict:
    with sqlite3.connect(out / "bench.sqlite") as conn:
        conn.row_factory = sqlite3.Row
        rows = {t: sorted(json.dumps({k: r[k] for k in r.keys() if k not in WORK}, sort_keys=True)
                          for r in conn.execute(f"SELECT rowid, * FROM {t}")) for t in ("results", "pairs")}
    images = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "images").rglob("*.png")}
    return {**rows, "images": images}


def bench(args: argparse.Namespace, out: Path, home: Path, shared: Path, extra: list[str]) -> tuple[float, int]:
    home.mkdir(parents=True)
    (home / "tiny").symlink_to(shared / "tiny", target_is_directory=True)
    env = {**os.environ, "LOCALORA_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", "localora", "bench", "--testbed", "tiny", "--elements", "2", "--limit", str(args.sets),
           "--seeds", args.seeds, "--methods", args.methods, "--profile", args.profile, "--out", str(out), "--json",
           *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds, json.loads(proc.stdout)["rows_made"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sets", type=int, default=2, help="the first K composition sets (the tiny testbed has 2 of 2 elements)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default="merge,switch,composite")
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--out", type=Path, default=Path("bench_ray.json"))
    args = ap.parse_args()
    shared = Path(os.environ.get("LOCALORA_HOME", Path.home() / ".cache" / "localora"))
    subprocess.run([sys.executable, "-c", "from localora import tiny; [tiny.ensure(n) for n in tiny.BUILDERS]"],
                   check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        single_s, rows = bench(args, tmp / "single", tmp / "home-single", shared, [])
        ray_s, ray_rows = bench(args, tmp / "ray", tmp / "home-ray", shared,
                                ["--ray", "local", "--workers", str(args.workers)])
        same = contents(tmp / "single") == contents(tmp / "ray")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "profile": args.profile, "methods": args.methods, "sets": args.sets, "seeds": args.seeds, "rows": rows,
        "cpus": os.cpu_count(), "workers": args.workers,
        "single": {"seconds": round(single_s, 2), "rows_per_minute": round(60 * rows / single_s, 2)},
        "ray": {"seconds": round(ray_s, 2), "rows_per_minute": round(60 * ray_rows / ray_s, 2)},
        "speedup": round(single_s / ray_s, 3), "same_rows_and_images": same,
    }
    print(f"{rows} rows ({args.methods}, {args.sets} sets x seeds {args.seeds}, profile {args.profile}, "
          f"{os.cpu_count()} CPUs)")
    print(f"  one process        {single_s:7.1f} s  {result['single']['rows_per_minute']:6.1f} rows/min")
    print(f"  ray, {args.workers} workers     {ray_s:7.1f} s  {result['ray']['rows_per_minute']:6.1f} rows/min")
    print(f"  speedup x{result['speedup']:.2f}; same rows and image bytes: {same}")
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
