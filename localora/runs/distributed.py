"""compose --prompts FILE.jsonl --ray: a batch's lines on the workers of a Ray cluster.

    executor(address, profile, out, ...) -> batch.Execute    runs.batch.run's hook: lines out, results back
    ComposeWorker                                            a worker: the profile's models, loaded once,
                                                             for line after line

    driver (batch.run)                      workers (one per GPU, or per CPU slot)
      each line not done    -- item -->     batch.run_item in a scratch folder of its node
      DIR/<name>/, whole    <-- packed --   the line's finished run folder
      DIR/batch.json

Each line runs with batch.run_item, the code of the single-process batch, so its folder is the
one that batch would write. The driver alone writes DIR: a finished folder replaces what was
there only once it is whole, so a rerun skips the lines that are done. A line cut short (its
worker or the driver killed) resumes from its scratch folder when it comes back to that node.
A line whose work fails (NaN latents, ...) is marked failed and the others go on, as in one process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from localora import cluster
from localora.errors import RuntimeFailure
from localora.runs import batch


class _Silent:
    """A worker's view of its run: the driver reports lines as they finish."""

    def event(self, event: dict[str, Any]) -> None: ...
    def step(self, i: int, total: int) -> None: ...
    def placement(self, p: Any) -> None: ...
    def generating(self, tokens: int, limit: int, done: bool) -> None: ...


def batch_id(out: Path) -> str:
    return cluster.job_id(out, "compose")


class ComposeWorker:
    """One worker of a batch. Its constructor keeps the arguments; `ready()` sets it up; `run(item)`
    composes one line and returns its run folder, packed."""

    def __init__(self, profile: Any, shipped: cluster.Shipped, name: str, threads: int, images_per_batch: int):
        self.args = (cluster.worker_profile(profile), shipped, name, threads, images_per_batch)

    def ready(self) -> dict[str, Any]:
        import torch

        _, shipped, name, threads, _ = self.args
        torch.set_num_threads(threads)
        self.scratch = cluster.scratch_dir(name)
        self.log = cluster.log_dir(name) / f"worker-{os.getpid()}.jsonl"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        return {"node": socket.gethostname(), "pid": os.getpid(), "device": "cuda" if torch.cuda.is_available() else "cpu"}

    def run(self, item: batch.Item) -> tuple[str, bytes | str]:
        """("done", the packed folder) or ("failed", why) for a line whose work failed."""
        import ray

        profile, shipped, _, _, images_per_batch = self.args
        item = replace(item, cfg=replace(item.cfg, loras=tuple(cluster.local_lora(lo, shipped, ray)
                                                              for lo in item.cfg.loras)))
        folder = self.scratch / item.name
        try:
            summary = batch.run_item(item, folder, _Silent(), batch=images_per_batch, profile=profile)
        except RuntimeFailure as e:
            return "failed", str(e)
        with open(self.log, "a") as f:
            f.write(json.dumps({"line": item.line, "name": item.name, "renders": summary["renders"],
                                "finished": time.time()}) + "\n")
        data = cluster.pack(folder)
        shutil.rmtree(folder, ignore_errors=True)  # on its way to the driver, who keeps it
        return "done", data

    def clean(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def executor(address: str, profile: Any, out: Path, ui: Any, workers: int | None = None, worker_cpus: int = 1,
             images_per_batch: int = 0) -> batch.Execute:
    """batch.run's `execute` hook for a cluster: connects only when some line is left to do."""

    def execute(todo: list[tuple[batch.Item, Path]]) -> Iterator[tuple[batch.Item, Any]]:
        if not todo:
            return
        c = cluster.connect(address, profile, workers, worker_cpus)
        pool = None
        try:
            files = cluster.lora_files(lo for item, _ in todo for lo in item.cfg.loras)
            pool = c.pool(ComposeWorker, profile, cluster.ship_files(c.ray, files, c.nodes), batch_id(out),
                          worker_cpus, images_per_batch)
            if hasattr(ui, "status"):
                ui.status(f"{c.describe()}: {len(todo)} lines to compose")
            for item, _ in todo:
                pool.add(cluster.Task(("line", item.line), item))
            for task, (status, data) in pool.results():
                item = task.payload
                if status == "failed":
                    yield item, RuntimeFailure(data)
                    continue
                cluster.unpack(data, out / item.name)
                if hasattr(ui, "status"):
                    ui.status(f"batch: line {item.line} done ({pool.in_flight} in the making on {pool.workers} "
                              f"workers, {len(pool.queue)} waiting)")
                yield item, batch.finished(out / item.name)
            pool.broadcast("clean")
        finally:
            if pool is not None:
                pool.close()
            c.close()

    return execute
