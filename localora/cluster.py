"""Work spread over a Ray cluster: one worker (a Ray actor) per GPU, or per CPU slot for a
CPU profile, each holding its models for its whole life; the driver alone writes results.

    connect(address, profile, workers)  -> Cluster    checked: one error line for each of Ray not
                                                      installed, an address nobody answers, no GPU
    Cluster.pool(worker_class, *args)   -> Pool       the workers, started and told their share
    Pool.add(task) / Pool.results()                   tasks out to free workers, (task, result)
                                                      back as each finishes, in completion order
    ship_files / local_file / local_lora              LoRA files to nodes that do not have them
    job_id / scratch_dir / log_dir                    a job's name on every node, a worker's folders
    pack / unpack                                     a folder as bytes (a run folder to the driver)

A worker class is a plain class with `ready() -> dict` (sets it up, then says its node, pid and
device; its constructor only keeps its arguments, so a setup error arrives as the error it
is) and `run(payload) -> result`; `pool` wraps it in `ray.remote`. A task is given to
one free worker at a time, so a worker's models serve one task after another and never two at
once. When a worker dies (its process killed, its node lost), the task it held goes back to the
front of the queue for the next free worker and a replacement worker is started; a task that
has killed `retries + 1` workers is given up as a failure. An exception a task raises is not
retried: a LocaloraError keeps its message (prefixed by the node) and class, so the CLI prints
one line, and stops the whole job as it would in one process.

Ray is an optional dependency (`pip install "localora[ray]"`), imported only when a command is
given --ray: here, and in the workers (bench/distributed.py, runs/distributed.py).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import tarfile
import tempfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from localora import paths
from localora.errors import LocaloraError, MissingError, RuntimeFailure
from localora.files import file_hash, give_umask_mode, stable_hash

INSTALL = 'pip install "localora[ray]"'
DEFAULT_PORT = 6379  # `ray start --head` listens here unless told otherwise
CONNECT_TIMEOUT_S = 5.0  # Ray itself waits minutes on an address nobody answers
RETRIES = 2  # a task may kill this many workers and still be tried once more
LOCAL_OBJECT_STORE = 512 << 20  # a local cluster's shared memory: rows and PNGs, not weights


@dataclass(frozen=True)
class Task:
    key: tuple  # what the task makes, for messages and the caller's bookkeeping
    payload: Any  # what the worker's run() gets
    attempts: int = 0  # workers it has already died on


def import_ray():
    try:
        import ray
    except ImportError:
        raise MissingError(f"--ray needs Ray, which is not installed; install it with: {INSTALL}") from None
    return ray


def needs_gpu(profile: Any) -> bool:
    """Whether the profile's models are meant for a GPU: a cuda device named, or half precision
    (fp16 on a CPU is unusably slow, and some ops are missing there)."""
    device = str(profile.device)
    return device.startswith("cuda") or (device == "auto" and profile.diffusion.dtype != "float32")


def worker_profile(profile: Any) -> Any:
    """The profile as a worker runs it: Ray shows each worker its own GPU alone, as cuda:0, so a
    profile's cuda:N (the driver's numbering) becomes plain cuda."""
    from dataclasses import replace as with_field

    return with_field(profile, device="cuda") if str(profile.device).startswith("cuda:") else profile


def _check_reachable(address: str) -> None:
    """One line for an address nobody answers, in seconds rather than Ray's minutes of retries."""
    if address.startswith("ray://"):
        hostport, port = address[len("ray://"):], 10001
    else:
        hostport, port = address, DEFAULT_PORT
    host, _, given = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
    try:
        port = int(given) if given else port
    except ValueError:
        raise LocaloraError(f"--ray {address}: expected local, auto, HOST[:PORT] or ray://HOST[:PORT]") from None
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise LocaloraError(f"--ray {address}: no Ray cluster answers at {host}:{port} ({reason}); start one "
                            f"with `ray start --head` on that machine, or check the address (`ray status` "
                            f"there prints it)") from None


@dataclass
class Cluster:
    ray: Any  # the ray module
    address: str
    started: bool  # this process started the cluster ("local"), so it stops it at the end
    gpu: bool  # workers hold one GPU each
    workers: int
    cpus_per_worker: int
    nodes: int

    def pool(self, worker_class: type, *args: Any, retries: int = RETRIES) -> Pool:
        remote = self.ray.remote(num_gpus=1 if self.gpu else 0, num_cpus=self.cpus_per_worker,
                                 max_restarts=0, max_task_retries=0)(worker_class)
        return Pool(self.ray, lambda: remote.remote(*args), self.workers, retries)

    def describe(self) -> str:
        kind = "GPU" if self.gpu else f"CPU ({self.cpus_per_worker} core{'s' * (self.cpus_per_worker > 1)} each)"
        return (f"Ray cluster {self.address}: {self.nodes} node{'s' * (self.nodes > 1)}, {self.workers} "
                f"{kind} worker{'s' * (self.workers > 1)}")

    def close(self) -> None:
        self.ray.shutdown()  # a local cluster stops; a joined one only loses this driver and its workers


def connect(address: str, profile: Any, workers: int | None = None, cpus_per_worker: int = 1) -> Cluster:
    """Join or start the cluster for `--ray ADDRESS` and size the pool for `profile`.

    "local" starts a cluster of this machine alone; "auto" joins the one `ray start` runs here;
    anything else is the head's address. Workers: one per GPU the cluster has; with no GPU, one
    per `cpus_per_worker` CPUs (refused when the profile needs a GPU); `workers` caps it.
    """
    if (workers is not None and workers < 1) or cpus_per_worker < 1:
        raise ValueError(f"workers {workers} and cpus_per_worker {cpus_per_worker} must be at least 1")
    if address not in ("local", "auto"):
        _check_reachable(address)
    # Ray's C++ core logs each retry of a connection on stderr, a line a second; errors still show.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "error")
    ray = import_ray()
    # Workers' own output stays in Ray's logs (the driver shows rows); Ray's "started" notes too.
    options: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False, "logging_level": logging.WARNING}
    if address == "local":
        options.update(num_cpus=os.cpu_count() or 1, object_store_memory=LOCAL_OBJECT_STORE)
    try:
        ray.init(address=address, **options)
    except ConnectionError as e:
        hint = ("start one with `ray start --head`, or use --ray local for this machine alone" if address == "auto"
                else "check the address (`ray status` on the head prints it)")
        raise LocaloraError(f"--ray {address}: cannot join a Ray cluster ({str(e).splitlines()[0]}); {hint}") from None
    try:
        resources = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        gpus = int(resources.get("GPU", 0))
        where = "this machine" if address == "local" else f"the cluster at {address}"
        if gpus and str(profile.device) != "cpu":
            count = gpus
        elif needs_gpu(profile):
            raise LocaloraError(f"--ray {address}: {where} has no GPU, and profile {profile.name} needs one "
                                f"({profile.diffusion.name} in {profile.diffusion.dtype}); add GPU nodes "
                                f"(`ray start --address HEAD:{DEFAULT_PORT}` on each), or use a CPU profile")
        else:
            count = int(resources.get("CPU", 0)) // cpus_per_worker
            if count < 1:
                raise LocaloraError(f"--ray {address}: {where} has {resources.get('CPU', 0):g} CPUs, fewer than "
                                    f"--worker-cpus {cpus_per_worker}")
        count = min(count, workers) if workers else count
        return Cluster(ray, address, address == "local", bool(gpus) and str(profile.device) != "cpu", count,
                       cpus_per_worker, nodes)
    except BaseException:
        ray.shutdown()
        raise


# How long the driver waits for any worker before it asks Ray whether a node is still alive.
LIVENESS_S = 2.0


@dataclass
class _Worker:
    handle: Any
    info: dict[str, Any] = field(default_factory=dict)  # ready()'s answer: node, pid, device


class Pool:
    """Workers and the tasks queued for them; see the module docstring for the retry rules."""

    def __init__(self, ray: Any, start: Any, size: int, retries: int):
        self.ray = ray
        self._start = start
        self.retries = retries
        self.queue: deque[Task] = deque()
        self.free: list[_Worker] = []
        self.started: list[dict[str, Any]] = []  # every worker's ready() answer, replacements too
        self.replaced = 0
        self._starting: dict[Any, _Worker] = {}  # ready() ref -> a worker not ready yet
        self._busy: dict[Any, tuple[Task, _Worker]] = {}  # run() ref -> its task and worker
        for _ in range(size):
            self._spawn()

    def _spawn(self) -> None:
        worker = _Worker(self._start())
        self._starting[worker.handle.ready.remote()] = worker

    def add(self, task: Task, first: bool = False) -> None:
        """Queue a task; `first`: ahead of the queued ones."""
        if first:
            self.queue.appendleft(task)
        else:
            self.queue.append(task)

    def broadcast(self, method: str) -> list[Any]:
        """Call `method` on every free worker (all are, once results() is through) and wait."""
        return self.ray.get([getattr(w.handle, method).remote() for w in self.free])

    @property
    def in_flight(self) -> int:
        return len(self._busy)

    @property
    def workers(self) -> int:
        return len(self.free) + len(self._busy) + len(self._starting)

    def results(self) -> Iterator[tuple[Task, Any]]:
        """(task, result) for every task added, before or while iterating, as each finishes."""
        ray = self.ray
        while self.queue or self._busy:
            while self.queue and self.free:
                task, worker = self.queue.popleft(), self.free.pop()
                self._busy[worker.handle.run.remote(task.payload)] = (task, worker)
            if not self._busy and not self._starting:
                raise RuntimeFailure(f"every worker died; {len(self.queue)} tasks were not done. Finished work "
                                     f"is saved: rerun the same command to go on")
            done, _ = ray.wait([*self._busy, *self._starting], num_returns=1, timeout=LIVENESS_S)
            if not done:  # nothing finished for a while: a cluster without a live node would wait forever
                self._check_alive()
                continue
            ref = done[0]
            if ref in self._starting:
                worker = self._starting.pop(ref)
                try:
                    worker.info = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # its setup failed: a model missing there, ...
                    raise _failure(e, "a worker failed to start") from None
                except ray.exceptions.RayActorError as e:  # it died starting (killed, node lost)
                    if self.replaced >= self.retries * max(len(self.started), 1):
                        raise RuntimeFailure(f"workers keep dying as they start ({type(e).__name__}); see Ray's "
                                             f"logs (/tmp/ray/session_latest/logs on each node)") from None
                    self.replaced += 1
                    self._spawn()
                    continue
                self.started.append(worker.info)
                self.free.append(worker)
                continue
            task, worker = self._busy.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                raise _failure(e, f"{_where(worker)}: {task.key}") from None
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                    ray.exceptions.ObjectLostError) as e:
                self._lost(worker, task, e)
                continue
            self.free.append(worker)
            yield task, result

    def _check_alive(self) -> None:
        """One line when the cluster has no live node left (its raylet, or an agent it shares its
        fate with, was killed): Ray would keep a replacement worker pending for ever."""
        try:
            alive = sum(1 for n in self.ray.nodes() if n.get("Alive"))
        except Exception:  # the cluster's control store is gone too
            alive = 0
        if alive == 0:
            raise RuntimeFailure(f"the Ray cluster has no live node left (its raylet or a Ray agent process died); "
                                 f"{len(self.queue) + len(self._busy)} tasks were not done. Finished work is "
                                 f"saved: start the cluster again and rerun the same command to go on")

    def _lost(self, worker: _Worker, task: Task, error: Exception) -> None:
        """A worker died holding `task`: retry it on the next free worker, start a replacement."""
        if task.attempts >= self.retries:
            raise RuntimeFailure(f"{task.key} was tried on {task.attempts + 1} workers and each died (last "
                                 f"{_where(worker)}: {type(error).__name__}); finished work is saved, rerun to "
                                 f"go on") from None
        try:  # one only unreachable for now would hold its GPU and finish a row nobody reads
            self.ray.kill(worker.handle)
        except Exception:
            pass
        self.queue.appendleft(Task(task.key, task.payload, task.attempts + 1))
        self.replaced += 1
        self._spawn()

    def close(self) -> None:
        for worker in [*self.free, *(w for _, w in self._busy.values()), *self._starting.values()]:
            try:
                self.ray.kill(worker.handle)
            except Exception:  # already gone
                pass


def _where(worker: _Worker) -> str:
    info = worker.info
    return f"worker {info.get('node', '?')} pid {info.get('pid', '?')}"


def _failure(error: Exception, where: str) -> Exception:
    """A worker's exception for the driver: a LocaloraError keeps its class and message (one
    line, the node in front); anything else stays a bug, with the worker's traceback."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, LocaloraError):
        return type(cause)(f"{where}: {cause}")
    return error


# ---------------------------------------------------------------- files across nodes

@dataclass(frozen=True)
class Shipped:
    """Files of the driver's that workers on other nodes may lack, by content."""

    hashes: dict[str, str] = field(default_factory=dict)  # the driver's path -> sha256
    refs: dict[str, Any] = field(default_factory=dict)  # sha256 -> object ref of the bytes


def ship_files(ray: Any, files: list[Path], nodes: int) -> Shipped:
    """The files in Ray's object store, for workers on nodes that lack them (each node pulls
    what it asks for, once); on a one-node cluster every worker reads the driver's files."""
    if nodes <= 1:
        return Shipped()
    hashes = {str(p): file_hash(p) for p in dict.fromkeys(files)}
    return Shipped(hashes, {sha: ray.put(Path(p).read_bytes()) for p, sha in hashes.items()})


def local_file(path: Path, shipped: Shipped, ray: Any) -> Path:
    """`path` where this node has it with the driver's content, else the shipped bytes, written
    once into this node's LOCALORA_HOME by content, under the file's own name (metadata and
    A1111 tags name LoRAs by file name)."""
    sha = shipped.hashes.get(str(path))
    if sha is None or (path.is_file() and file_hash(path) == sha):
        return path
    target = paths.home() / "cluster" / "files" / sha / path.name
    if not (target.is_file() and file_hash(target) == sha):
        from localora.files import atomic_write

        data = ray.get(shipped.refs[sha])
        atomic_write(target, lambda p: p.write_bytes(data))
    return target


def local_lora(lora: Any, shipped: Shipped, ray: Any) -> Any:
    """A Lora whose file and reference images are this node's (local_file for each)."""
    return replace(lora, path=local_file(lora.path, shipped, ray),
                   references=tuple(local_file(r, shipped, ray) for r in lora.references))


def lora_files(loras: Any) -> list[Path]:
    """Every file a worker needs of these LoRAs: the weights and the reference images."""
    return [f for lo in loras for f in (lo.path, *lo.references)]


def job_id(out: Path, kind: str) -> str:
    """Names a job on every node (its scratch folder and logs): its kind, the driver's host and folder."""
    return stable_hash({"host": socket.gethostname(), "out": str(Path(out).resolve()), "kind": kind})[:16]


def scratch_dir(job: str) -> Path:
    """A worker's folder for job `job` on its node: what it makes before sending it to the driver."""
    return paths.home() / "cluster" / "work" / job


def log_dir(job: str, home: Path | None = None) -> Path:
    """Where the workers on a node with LOCALORA_HOME `home` log each task of job `job` they finished."""
    return (home or paths.home()) / "cluster" / "logs" / job


def pack(folder: Path) -> bytes:
    """A folder as an uncompressed tar (PNGs do not compress): the files a worker made, to the driver."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.name != ".lock":
                tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    return buf.getvalue()


def unpack(data: bytes, folder: Path) -> None:
    """Put a packed folder at `folder`, replacing what was there only once it is whole."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            tar.extractall(tmp, filter="data")  # "data": no absolute paths, links or devices from a worker
        give_umask_mode(tmp)  # mkdtemp makes it 0700: the driver's run folder gets the umask's modes
        old = folder.with_name(f".old-{folder.name}")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
