"""What a compose run shows while it works: a Rich live view, or one plain line per event.

    LiveUI     (a tiny profile: a note that its weights are random)
               few-shot ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 9/9
               iterations ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 1/2
               images   ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 12/21   (every image, cached ones too)
               ...  the current candidates, the latest feedback
               GPU: diffusion, clip  1.2 GiB   elapsed 00:41   ETA 00:37   (CPU: diffusion, clip)
               ⠹ VLM generating, 37 tokens (at most 2405)      always something moving
    PlainUI    localora: run runs/x, profile tiny: ...            at once, before any model loads
               [00:00] start  3 LoRAs, 2 iterations x 3 candidates
               [00:00] model  loading diffusion (tiny-sdxl) …
                       … rendering, step 3/4                  a heartbeat after 10 quiet seconds

Both take the same calls: `event(dict)` for every run event, `status(text)` for what the run is
doing before its first event, `step(i, total)` for denoising steps, `generating(tokens, limit,
done)` for the VLM's tokens and `placement(p)` for device moves. The live view keeps a small
state from them; Rich redraws it 8 times a second, so the spinner and the clocks move even while
nothing reports. The ETA counts model loads and moves apart from render and VLM time (_State.eta).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from localora import events
from localora.ui.activity import INDENT, Heartbeat, generating_phrase, placement_phrase, step_phrase

if TYPE_CHECKING:  # devices imports torch; the view must be able to start before torch loads
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
    if kind == events.MODEL:
        return _model_line(event["model"], event["action"], event.get("seconds", 0.0), event.get("bytes", 0),
                           event.get("detail", ""))
    return str(event)


def _model_line(component: str, action: str, seconds: float, size: int, detail: str) -> str:
    mib = f", {size / 2**20:.1f} MiB" if size else ""
    return f"model  {component} {action} in {seconds:.2f}s{mib}" + (f"  {detail}" if detail else "")


def describe_placement(p: Placement) -> str:
    """One line for a model being loaded or moved (before: "loading vlm (name) …"), or done."""
    if not p.done:
        return f"model  {placement_phrase(p)}"
    return _model_line(p.component, p.action, p.seconds, p.bytes, p.detail)


def _short(value: Any, limit: int = 100) -> str:
    import json

    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class PlainUI:
    """One line per event, for logs and pipes; a heartbeat line when a step is quiet for long."""

    def __init__(self, console: Console | None = None, clock: Callable[[], float] = time.monotonic, note: str = ""):
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.clock = clock
        self.started = clock()
        self.heartbeat = Heartbeat(clock=clock)
        self.note = note  # e.g. tiny.NOTE: printed first, so the noise below is not taken for a fault

    def _print(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)
        self.heartbeat.printed()

    def _timed(self, text: str) -> None:
        self._print(f"[{_clock(self.clock() - self.started)}] {text}")

    def _beat(self, phrase: str) -> None:
        if self.heartbeat.due():
            self._print(f"{INDENT}… {phrase} ({_clock(self.clock() - self.started)})")

    def event(self, event: dict[str, Any]) -> None:
        self._timed(describe(event))

    def status(self, text: str) -> None:
        """A line with no clock: what the run is about to do, printed before anything is loaded."""
        self._print(f"localora: {text}")

    def step(self, i: int, total: int) -> None:
        self._beat(step_phrase(i + 1, total))

    def generating(self, tokens: int, limit: int, done: bool) -> None:
        if not done:
            self._beat(generating_phrase(tokens, limit))

    def placement(self, p: Placement) -> None:
        self._timed(describe_placement(p))

    def __enter__(self):
        if self.note:
            self._print(f"note: {self.note}")
        return self

    def __exit__(self, *exc) -> None:
        pass


# The models a compose run loads, for the ETA of those not loaded yet (the VLM only if it is asked).
MODELS = ("diffusion", "clip", "vlm")


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
    render_seconds: list[float] = field(default_factory=list)  # denoising only, model time taken out
    call_seconds: list[float] = field(default_factory=list)
    first_loads: dict[str, float] = field(default_factory=dict)  # model -> seconds of its first load
    model_overhead: float = 0.0  # seconds of moves, offloads, drops and loads again, which recur
    model_pending: float = 0.0  # model seconds since the last event: inside the next render's seconds
    step: tuple[int, int] = (0, 0)
    table: list[tuple[dict[str, float], float | None]] = field(default_factory=list)
    feedback: str = ""
    holder: str = "-"
    memory: int = 0
    device: str = ""  # the models' device type, once a placement said it
    table_title: str = "candidates (from iteration 1)"
    activity: str = ""  # a model being loaded or moved right now
    tokens: tuple[int, int] | None = None  # the VLM's answer being decoded: tokens so far, at most
    status: str = "starting …"  # what the run does when nothing else reports
    finished: bool = False
    last: str = ""

    @property
    def renders_planned(self) -> int:
        return self.loras + self.grid + 1 + self.iterations * (self.candidates + 1)

    @property
    def calls_planned(self) -> int:
        return self.iterations * 3 + (1 if self.iterations > 1 else 0)

    def model(self, component: str, action: str, seconds: float) -> None:
        """A finished load or move. A model's first load happens once; everything else may recur."""
        if action == "load" and component not in self.first_loads:
            self.first_loads[component] = seconds
        else:
            self.model_overhead += seconds
        self.model_pending += seconds

    def rendered(self, seconds: float) -> None:
        """An image denoised in `seconds`. The renderer's time includes acquiring the pipeline
        (loading or moving it, and what it evicts), which the model events already count: take it
        out, so the first render's load is not charged to every render after it. A batch reports
        its time shared by its images, so what is left is taken from the next ones."""
        taken = min(self.model_pending, seconds)
        self.model_pending -= taken
        self.render_seconds.append(seconds - taken)

    def eta(self) -> float | None:
        """Seconds left: renders and VLM calls at their mean time so far, plus model time, i.e. the
        first load of each model not loaded yet (at the mean first load so far) and the recurring
        moves at their rate per render or call so far."""
        if not self.render_seconds and not self.call_seconds:
            return None
        avg_r = sum(self.render_seconds) / len(self.render_seconds) if self.render_seconds else 0.0
        avg_c = sum(self.call_seconds) / len(self.call_seconds) if self.call_seconds else avg_r
        renders_left = max(0, self.renders_planned - self.renders_done)
        calls_left = max(0, self.calls_planned - self.calls_done)
        done = self.renders_done + self.calls_done
        recurring = self.model_overhead / done * (renders_left + calls_left) if done else 0.0
        needed = [m for m in MODELS if m != "vlm" or calls_left]
        unloaded = [m for m in needed if m not in self.first_loads]
        loads = sum(self.first_loads.values()) / len(self.first_loads) * len(unloaded) if self.first_loads else 0.0
        return renders_left * avg_r + calls_left * avg_c + recurring + loads

    def doing(self) -> str:
        """What is happening now, for the spinner."""
        if self.activity:
            return self.activity
        if self.tokens is not None:
            return generating_phrase(*self.tokens)
        if self.step[1] and self.step[0] < self.step[1]:
            return step_phrase(*self.step)
        return self.status


class LiveUI:
    """The Rich live view: progress, the current candidates, the latest feedback, the GPU, and a
    spinner saying what is happening."""

    def __init__(self, console: Console | None = None, clock: Callable[[], float] = time.monotonic, note: str = ""):
        from rich.live import Live

        self.console = console or Console()
        self.state = _State()
        self.clock = clock
        self.started = clock()
        self.note = note  # e.g. tiny.NOTE, shown above everything
        # One spinner for the whole run: a Spinner draws its frame from the time since its first
        # render, so a new one per refresh would show its first frame for ever.
        self.spinner = Spinner("dots")
        # get_renderable: every refresh draws the current state, so the spinner and the clocks
        # move while a model loads or the VLM decodes, and a token costs an assignment, no redraw.
        self.live = Live(console=self.console, refresh_per_second=8, transient=False, get_renderable=self.view)

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.state.finished = True
        self.live.refresh()
        self.live.__exit__(*exc)

    def event(self, event: dict[str, Any]) -> None:
        s = self.state
        kind = event.get("type")
        s.tokens = None
        s.status = "working …"
        if kind == events.START:
            s.iterations, s.candidates = event["iterations"], event["candidates"]
            s.loras, s.grid = len(event["loras"]), event.get("grid", 0)
        elif kind == events.ITERATION:
            s.iteration = event["iteration"]
            s.table = []
            s.table_title = f"iteration {s.iteration} candidates"
        elif kind == events.RENDER:
            s.renders_done += 1
            s.grid_done += event.get("role") == "grid"
            s.iterations_done += event.get("role") == "refined"
            if not event.get("cached"):
                s.rendered(event.get("seconds", 0.0))
            if event.get("role") == "candidate":
                s.table = [*s.table, (event["weights"], None)]
        elif kind == events.MODEL:  # a replayed log; a live run reports these through placement()
            s.model(event["model"], event["action"], event.get("seconds", 0.0))
        elif kind == events.RESUME:  # recalled steps are not replayed as events; count them here
            s.renders_done += event.get("renders", 0)
            s.calls_done += event.get("calls", 0)
            s.iterations_done += event.get("iterations_done", 0)
        elif kind == events.FEWSHOT and event.get("reused"):
            s.grid = 0
        elif kind == events.SCORES:
            s.score_label = "objective" if "objective" in event else "CLIP-T"
            s.table = list(zip(event["candidates"], event.get("objective") or event["clip_t"]))
            if event.get("id") == events.FINAL_SCORES:  # the refined image of each round, not candidates
                s.table_title = "refined picks (one per iteration)"
        elif kind == events.STATE:  # a black-box round is done (they have no refined render)
            s.iterations_done = max(s.iterations_done, event["iteration"])
        elif kind == events.VLM:
            s.calls_done += 1
            s.call_seconds.append(event.get("seconds", 0.0))
            value = event.get("value")
            if isinstance(value, dict) and value.get("feedback"):
                s.feedback = value["feedback"]
        elif kind == events.DONE:
            s.finished = True
        if kind not in (events.RENDER, events.MODEL):
            s.model_pending = 0.0  # model time before a VLM call or a score is in no render's seconds
        s.last = describe(event)

    def status(self, text: str) -> None:
        self.state.status = text

    def step(self, i: int, total: int) -> None:
        self.state.step = (i + 1, total)

    def generating(self, tokens: int, limit: int, done: bool) -> None:
        self.state.tokens = None if done else (tokens, limit)

    def placement(self, p: Placement) -> None:
        s = self.state
        s.holder = ", ".join(p.resident) or "-"
        s.memory = p.memory_bytes
        s.device = p.device or s.device
        s.activity = "" if p.done else placement_phrase(p)
        if p.done:
            s.model(p.component, p.action, p.seconds)
            s.last = describe_placement(p)

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
        bar("images", s.renders_done, s.renders_planned)
        if s.step[1]:  # a run served from the cache denoises nothing: no "0/0" bar
            bar("denoising", *s.step)
        cands = Table(title=s.table_title, expand=False, title_justify="left")
        cands.add_column("#", justify="right")
        cands.add_column("weights")
        cands.add_column(s.score_label, justify="right")
        for i, (w, score) in enumerate(list(s.table), 1):
            cands.add_row(str(i), _weights(w), "" if score is None else f"{score:.3f}")
        elapsed = self.clock() - self.started
        eta = s.eta()
        # On the CPU nothing is "on the GPU" and accelerator memory is meaningless.
        where = {"": f"models: {s.holder}", "cpu": f"CPU: {s.holder}"}.get(
            s.device, f"GPU: {s.holder}  {s.memory / 2**30:.1f} GiB")
        status = Text(f"{where}   elapsed {_clock(elapsed)}   ETA {'-' if eta is None else _clock(eta)}")
        parts = [bars, cands, Panel(s.feedback or "(no feedback yet)", title="latest feedback", expand=True), status]
        if self.note:
            parts.insert(0, Text(self.note, style="bold yellow"))
        if not s.finished:  # a load takes tens of seconds on a real card: show that something is happening
            self.spinner.update(text=s.doing())
            parts.append(self.spinner)
        return Group(*parts, Text(s.last, style="dim"))
