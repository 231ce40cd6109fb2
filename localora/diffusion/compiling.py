"""--compile: torch.compile of the denoiser (the UNet or the transformer), where the pipeline loads.

    note = compiling.unavailable(device)       # why it cannot compile here ("" when it can)
    compiling.compile_denoiser(pipe, arch)     # pipe.unet / pipe.transformer compiled in place
    with compiling.counted(stats):             # stats.compiles / stats.compile_seconds += this block's
        ...                                    # compiles: the warm-up, apart from the render time
    with compiling.failures(): ...             # a failed compile: one error line, not a traceback

The module is compiled in place (nn.Module.compile), so it stays the same object: peft's
set_adapters, the per-row forward hooks (rows.py), block weights and `pipe.unet.device` work as
before, and the images equal the eager ones up to float rounding. Compiling is lazy: the first
denoiser call traces and compiles (the warm-up, seconds to minutes), and what the graph depends
on that changes later recompiles (dynamo's guards): a new batch size, other active adapters or
LoRA scales (set_adapters), hooks added or removed (Composite's per-row weights). Past dynamo's
recompile limit a call runs eagerly: slower, never wrong. The warm-up is timed by dynamo's
compile callbacks (torch._dynamo.callback.on_compile_start/end, documented in torch.compiler's
docs), one start and end per compiled frame, so RenderStats counts each compile and its seconds;
they are put back at each use, since torch.compiler.reset() clears them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from localora import archs

if TYPE_CHECKING:
    import torch


class CompileCounts(Protocol):
    compiles: int
    compile_seconds: float


@dataclass
class _Tally:
    """Every dynamo compile of this process since the callbacks were installed."""

    compiles: int = 0
    seconds: float = 0.0
    started: float | None = None


_tally = _Tally()
_lock = threading.Lock()
_used = False  # a denoiser was compiled in this process


def _start(args=None) -> None:
    _tally.started = time.perf_counter()


def _end(args=None) -> None:
    if _tally.started is not None:
        _tally.seconds += time.perf_counter() - _tally.started
        _tally.compiles += 1
        _tally.started = None


def _install() -> None:
    """Dynamo's compile callbacks, which add each compile's wall time to _tally. Checked at every
    use: torch._dynamo.reset() (torch.compiler.reset()) clears every callback."""
    try:  # documented (torch.compiler's "callbacks" page) but under torch._dynamo: may move
        from torch._dynamo.callback import callback_handler, on_compile_end, on_compile_start
    except ImportError:
        return  # compiling still works; its warm-up then stays inside the renders' seconds
    with _lock:
        if _start not in callback_handler.start_callbacks:
            on_compile_start(_start)
        if _end not in callback_handler.end_callbacks:
            on_compile_end(_end)


def unavailable(device: torch.device) -> str:
    """Why torch.compile's default backend (inductor) cannot build kernels for `device` here, or
    "": on a CPU it needs a C++ compiler ($CXX, else g++ / c++ / clang++ on PATH), on a GPU Triton."""
    if device.type == "cpu":
        names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(n) for n in names):
            return (f"no C++ compiler ({' / '.join(names)}) on PATH, which torch.compile needs on a CPU; "
                    f"install one (e.g. apt install g++) or drop --compile")
        return ""
    if importlib.util.find_spec("triton") is None:
        return f"Triton is not installed, which torch.compile needs on {device.type}; pip install triton or drop --compile"
    return ""


def compile_denoiser(pipe, arch: str) -> None:
    """Compile the pipeline's denoiser in place (lazily: at its first call)."""
    global _used
    _install()
    _used = True
    getattr(pipe, archs.arch(arch).denoiser).compile()


@contextmanager
def failures() -> Iterator[None]:
    """A compile that fails while rendering (inductor, a backend, dynamo itself) is one error line
    saying to render without --compile, not a torch traceback; other errors pass as they are."""
    from localora.errors import RuntimeFailure

    try:
        yield
    except Exception as e:
        if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
            raise
        root = e  # what the backend or dynamo itself raised, under dynamo's wrappers
        while root.__cause__ is not None:
            root = root.__cause__
        said = " ".join(str(root).split())[:300]
        raise RuntimeFailure(f"--compile: torch.compile failed while rendering ({type(root).__name__}: {said}); "
                             f"render without --compile") from None


@contextmanager
def counted(stats: CompileCounts) -> Iterator[None]:
    """Add the compiles that happen inside the block (and their seconds) to `stats`."""
    if _used:
        _install()
    compiles, seconds = _tally.compiles, _tally.seconds
    try:
        yield
    finally:
        stats.compiles += _tally.compiles - compiles
        stats.compile_seconds += _tally.seconds - seconds
