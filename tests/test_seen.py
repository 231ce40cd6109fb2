"""What a person sees (issue 16): never a frozen screen, an ETA that counts model time, and a
report.html that shows scores, the reason for the pick, timings and model names."""

from __future__ import annotations

import pytest
from rich.console import Console

from localora import tiny
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

def frames(ui: LiveUI, clock: Clock, times: list[float]) -> list[str]:
    """The view as a terminal shows it at each time (the console's clock is the test's)."""
    out = []
    for t in times:
        clock.now = t
        console = Console(record=True, width=120, force_terminal=True, get_time=clock)
        console.print(ui.view())
        out.append(console.export_text())
    return out


def test_the_live_view_over_time_spins_and_says_only_what_is_true():
    """Issue 27 item 8: the spinner drew only its first frame (a new Spinner every refresh), a
    cached run showed "denoising 0/0", a CPU-only run "GPU: vlm, clip 0.0 GiB", and the last table
    kept the title "iteration 2 candidates" over the refined picks."""
    clock = Clock()
    ui = LiveUI(Console(record=True, width=120, force_terminal=True), clock=clock, note="tiny profile: random")
    ui.event({**START, "iterations": 2})
    ui.placement(Placement("vlm", "load", 0.0, 0, (), done=False, detail="tiny-qwen2-vl", device="cpu"))
    shots = frames(ui, clock, [100.0, 100.1, 100.2, 100.3])
    spinner = [next(ln for ln in f.splitlines() if "loading vlm" in ln).split("loading")[0] for f in shots]
    assert len(set(spinner)) == 4, spinner  # a new frame each time the view is drawn later
    ui.placement(Placement("vlm", "load", 1.0, 0, ("vlm", "clip"), bytes=2**20, device="cpu"))
    for step in ("ref/0", "ref/1", "start"):
        ui.event(render(step, 0.0, cached=True))  # every image from the cache: no step is ever reported
    ui.event({"type": "iteration", "iteration": 2})
    ui.event({"type": "scores", "id": "iter2/scores", "candidates": [{"a": 0.5, "b": 0.5}], "clip_t": [0.3]})
    text = frames(ui, clock, [101.0])[0]
    assert text.splitlines()[0] == "tiny profile: random"  # the note above everything
    assert "denoising" not in text and "0/0" not in text
    assert "CPU: vlm, clip" in text and "GPU" not in text and "GiB" not in text
    assert "iteration 2 candidates" in text and "images" in text and "3/" in text
    ui.event({"type": "scores", "id": "final/scores", "candidates": [{"a": 0.5, "b": 0.5}, {"a": 1.0, "b": 0.0}],
              "images": ["images/iter1/refined.png", "images/iter2/refined.png"], "objective": [0.8, 0.7]})
    text = frames(ui, clock, [102.0])[0]
    assert "refined picks (one per iteration)" in text and "iteration 2 candidates" not in text
    # A card reports its memory.
    ui.placement(Placement("clip", "to-device", 0.1, 3 * 2**29, ("clip",), device="cuda"))
    assert "GPU: clip  1.5 GiB" in frames(ui, clock, [103.0])[0]


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


# ------------------------------------------------------------------ report.html, from a run folder's events

def _run_folder(tmp_path, select_value):
    """A finished two-round run folder written by hand: report.html reads only the folder."""
    from PIL import Image

    from localora.runs.folder import RunFolder

    names = ["hero", "style"]
    spec = {"diffusion": {"name": "tiny-sdxl", "source": "tiny:sdxl"},
            "vlm": {"name": "tiny-qwen2-vl", "source": "tiny:qwen2-vl", "quantization": "nf4"},
            "clip": {"name": "tiny-clip", "source": "tiny:clip"}}
    config = {"prompt": "a hero", "iterations": 2, "candidates": 1, "bounds": [0.0, 1.5], "method": "merge",
              "sampling": {"seed": 0},
              "loras": [{"name": n, "category": "style", "triggers": n, "path": f"/l/{n}.safetensors"} for n in names]}
    run = RunFolder.create(tmp_path / "run", {"config": config, "profile": "tiny", "profile_spec": spec})
    images = {}
    for k, step in enumerate(["ref/0", "ref/1", "start", "iter1/cand1", "iter1/refined", "iter2/cand1",
                              "iter2/refined"]):
        images[step] = f"images/{k}.png"
        Image.new("RGB", (8, 8), (k * 30, 0, 0)).save(run.path / images[step])
    w = {"hero": 1.0, "style": 1.0}

    def render(step, role, seconds, r=None, cached=False):
        run.log({"type": "render", "id": step, "role": role, "iteration": r, "weights": w, "key": step,
                 "cached": cached, "image": images[step], "seconds": seconds})

    def vlm(step, kind, value, seconds):
        run.log({"type": "vlm", "id": step, "step": kind, "system": "s", "prompt": "p", "images": [], "raw": "",
                 "value": value, "seconds": seconds, "prompt_tokens": 1, "new_tokens": 1})

    run.log({"type": "start", "iterations": 2, "candidates": 1, "loras": names, "grid": 0})
    run.log(model("diffusion", "load", 10.0) | {"bytes": 2**21, "detail": "tiny-sdxl (float32)"})
    render("ref/0", "reference", 12.0)
    render("ref/1", "reference", 2.0)
    render("start", "start", 2.0)
    for r in (1, 2):
        run.log({"type": "iteration", "iteration": r})
        if r == 1:
            run.log(model("vlm", "load", 3.0) | {"detail": "tiny-qwen2-vl (nf4, float32)"})
        vlm(f"iter{r}/generate", "generate", [w], 1.0)
        render(f"iter{r}/cand1", "candidate", 1.5, r)
        run.log({"type": "scores", "id": f"iter{r}/scores", "iteration": r, "candidates": [w],
                 "images": [images[f"iter{r}/cand1"]], "clip_t": [0.25 + r]})
        vlm(f"iter{r}/feedback", "feedback", {"feedback": "more red"}, 2.0)
        vlm(f"iter{r}/refine", "refine", {"feedback": "so", "weights": w}, 2.0)
        render(f"iter{r}/refined", "refined", 1.5, r, cached=r == 2)
    refined = [images["iter1/refined"], images["iter2/refined"]]
    run.log({"type": "scores", "id": "final/scores", "iteration": None, "candidates": [w, w], "images": refined,
             "clip_t": [0.125, 0.375], "clip_i": [0.5, 0.625], "objective": [0.625, 1.0]})
    vlm("select", "select", select_value, 1.0)
    run.log({"type": "done", "weights": w, "iteration": 2, "image": refined[1]})
    run.copy(refined[1], "final.png")
    run.write_json("final.json", {"weights": w, "iteration": 2, "image": refined[1]})
    return run


def test_the_report_scores_refined_and_final_images_and_says_why_the_pick(tmp_path):
    from localora.runs import report

    page = report.build(_run_folder(tmp_path, {"reason": "the red hero & the style both show", "choice": 2}))
    assert "<b>Scores:</b> CLIP-T 0.375, CLIP-I 0.625, objective 1.000" in page  # the final pick
    assert "refined: hero=1.00, style=1.00; CLIP-T 0.125, CLIP-I 0.500, objective 0.625" in page
    assert "refined: hero=1.00, style=1.00; CLIP-T 0.375, CLIP-I 0.625, objective 1.000" in page
    assert "Why this one:</b> The VLM picked it among the refined images: \u201cthe red hero &amp; the style both show\u201d" in page


def test_a_run_made_before_reasons_says_its_pick_has_none(tmp_path):
    from localora.runs import report

    page = report.build(_run_folder(tmp_path, 2))
    assert "answer has no reason: it was made by a localora that asked for the number only" in page


def test_the_report_names_every_model_and_times_each_stage_counting_nothing_twice(tmp_path):
    from localora.runs import report
    from localora.runs.folder import RunFolder

    run = _run_folder(tmp_path, {"reason": "r", "choice": 1})
    page = report.build(run)
    for cell in ("<td>tiny-sdxl</td><td>tiny:sdxl</td><td>tiny-sdxl (float32)</td><td>2.0 MiB</td><td>10.00 s</td>",
                 "<td>tiny-qwen2-vl</td>", "<td>tiny-clip</td><td>tiny:clip</td><td></td><td>-</td><td>not loaded</td>"):
        assert cell in page
    stages = report.stage_times(RunFolder.open(run.path, write=False).events())
    assert list(stages) == ["each LoRA alone", "start weights", "iteration 1", "iteration 2", "final pick"]
    refs = stages["each LoRA alone"]
    # ref/0's 12 s held the pipeline's 10 s load: 2 s denoising, and the load counted once, as model time.
    assert (refs.renders, refs.render_s, refs.model_s) == (2, 4.0, 10.0)
    one, two = stages["iteration 1"], stages["iteration 2"]
    assert (one.calls, one.vlm_s, one.model_s, one.render_s) == (3, 5.0, 3.0, 3.0)  # the VLM's load is before its call
    assert (two.renders, two.cached, two.render_s) == (1, 1, 1.5)
    assert sum(s.total for s in stages.values()) == 4 + 10 + 2 + (5 + 3 + 3) + (5 + 1.5) + 1
    assert "<tr><td>all</td><td>6 (1)</td>" in page


def test_lines_of_equal_weight_are_told_apart_by_marker_dash_and_a_small_x_offset():
    from localora.runs.report import weight_series

    rounds = [{"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 0.5, "b": 0.5, "c": 0.8}]
    lines = weight_series(rounds)
    assert [line.ys for line in lines] == [[1.0, 0.5], [1.0, 0.5], [1.0, 0.8]]  # the values drawn are exact
    assert len({line.marker for line in lines}) == 3 and len({line.dash for line in lines}) == 3
    assert len({line.xs[0] for line in lines}) == 3 and all(abs(line.xs[1] - 1) < 0.25 for line in lines)
    assert sum(line.xs[0] for line in lines) == pytest.approx(0)  # centred on the iteration


def test_the_select_answer_is_a_bounded_reason_then_the_number():
    from localora.vlm import schemas

    s = schemas.pick(3, 20)
    assert s.parse('{"reason":"sharper, all three","choice":3}') == {"reason": "sharper, all three", "choice": 3}
    for bad in ('{"reason":"x","choice":4}', '{"choice":1,"reason":"x"}', '{"reason":"' + "x" * 21 + '","choice":1}'):
        with pytest.raises(ValueError):
            s.parse(bad)
    assert s.max_chars == len('{"reason":"' + "x" * 20 + '","choice":3}')


# ------------------------------------------------------------------ a real run: the demo (conftest.py)

def test_a_demo_run_says_what_it_does_at_once_and_its_report_says_why_and_how_well(demo):
    import html
    import json

    _, run, _ = demo
    lines = run.with_suffix(".log").read_text().splitlines()
    # From a clean home: the first line says the tiny models are being built (issue 27 item 12),
    # before the build; then the note that they are random; then, before the start event and any
    # model load, the run and its models.
    assert lines[0].startswith("localora: building the tiny models once") and "sdxl" in lines[0]
    assert lines[1] == f"note: {tiny.NOTE}"
    assert lines[2].startswith(f"localora: run {run}, profile tiny") and "vlm tiny-qwen2-vl" in lines[2]
    assert lines[3].startswith("[") and " start " in lines[3]
    again = run.with_name("demo-2").with_suffix(".log").read_text().splitlines()
    assert again[0] == f"note: {tiny.NOTE}"  # built already: nothing to announce
    log = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    select = next(e for e in log if e.get("id") == "select")
    # The grammar bounds the reason (gpt4lora.SELECT_REASON_CHARS), and the number is in range.
    assert list(select["value"]) == ["reason", "choice"] and 1 <= len(select["value"]["reason"]) <= 200
    done = next(e for e in log if e["type"] == "done")
    assert done["iteration"] == select["value"]["choice"]
    page = (run / "report.html").read_text()
    assert f"<p class=note>{html.escape(tiny.NOTE)}</p>" in page
    assert html.escape(select["value"]["reason"]) in page
    scores = next(e for e in log if e.get("id") == "final/scores")
    refined = [e for e in log if e.get("role") == "refined"]
    assert scores["images"] == [e["image"] for e in refined] and len(refined) == 2
    for value in scores["objective"]:
        assert f"objective {value:.3f}" in page
    assert "<h2>Time per stage</h2>" in page and "<td>tiny-sdxl</td>" in page and "<td>tiny-clip</td>" in page
