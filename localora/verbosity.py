"""How much localora prints: one process-wide level, set once by the CLI group's -v/--quiet.

    QUIET    only result lines and errors (no progress, no notes)
    NORMAL   results, progress and notes; library warnings and logging below ERROR hidden
    VERBOSE  also library warnings and logging, and per-stage timings where a command has them

The library reads this module, never click: `hushed()` around a noisy library call, and
`quiet_libraries()` before loading models. Everything here imports nothing heavy.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

QUIET, NORMAL, VERBOSE = 0, 1, 2

_level = NORMAL


def set_level(level: int) -> None:
    global _level
    _level = level
    if level >= VERBOSE:
        # Library loggers' warnings reach stderr through a handler instead of Python's last resort.
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def level() -> int:
    return _level


def verbose() -> bool:
    return _level >= VERBOSE


def quiet() -> bool:
    return _level <= QUIET


@contextmanager
def hushed(*loggers: str) -> Iterator[None]:
    """Python warnings (and these loggers below ERROR) hidden inside the block, unless verbose."""
    if verbose():
        yield
        return
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, old in saved:
            logger.setLevel(old)


def quiet_libraries(diffusers: bool = True) -> None:
    """transformers' (and diffusers') logging at ERROR, WARNING when verbose; their progress bars
    off always, since they would garble the live view. Call only where those load anyway."""
    from transformers.utils import logging as tlog

    libs = [tlog]
    if diffusers:
        from diffusers.utils import logging as dlog

        libs.append(dlog)
    for lib in libs:
        lib.disable_progress_bar()
        if verbose():
            lib.set_verbosity_warning()
        else:
            lib.set_verbosity_error()
