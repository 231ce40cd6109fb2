"""What a bench shows while it works: one plain line per finished row, or a Rich progress bar.

    PlainProgress   bench: 3 rows to make, 0 already done
                    [00:11] 1/3 demo-character_demo-clothing seed 0 merge     CLIP-T -0.0460 ...
    LiveProgress    the same lines, scrolling above   bench ━━━━━━ 1/3 0:00:11 ETA 0:00:01 <current step>

Both follow localora.bench.runner.Progress: start(total, done), working(what), finished(line);
localora.cli.evaluate picks one (plain for pipes and --plain).
"""

from __future__ import annotations

import time


class PlainProgress:
    """One line per finished row, for logs and pipes."""

    def __init__(self, echo=print):
        self.echo = echo
        self.started = time.monotonic()
        self.total = self.count = 0

    def start(self, total: int, done: int) -> None:
        self.total = total
        self.echo(f"bench: {total} rows to make, {done} already done")

    def working(self, what: str) -> None:
        pass

    def finished(self, line: str) -> None:
        self.count += 1
        m, s = divmod(int(time.monotonic() - self.started), 60)
        self.echo(f"[{m:02d}:{s:02d}] {self.count}/{self.total} {line}")

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        pass


class LiveProgress:
    """A Rich progress bar with ETA and the current set / method; finished rows scroll above it."""

    def __init__(self, console=None):
        from rich import progress as rp

        self.bar = rp.Progress(rp.TextColumn("[bold]bench"), rp.BarColumn(), rp.MofNCompleteColumn(),
                               rp.TimeElapsedColumn(), rp.TextColumn("ETA"), rp.TimeRemainingColumn(),
                               rp.TextColumn("{task.description}"), console=console)
        self.task = None

    def start(self, total: int, done: int) -> None:
        self.bar.console.print(f"bench: {total} rows to make, {done} already done")
        self.task = self.bar.add_task("", total=total)

    def working(self, what: str) -> None:
        self.bar.update(self.task, description=what)

    def finished(self, line: str) -> None:
        self.bar.console.print(line, markup=False, highlight=False)
        self.bar.advance(self.task)

    def __enter__(self) -> LiveProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()
