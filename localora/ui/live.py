"""What a compose run shows while it works: a Rich live view, or one plain line per event.

Both take the same calls: `event(dict)` for every run event, `step(i, total)` for denoising
steps, `placement(p)` for device moves. The live view keeps a small state from them and redraws.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from localora import events
from localora.devices import Placement


def _weights(w: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in w.items())


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def describe(event: dict[str, Any]) -> str:
    """One line for one event (the plain mode, and the live view's log line)."""
    kind = event.get("type")
    if kind == events.RENDER:
        how = "cache" if event.get("cached") else f"{event.get('seconds', 0):.2f}s"
        origin = f"  [{event['origin']}]" if event.get("origin", "vlm") != "vlm" else ""
        return f"render {event['id']:<16} {_weights(event['weights'])}  ({how}){origin}"
    if kind == events.VLM:
        value = event.get("value")
        shown = value if not isinstance(value, (dict, list)) else _short(value)
        return f"vlm    {event['id']:<16} -> {shown}  ({event.get('seconds', 0):.2f}s, {event.get('new_tokens', 0)} tokens)"
    if kind == events.SCORES:
        if "objective" in event:
            return f"score  {event['id']:<16} objective " + " ".join(f"{s:.3f}" for s in event["objective"])
        return f"score  {event['id']:<16} CLIP-T " + " ".join(f"{s:.3f}" for s in event["clip_t"])
    if kind == events.STATE:
        return f"{event['strategy']:<6} {event['id']:<16} {event['spent']}/{event['budget']} renders, best {event['best']:.3f}"
    if kind == events.FEWSHOT:
        how = "reused from library" if event.get("reused") else f"{len(event['scored'])} grid images scored"
        return f"fewshot {len(event['kept'])} examples kept ({how})"
    if kind == events.ITERATION:
        return f"--- iteration {event['iteration']}"
    if kind == events.START:
        return f"start  {len(event['loras'])} LoRAs, {event['iterations']} iterations x {event['candidates']} candidates"
    if kind == events.RESUME:
        return f"resume {event.get('completed', 0)} completed steps recalled"
    if kind == events.DONE:
        return f"done   final: round {event['iteration']}, {_weights(event['weights'])}"
    return str(event)


def describe_placement(p: Placement) -> str:
    """One line for a model being loaded or moved (before: "loading vlm …"), or done."""
    verb = {"load": "loading", "to-device": "moving to the accelerator", "offload": "offloading", "drop": "dropping"}
    if not p.done:
        return f"model  {verb.get(p.action, p.action)} {p.component} …"
    size = f", {p.bytes / 2**20:.1f} MiB" if p.bytes else ""
    detail = f"  {p.detail}" if p.detail else ""
    return f"model  {p.component} {p.action} in {p.seconds:.2f}s{size}{detail}"


def _short(value: Any, limit: int = 100) -> str:
    import json

    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class PlainUI:
    """One line per event, for logs and pipes."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.started = time.monotonic()

    def event(self, event: dict[str, Any]) -> None:
        self.console.print(f"[{_clock(time.monotonic() - self.started)}] {describe(event)}", markup=False, highlight=False)

    def step(self, i: int, total: int) -> None:
        pass

    def placement(self, p: Placement) -> None:
        self.console.print(f"[{_clock(time.monotonic() - self.started)}] {describe_placement(p)}", markup=False,
                           highlight=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


@dataclass
class _State:
    iterations: int = 0
    candidates: int = 0
    loras: int = 0
    grid: int = 0
    iteration: int = 0
    iterations_done: int = 0
    renders_done: int = 0
    grid_done: int = 0
    calls_done: int = 0
    score_label: str = "CLIP-T"  # or "objective", for a black-box strategy
    render_seconds: list[float] = field(default_factory=list)
    call_seconds: list[float] = field(default_factory=list)
    step: tuple[int, int] = (0, 0)
    table: list[tuple[dict[str, float], float | None]] = field(default_factory=list)
    feedback: str = ""
    holder: str = "-"
    memory: int = 0
    activity: str = ""  # a model being loaded or moved right now
    last: str = ""

    @property
    def renders_planned(self) -> int:
        return self.loras + self.grid + 1 + self.iterations * (self.candidates + 1)

    @property
    def calls_planned(self) -> int:
        return self.iterations * 3 + (1 if self.iterations > 1 else 0)

    def eta(self) -> float | None:
        if not self.render_seconds and not self.call_seconds:
            return None
        avg_r = sum(self.render_seconds) / len(self.render_seconds) if self.render_seconds else 0.0
        avg_c = sum(self.call_seconds) / len(self.call_seconds) if self.call_seconds else avg_r
        return (max(0, self.renders_planned - self.renders_done) * avg_r
                + max(0, self.calls_planned - self.calls_done) * avg_c)


class LiveUI:
    """The Rich live view: progress, the current candidates, the latest feedback, the GPU."""

    def __init__(self, console: Console | None = None):
        from rich.live import Live

        self.console = console or Console()
        self.state = _State()
        self.started = time.monotonic()
        self.live = Live(self.view(), console=self.console, refresh_per_second=8, transient=False)

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.live.update(self.view())
        self.live.__exit__(*exc)

    def event(self, event: dict[str, Any]) -> None:
        s = self.state
        kind = event.get("type")
        if kind == events.START:
            s.iterations, s.candidates = event["iterations"], event["candidates"]
            s.loras, s.grid = len(event["loras"]), event.get("grid", 0)
        elif kind == events.ITERATION:
            s.iteration = event["iteration"]
            s.table = []
        elif kind == events.RENDER:
            s.renders_done += 1
            s.grid_done += event.get("role") == "grid"
            s.iterations_done += event.get("role") == "refined"
            if not event.get("cached"):
                s.render_seconds.append(event.get("seconds", 0.0))
            if event.get("role") == "candidate":
                s.table.append((event["weights"], None))
        elif kind == events.RESUME:  # recalled steps are not replayed as events; count them here
            s.renders_done += event.get("renders", 0)
            s.calls_done += event.get("calls", 0)
            s.iterations_done += event.get("iterations_done", 0)
        elif kind == events.FEWSHOT and event.get("reused"):
            s.grid = 0
        elif kind == events.SCORES:
            s.score_label = "objective" if "objective" in event else "CLIP-T"
            s.table = list(zip(event["candidates"], event.get("objective") or event["clip_t"]))
        elif kind == events.STATE:  # a black-box round is done (they have no refined render)
            s.iterations_done = max(s.iterations_done, event["iteration"])
        elif kind == events.VLM:
            s.calls_done += 1
            s.call_seconds.append(event.get("seconds", 0.0))
            value = event.get("value")
            if isinstance(value, dict) and value.get("feedback"):
                s.feedback = value["feedback"]
        s.last = describe(event)
        self.live.update(self.view())

    def step(self, i: int, total: int) -> None:
        self.state.step = (i + 1, total)
        self.live.update(self.view())

    def placement(self, p: Placement) -> None:
        self.state.holder = ", ".join(p.resident) or "-"
        self.state.memory = p.memory_bytes
        self.state.activity = "" if p.done else describe_placement(p).removeprefix("model  ")
        if p.done:
            self.state.last = describe_placement(p)
        self.live.update(self.view())

    def view(self) -> Group:
        s = self.state
        bars = Table.grid(padding=(0, 1))
        bars.add_column(width=12)
        bars.add_column(width=40)
        bars.add_column()

        def bar(label: str, done: int, total: int) -> None:
            bars.add_row(label, ProgressBar(total=max(total, 1), completed=min(done, total)), f"{done}/{total}")

        if s.grid:
            bar("few-shot", s.grid_done, s.grid)
        bar("iterations", s.iterations_done, s.iterations)
        bar("renders", s.renders_done, s.renders_planned)
        bar("denoising", *s.step)
        title = f"iteration {s.iteration} candidates" if s.iteration else "candidates (from iteration 1)"
        cands = Table(title=title, expand=False, title_justify="left")
        cands.add_column("#", justify="right")
        cands.add_column("weights")
        cands.add_column(s.score_label, justify="right")
        for i, (w, score) in enumerate(s.table, 1):
            cands.add_row(str(i), _weights(w), "" if score is None else f"{score:.3f}")
        elapsed = time.monotonic() - self.started
        eta = s.eta()
        status = Text(f"GPU: {s.holder}  {s.memory / 2**30:.1f} GiB   elapsed {_clock(elapsed)}   "
                      f"ETA {'-' if eta is None else _clock(eta)}")
        parts = [bars, cands, Panel(s.feedback or "(no feedback yet)", title="latest feedback", expand=True), status]
        if s.activity:  # a load takes tens of seconds on a real card: show that something is happening
            parts.append(Spinner("dots", text=s.activity))
        return Group(*parts, Text(s.last, style="dim"))
