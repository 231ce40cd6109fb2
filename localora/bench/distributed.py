"""The bench on a Ray cluster: the rows `runner.run` makes, made by workers, stored by the driver.

    run(cfg, progress, address, workers, worker_cpus) -> runner.Summary
    BenchWorker    a worker (Ray actor): the plan's models, resident for its life; makes one row a task

    driver                                    workers (one per GPU, or per CPU slot)
      plan, store, runner.todo(...)
      each (set, seed, method)   -- task -->  runner._Runner.result in a scratch folder of its node
      files, then the row, one commit  <--    row + its image, its CLIP-I references, a search's
                                              run folder (packed)
      a pair, once both images are stored -->  runner._Runner.pair on the two PNGs sent with it
      store.add(pair + outcomes)      <--     row

The rows come from the runner's own code, so they are the single-process bench's rows: the same
seeds give the same images, byte for byte, and the same scores, verdicts and weights. Only the
work columns differ where work is shared differently: renders and cache hits (which worker's
cache saw a render first), VLM calls (a search resumed from its folder takes its finished steps
from the log), seconds and the session. The driver writes a row's files before
committing the row, so a stored row's files are always there; a killed driver leaves rows that
are whole, and a rerun makes only the rows that are not stored. A worker's unfinished search
resumes from its scratch folder when the task comes back to that node.

Each worker appends one line per finished task to LOCALORA_HOME/cluster/logs/BENCH/worker-PID.jsonl
on its node (what it made, its renders and cache hits, the bench session it worked for): what ran
where, and proof of what ran twice.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from localora import cluster
from localora.bench import runner
from localora.bench.plan import SEARCH_STRATEGY, BenchConfig, Case, Plan, plan, run_folder
from localora.bench.store import Store
from localora.files import atomic_write


@dataclass(frozen=True)
class Made:
    row: runner.Row
    files: dict[str, bytes]  # path in the bench folder -> bytes: the image, its CLIP-I references
    folders: dict[str, bytes]  # path in the bench folder -> a packed search run folder


class _Quiet:
    """A worker's progress: the driver shows rows as they arrive."""

    def start(self, total: int, done: int) -> None: ...
    def working(self, what: str) -> None: ...
    def finished(self, line: str) -> None: ...


def bench_id(out: Path) -> str:
    return cluster.job_id(out, "bench")


class BenchWorker:
    """One worker of a bench. Its constructor keeps the arguments; `ready()` builds the
    components (each model loads on first use and then stays); `run(task)` makes one row."""

    def __init__(self, p: Plan, session: int, shipped: cluster.Shipped, bench: str, threads: int):
        self.args = (p, session, shipped, bench, threads)

    def ready(self) -> dict[str, Any]:
        import ray
        import torch

        from localora.runs import session as sessions

        p, session, shipped, bench, threads = self.args
        torch.set_num_threads(threads)
        here = {i: cluster.local_lora(lo, shipped, ray) for i, lo in p.loras.items()}
        self.scratch = cluster.scratch_dir(bench)
        self.log = cluster.log_dir(bench) / f"worker-{os.getpid()}.jsonl"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.session = session
        p = replace(p, cfg=replace(p.cfg, out=self.scratch), loras=here, profile=cluster.worker_profile(p.profile))
        parts = sessions.components(p.profile)
        self.runner = runner._Runner(p, _Quiet(), parts.renderer, runner._CountingVLM(parts.vlm), parts.scorer,
                                     session, {})
        return {"node": socket.gethostname(), "pid": os.getpid(), "device": str(parts.devices.device)}

    def run(self, task: tuple) -> Made:
        from localora.files import open_image

        r, files, folders = self.runner, {}, {}
        if task[0] == "pair":
            _, case, method, base, a, b = task
            row = r.pair(case, method, base, *(open_image(Image.open(io.BytesIO(x))) for x in (a, b)))
        else:
            _, case, method = task
            row, _ = r.result(case, method)
            rels = [row.values["image"]] + [ref["image"] for refs in json.loads(row.values["clip_i_references"]).values()
                                            for ref in refs if ref["seed"] is not None]  # else the testbed's file
            files = {rel: (self.scratch / rel).read_bytes() for rel in rels}
            (self.scratch / rels[0]).unlink()  # a copy of a cache PNG: the bench folder keeps it
            if r.plan.variants[method].base in SEARCH_STRATEGY:
                folder = run_folder(self.scratch, case.set_id, case.seed, method)
                folders[str(folder.relative_to(self.scratch))] = cluster.pack(folder)
        with open(self.log, "a") as f:
            f.write(json.dumps({"row": [task[0], case.set_id, case.seed, *task[2:4 if task[0] == "pair" else 3]],
                                "renders": row.values.get("renders", 0), "cache_hits": row.values.get("cache_hits", 0),
                                "vlm_calls": row.values["vlm_calls"], "session": self.session,
                                "finished": time.time()}) + "\n")
        return Made(row, files, folders)

    def clean(self) -> None:
        """The bench is complete: its run folders are in the bench folder now."""
        shutil.rmtree(self.scratch, ignore_errors=True)


def _key(kind: str, case: Case, *methods: str) -> tuple:
    return (kind, case.set_id, case.seed, *methods)


def run(cfg: BenchConfig, progress: runner.Progress, address: str, workers: int | None = None,
        worker_cpus: int = 1) -> runner.Summary:
    """Make every row of the bench that is not stored yet, on the cluster at `address`."""
    p = plan(cfg)
    # The cluster is checked before the folder is made: a bench refused for want of a GPU
    # leaves no folder whose settings would then refuse the CPU profile it is rerun with.
    c = cluster.connect(address, p.profile, workers, worker_cpus)
    pool = None
    try:
        store = Store.create_or_open(cfg.out, p.settings())
        work = runner.todo(p, store)
        total, skipped = runner.counts(p, work)
        progress.start(total, skipped)
        if not work:
            return runner.Summary(0, skipped, 0, 0, 0)
        runner.check_templates(p, work)
        progress.working(c.describe() + "; starting the workers")
        files = cluster.lora_files(p.loras.values())
        pool = c.pool(BenchWorker, p, store.start_session(sys.argv[1:]), cluster.ship_files(c.ray, files, c.nodes),
                      bench_id(cfg.out), worker_cpus)
        return _drive(p, store, work, pool, progress, total, skipped)
    finally:
        if pool is not None:
            pool.close()
        c.close()


def _drive(p: Plan, store: Store, work: list[runner.Work], pool: cluster.Pool, progress: runner.Progress,
           total: int, skipped: int) -> runner.Summary:
    out = p.cfg.out
    have = {(r["set_id"], r["seed"], r["method"]): r for r in store.results()}
    waiting: dict[tuple, list[tuple[Case, str, str]]] = {}  # (set, seed) -> pairs whose images are not stored yet

    def queue_pairs(case: Case, pairs: list[tuple[str, str]]) -> None:
        for method, base in pairs:
            if all((case.set_id, case.seed, m) in have for m in (method, base)):
                images = [(out / have[(case.set_id, case.seed, m)]["image"]).read_bytes() for m in (method, base)]
                pool.add(cluster.Task(_key("pair", case, method, base), ("pair", case, method, base, *images)),
                         first=True)  # a case's pairs before new renders: each case completes early
            else:
                waiting.setdefault((case.set_id, case.seed), []).append((case, method, base))

    for w in work:
        for method in w.methods:
            pool.add(cluster.Task(_key("result", w.case, method), ("result", w.case, method)))
        queue_pairs(w.case, w.judged)
    renders = hits = calls = made = 0
    for task, result in pool.results():
        row = result.row
        for rel, data in result.files.items():
            target = out / rel
            if not (rel.startswith("images/references/") and target.is_file()):  # references: the same bytes
                atomic_write(target, lambda f, data=data: f.write_bytes(data))
        for rel, data in result.folders.items():
            cluster.unpack(data, out / rel)
        store.add(row.table, row.values, row.children)  # after its files: a stored row's files are there
        made += 1
        renders += row.values.get("renders", 0)
        hits += row.values.get("cache_hits", 0)
        calls += row.values["vlm_calls"]
        progress.finished(row.line)
        if row.table == "results":
            v = row.values
            have[(v["set_id"], v["seed"], v["method"])] = v
            ready = waiting.pop((v["set_id"], v["seed"]), [])
            if ready:
                queue_pairs(ready[0][0], [(m, b) for _, m, b in ready])
        if pool.in_flight:
            progress.working(f"{pool.in_flight} rows in the making on {pool.workers} workers")
    if made == total:
        pool.broadcast("clean")
    return runner.Summary(made, skipped, renders, hits, calls, retried=pool.replaced)
