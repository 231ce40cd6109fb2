"""What a person sees (issue 16): never a frozen screen, an ETA that counts model time, and a
report.html that shows scores, the reason for the pick, timings and model names."""

from __future__ import annotations

import pytest
from rich.console import Console

from localora.devices import Placement
from localora.ui.live import LiveUI, PlainUI
from localora.ui.progress import PlainProgress


class Clock:
    """A clock the test moves: heartbeats without sleeping."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def shown(ui: LiveUI) -> str:
    console = Console(record=True, width=120, force_terminal=True)
    console.print(ui.view())
    return console.export_text()


START = {"type": "start", "iterations": 1, "candidates": 2, "loras": ["a", "b"], "grid": 0}


def model(name: str, action: str, seconds: float) -> dict:
    return {"type": "model", "model": name, "action": action, "seconds": seconds, "bytes": 0, "memory": 0,
            "resident": [name], "detail": ""}


def render(step: str, seconds: float, role: str = "reference", cached: bool = False) -> dict:
    return {"type": "render", "id": step, "role": role, "iteration": None, "weights": {"a": 1.0, "b": 0.0},
            "key": step, "cached": cached, "image": f"images/{step}.png", "seconds": seconds}


# ------------------------------------------------------------------ the live view

def test_the_spinner_says_which_model_loads_then_the_vlm_tokens_then_the_step():
    ui = LiveUI(Console(record=True, width=120, force_terminal=True))
    ui.status("run runs/x, profile tiny")
    assert "run runs/x, profile tiny" in shown(ui)
    ui.event(START)
    ui.placement(Placement("vlm", "load", 0.0, 0, (), done=False, detail="tiny-qwen2-vl"))
    assert "loading vlm (tiny-qwen2-vl) …" in shown(ui)
    ui.placement(Placement("vlm", "load", 2.0, 0, ("vlm",), bytes=2**20))
    ui.generating(0, 121, False)
    ui.generating(37, 121, False)
    text = shown(ui)
    assert "VLM generating, 37 tokens (at most 121)" in text and "loading vlm" not in text
    ui.generating(40, 121, True)
    ui.step(2, 4)
    assert "rendering, step 3/4" in shown(ui)
    ui.step(3, 4)
    ui.event({"type": "done", "weights": {"a": 1.0, "b": 0.0}, "iteration": 1, "image": "x.png"})
    assert "rendering" not in shown(ui) and "working" not in shown(ui)  # finished: nothing spins


def test_the_eta_counts_each_models_first_load_once_and_recurring_moves_by_their_rate():
    ui = LiveUI(Console(record=True, width=120, force_terminal=True))
    ui.event(START)  # 2 references + start + 1 x (2 candidates + refined) = 6 renders; 3 VLM calls
    # The first render's 12 s hold the pipeline's 10 s load (the renderer acquires it inside).
    ui.event(model("diffusion", "load", 10.0))
    ui.event(render("ref/0", 12.0))
    # 5 renders and 3 calls at 2 s (no call timed yet), and clip and vlm still to load at 10 s each.
    assert ui.state.eta() == pytest.approx(5 * 2 + 3 * 2 + 2 * 10)
    assert "ETA 00:36" in shown(ui)
    ui.event(render("ref/1", 2.0, cached=True))  # from the cache: no time of its own to count
    assert ui.state.eta() == pytest.approx(4 * 2 + 3 * 2 + 2 * 10)
    # A VLM call: its 4 s exclude the VLM's load and the pipeline's offload before it (a 1 s move,
    # which recurs: 1 s per 3 renders or calls done so far, for the 7 left).
    ui.event(model("diffusion", "offload", 1.0))
    ui.event(model("vlm", "load", 6.0))
    ui.event({"type": "vlm", "id": "iter1/generate", "step": "generate", "value": [], "seconds": 4.0})
    recurring = 1.0 / 3 * (4 + 2)
    assert ui.state.eta() == pytest.approx(4 * 2 + 2 * 4 + recurring + 8.0)  # clip: the mean first load
    # Moving the pipeline back is inside the next render's seconds, and counted once, as a move.
    ui.event(model("diffusion", "to-device", 1.0))
    ui.event(render("iter1/cand1", 3.0, role="candidate"))
    assert ui.state.render_seconds == [2.0, 2.0]


def test_a_live_view_replaying_a_log_and_one_told_by_placements_agree():
    told, replayed = LiveUI(Console(record=True)), LiveUI(Console(record=True))
    for ui in (told, replayed):
        ui.event(START)
    told.placement(Placement("diffusion", "load", 0.0, 0, (), done=False))
    told.placement(Placement("diffusion", "load", 10.0, 0, ("diffusion",)))
    replayed.event(model("diffusion", "load", 10.0))
    for ui in (told, replayed):
        ui.event(render("ref/0", 12.0))
    assert told.state.eta() == replayed.state.eta()


# ------------------------------------------------------------------ the plain view

def test_plain_mode_prints_the_status_at_once_and_a_heartbeat_only_when_quiet():
    clock = Clock()
    console = Console(record=True, width=200)
    ui = PlainUI(console, clock=clock)
    ui.status("run runs/x, profile tiny (diffusion tiny-sdxl, vlm tiny-qwen2-vl, clip tiny-clip)")
    ui.generating(3, 121, False)  # nothing is quiet yet: no line
    clock.now += 11
    ui.generating(30, 121, False)
    ui.generating(31, 121, False)  # a line was just printed
    clock.now += 4
    ui.event(START)
    clock.now += 11
    ui.step(1, 4)
    ui.generating(99, 121, True)
    lines = console.export_text().splitlines()
    assert lines[0] == "localora: run runs/x, profile tiny (diffusion tiny-sdxl, vlm tiny-qwen2-vl, clip tiny-clip)"
    assert lines[1].strip() == "… VLM generating, 30 tokens (at most 121) (00:11)"
    assert lines[2].startswith("[00:15] start")
    assert lines[3].strip() == "… rendering, step 2/4 (00:26)"
    assert len(lines) == 4
    assert not lines[1].startswith("[")  # a heartbeat is no event: scripts counting events skip it


def test_bench_plain_progress_prints_each_row_and_model_load_as_it_starts():
    clock, lines = Clock(), []
    with PlainProgress(lines.append, clock=clock) as ui:
        assert lines == []  # a bad argument, found while planning, must be the only line
        ui.start(2, 0)
        ui.working("set-a seed 0 merge")
        ui.placement(Placement("diffusion", "load", 0.0, 0, (), done=False, detail="tiny-sdxl"))
        clock.now += 3
        ui.placement(Placement("diffusion", "load", 3.0, 0, ("diffusion",), detail="tiny-sdxl (float32)"))
        ui.working("set-a seed 0 reflect iter1/generate")  # the same row, not quiet for long: no line
        clock.now += 12
        ui.generating(5, 50, False)
        ui.finished("set-a seed 0 merge     CLIP-T 0.1000")
        ui.working("set-a seed 0 judge reflect vs merge")
    assert lines == [
        "bench: 2 rows to make, 0 already done",
        "        1/2 set-a seed 0 merge … (00:00)",
        "        model  loading diffusion (tiny-sdxl) … (00:00)",
        "        model  diffusion load in 3.00s  tiny-sdxl (float32) (00:03)",
        "        … VLM generating, 5 tokens (at most 50) (00:15)",
        "[00:15] 1/2 set-a seed 0 merge     CLIP-T 0.1000",
        "        2/2 set-a seed 0 judge reflect vs merge … (00:15)",
    ]
    # Only finished rows are timed lines: a script counting "[" lines counts rows (test_bench does).
    assert [ln for ln in lines if ln.startswith("[")] == ["[00:15] 1/2 set-a seed 0 merge     CLIP-T 0.1000"]


def test_the_views_import_no_torch():
    import subprocess
    import sys

    code = "import sys, localora.ui.live, localora.ui.progress; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]


# ------------------------------------------------------------------ the VLM's tokens

def test_the_vlm_reports_each_token_and_answers_exactly_as_without_a_listener(tmp_path):
    from PIL import Image

    from localora import profiles
    from localora.vlm import schemas
    from localora.vlm.model import VLM

    picture = tmp_path / "p.png"
    Image.new("RGB", (64, 64), "red").save(picture)
    vlm = VLM(profiles.load_profile("tiny").vlm)
    schema = schemas.feedback(40)
    quiet = vlm.chat("system", [picture], "Describe it.", schema=schema)
    heard: list[tuple[int, int, bool]] = []
    vlm.on_tokens = lambda n, limit, done: heard.append((n, limit, done))
    told = vlm.chat("system", [picture], "Describe it.", schema=schema)
    assert (told.text, told.value, told.new_tokens) == (quiet.text, quiet.value, quiet.new_tokens)
    budget = 4 * schema.max_chars + 1
    assert heard[0] == (0, budget, False) and heard[-1] == (told.new_tokens, budget, True)
    counts = [n for n, _, done in heard if not done]
    assert counts == sorted(counts) and counts[-1] >= told.new_tokens - 1
