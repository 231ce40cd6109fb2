"""What a bench shows while it works: one plain line per finished row, or a Rich progress bar.

    PlainProgress   bench: 3 rows to make, 0 already done        after the plan is checked, before any load
                            1/3 demo-character_demo-clothing seed 0 merge … (00:00)
                            model  loading diffusion (tiny-sdxl) … (00:00)
                    [00:11] 1/3 demo-character_demo-clothing seed 0 merge     CLIP-T -0.0460 ...
                            … VLM generating, 37 tokens (00:52)      after 10 quiet seconds

      A timed line "[mm:ss]" is a finished row, and only that (scripts count them); what is
      happening meanwhile is indented, with its time after it.
    LiveProgress    the same lines, scrolling above
                    ⠹ bench ━━━━━━ 1/3 0:00:11 ETA 0:00:01 <current step> · VLM generating, 37 tokens

Both follow localora.bench.runner.Progress: start(total, done), working(what), finished(line),
and what a compose run's view also takes (localora.runs.session.components): placement(p) for
model loads and moves, step(i, total) for denoising steps, generating(tokens, limit, done) for
the VLM. localora.cli.evaluate picks one (plain for pipes and --plain).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from localora.ui.activity import INDENT, Heartbeat, generating_phrase, placement_phrase, step_phrase
from localora.ui.live import describe_placement

if TYPE_CHECKING:
    from localora.devices import Placement

STARTING = "starting: reading the testbed (the tiny models are built on first use)"


class PlainProgress:
    """One line per finished row, for logs and pipes; the row being made and every model load as
    they start, and a heartbeat line when nothing was printed for a while."""

    def __init__(self, echo=print, clock: Callable[[], float] = time.monotonic):
        self.echo = echo
        self.clock = clock
        self.started = clock()
        self.heartbeat = Heartbeat(clock=clock)
        self.total = self.count = 0
        self.announced = False  # the row being made was printed

    def _print(self, text: str) -> None:
        self.echo(text)
        self.heartbeat.printed()

    def _time(self) -> str:
        m, s = divmod(int(self.clock() - self.started), 60)
        return f"{m:02d}:{s:02d}"

    def _note(self, text: str) -> None:
        self._print(f"{INDENT}{text} ({self._time()})")

    def _beat(self, phrase: str) -> None:
        if self.heartbeat.due():
            self._note(f"… {phrase}")

    def start(self, total: int, done: int) -> None:
        self.total = total
        self._print(f"bench: {total} rows to make, {done} already done")

    def working(self, what: str) -> None:
        if not self.announced:  # a row's first step: say which row, then stay quiet until it is done
            self.announced = True
            self._note(f"{self.count + 1}/{self.total} {what} …")
        else:
            self._beat(what)

    def finished(self, line: str) -> None:
        self.count += 1
        self.announced = False
        self._print(f"[{self._time()}] {self.count}/{self.total} {line}")

    def placement(self, p: Placement) -> None:
        self._note(describe_placement(p))

    def step(self, i: int, total: int) -> None:
        self._beat(step_phrase(i + 1, total))

    def generating(self, tokens: int, limit: int, done: bool) -> None:
        if not done:
            self._beat(generating_phrase(tokens, limit))

    def __enter__(self) -> PlainProgress:
        # No line yet: a bad argument is found while planning, and it must be the only line then.
        return self

    def __exit__(self, *exc) -> None:
        pass


class LiveProgress:
    """A Rich progress bar with a spinner, ETA and the current set / method (and what it waits for:
    a model load, the VLM's tokens, a denoising step); finished rows scroll above it."""

    def __init__(self, console=None):
        from rich import progress as rp

        self.bar = rp.Progress(rp.SpinnerColumn(), rp.TextColumn("[bold]bench"), rp.BarColumn(),
                               rp.MofNCompleteColumn(), rp.TimeElapsedColumn(), rp.TextColumn("ETA"),
                               rp.TimeRemainingColumn(), rp.TextColumn("{task.description}", markup=False),
                               console=console)
        self.task = None
        self.what = ""

    def _show(self, detail: str = "") -> None:
        self.bar.update(self.task, description=f"{self.what} · {detail}" if self.what and detail else detail or self.what)

    def start(self, total: int, done: int) -> None:
        self.bar.console.print(f"bench: {total} rows to make, {done} already done")
        self.bar.update(self.task, total=total)

    def working(self, what: str) -> None:
        self.what = what
        self._show()

    def finished(self, line: str) -> None:
        self.bar.console.print(line, markup=False, highlight=False)
        self.bar.advance(self.task)

    def placement(self, p: Placement) -> None:
        self._show("" if p.done else placement_phrase(p))

    def step(self, i: int, total: int) -> None:
        self._show(step_phrase(i + 1, total))

    def generating(self, tokens: int, limit: int, done: bool) -> None:
        self._show("" if done else generating_phrase(tokens, limit))

    def __enter__(self) -> LiveProgress:
        self.bar.start()
        # Before the plan is made the total is unknown: a pulsing bar and what is happening.
        self.task = self.bar.add_task(STARTING, total=None)
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()
