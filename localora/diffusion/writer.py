"""Writes render-cache files on one background thread, so the next denoise need not wait for them.

    writer = Writer(depth=4)            # at most 4 writes pending: submit() waits for a free place
    done = writer.submit(key, write)    # write() runs on the worker thread; a Future of it
    writer.wait(done)                   # its file is on disk, or its error is raised here
    writer.settled(key)                 # no write of `key` pending in this process, by any writer
    writer.flush()                      # every write done; the first error nobody saw is raised
    writer.close()                      # flush, then the thread ends (a later submit starts one)

    Writer(depth=0)                     # synchronous: submit() writes before it returns and
                                        # raises its error itself (what the renderer did before)

Pending writes are known process-wide by key, so a second Renderer on the same cache (a bench's,
a test's) waits for a file the first is still writing instead of rendering it again.

A write that fails is never lost: its error is raised at the first wait() of its Future, or else
at flush()/close(). Readers of a file (run folder copies, cache hits) wait for it first, and a
run records an image only after that wait, so a kill that drops pending writes leaves nothing on
record that is missing on disk (writes are atomic: no half file either).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

log = logging.getLogger(__name__)

# Every writer's writes not yet done, by key; a write removes itself when done.
_IN_FLIGHT: dict[str, Future] = {}
_IN_FLIGHT_LOCK = threading.Lock()


def _landed(key: str, future: Future) -> None:
    with _IN_FLIGHT_LOCK:
        if _IN_FLIGHT.get(key) is future:
            del _IN_FLIGHT[key]


class Writer:
    def __init__(self, depth: int = 4):
        self.depth = depth
        self._pool: ThreadPoolExecutor | None = None
        self._room = threading.BoundedSemaphore(max(depth, 1))  # bounds the images held in memory
        self._pending: dict[str, Future] = {}  # key -> its write, until waited on or flushed

    @property
    def background(self) -> bool:
        return self.depth > 0

    def submit(self, key: str, write: Callable[[], None]) -> Future:
        if not self.background:
            done: Future = Future()
            write()  # its error is raised here, as a synchronous write's always was
            done.set_result(None)
            return done
        self._room.acquire()  # waits while `depth` writes are pending
        try:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="localora-writer")
            future = self._pool.submit(write)
        except BaseException:
            self._room.release()
            raise
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT[key] = future
        future.add_done_callback(lambda f: (_landed(key, f), self._room.release()))
        self._pending[key] = future
        return future

    def settled(self, key: str) -> None:
        """Until no write of `key` is pending in this process. This writer's own raises its error
        here (as wait() does); another writer's error is left for that writer to raise, and the
        file is then simply not there."""
        with _IN_FLIGHT_LOCK:
            future = _IN_FLIGHT.get(key)
        if future is None:
            return
        if self._pending.get(key) is future:
            self.wait(future)
        else:
            futures_wait([future])

    def wait(self, future: Future | None) -> None:
        """Until `future`'s file is written; raises its error (once: flush() does not raise it again)."""
        if future is None:
            return
        for key, f in list(self._pending.items()):
            if f is future:
                del self._pending[key]
        future.result()

    def flush(self) -> None:
        """Wait for every pending write; raises the first error no wait() raised yet."""
        first: BaseException | None = None
        while self._pending:
            key, future = next(iter(self._pending.items()))
            del self._pending[key]
            error = future.exception()
            if error is not None and first is None:
                first = error
            elif error is not None:
                log.warning("render cache: another write failed too: %s", error)
        if first is not None:
            raise first

    def close(self) -> None:
        """flush(), then end the worker thread."""
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def settle(self, failing: bool) -> None:
        """close() at the end of a command: with an error already in flight (`failing`), a failed
        write is logged instead of raised, so the error shown stays the first one."""
        if not failing:
            self.close()
            return
        try:
            self.close()
        except Exception as e:  # the run's own error is the one to show
            log.warning("render cache: a pending write failed too: %s", e)
