"""The self-reflection loop end to end on the tiny profile: run folder, resume, TUI, report."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from localora.search import fewshot
from localora.cli import main
from support import ctrl_c_works, one_error_line, signal_after
from localora.ui.live import LiveUI, PlainUI


def localora(*args, home: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "LOCALORA_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "localora", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=ctrl_c_works, **kw)


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]


# `demo` (conftest.py): two finished demo runs in a clean home, shared with other test files.


def test_demo_writes_a_complete_run_folder(demo):
    _, run, _ = demo
    for name in ("run.json", "events.jsonl", "final.png", "final.json", "report.html"):
        assert (run / name).is_file(), name
    ev = events(run)
    calls = Counter(e["step"] for e in ev if e["type"] == "vlm")
    regenerated = calls.pop("regenerate", 0)  # asked again only when the first answer repeats itself
    assert calls == {"generate": 2, "feedback": 2, "refine": 2, "select": 1} and regenerated <= 2
    named = [e["image"] for e in ev if "image" in e] + [i for e in ev if e["type"] == "vlm" for i in e["images"]]
    assert named and all((run / p).is_file() for p in named)
    for e in ev:
        if e["type"] == "vlm":
            assert e["prompt"] and e["system"] and "raw" in e and "value" in e
    final = json.loads((run / "final.json").read_text())
    assert set(final["weights"]) == {"demo-character", "demo-clothing", "demo-style"}
    assert all(0.0 <= w <= 1.5 for w in final["weights"].values())
    settings = json.loads((run / "run.json").read_text())
    assert all(len(lo["sha256"]) == 64 for lo in settings["config"]["loras"]) and "torch" in settings["versions"]


def test_no_weight_vector_is_rendered_twice(demo):
    _, run, _ = demo
    denoised = Counter(e["key"] for e in events(run) if e["type"] == "render" and not e["cached"])
    assert denoised and max(denoised.values()) == 1


def test_fewshot_library_is_reused_by_a_second_run(demo):
    _, first, second = demo
    one = next(e for e in events(first) if e["type"] == "fewshot")
    two = next(e for e in events(second) if e["type"] == "fewshot")
    assert not one["reused"] and len(one["scored"]) == 9  # 3 per LoRA, not the 27 of the full grid
    strip = lambda rows: [{k: v for k, v in r.items() if k != "image"} for r in rows]  # noqa: E731
    assert two["reused"] and strip(two["kept"]) == strip(one["kept"])
    assert not any(e.get("role") == "grid" for e in events(second))
    assert json.loads((first / "final.json").read_text())["weights"] == json.loads((second / "final.json").read_text())["weights"]


def test_fewshot_library_key_follows_everything_that_decides_the_examples(demo_loras, sdxl_renderer, tmp_path):
    from localora.diffusion.sampling import Sampling
    from localora.runs.folder import RunFolder
    from localora.search.config import ComposeConfig
    from localora.search.gpt4lora import GPT4LoRA
    from localora.search.steps import Steps

    def key(**changes):
        cfg = ComposeConfig("a girl", tuple(demo_loras["sdxl"][:2]), **{"fewshot_threshold": 0.02, **changes})
        run = RunFolder.create(tmp_path / f"run{len(list(tmp_path.iterdir()))}", {})
        return GPT4LoRA(cfg, Steps(run, sdxl_renderer, vlm=None, scorer=None)).library_key()

    base = key()
    assert key() == base
    for change in ({"sampling": Sampling(negative_prompt="blurry")}, {"sampling": Sampling(steps=3)},
                   {"sampling": Sampling(seed=1)}, {"fewshot_keep": 3},
                   {"fewshot_threshold": 0.05}, {"fewshot_levels": (0.5, 1.0)}, {"fewshot_budget": 5}):
        assert key(**change) != base, change


def test_fewshot_selection_filters_unbalanced_and_keeps_the_best():
    S = fewshot.Scored
    table = [
        S((0.4, 0.4), 0.30, (0.20, 0.25)),
        S((0.4, 1.0), 0.35, (0.05, 0.30)),  # second LoRA barely shows: dropped despite its score
        S((1.0, 0.4), 0.28, (0.22, 0.21)),
        S((1.0, 1.0), 0.31, (0.19, 0.30)),
        S((0.7, 0.7), 0.26, (0.21, 0.24)),
        S((0.7, 1.0), 0.29, (0.15, 0.26)),  # at the threshold: kept
        S((1.0, 0.7), 0.25, (0.30, 0.30)),
    ]
    kept = fewshot.select(table, threshold=0.15, keep=5)
    assert [k.weights for k in kept] == [(1.0, 1.0), (0.4, 0.4), (0.7, 1.0), (1.0, 0.4), (0.7, 0.7)]
    assert fewshot.select(table, threshold=0.5) == []
    assert len(fewshot.grid(3, (0.4, 0.7, 1.0))) == 27


@pytest.mark.parametrize("k,levels,budget", [(3, (0.4, 0.7, 1.0), None), (5, (0.4, 0.7, 1.0), None),
                                             (4, (0.2, 0.6, 1.0, 1.4), 10), (3, (0.5, 1.0), 5)])
def test_fewshot_design_grows_linearly_and_shows_every_level(k, levels, budget):
    rows = fewshot.design(k, levels, budget)
    assert len(rows) == (budget or 3 * k) < len(levels) ** k
    assert len(set(rows)) == len(rows)
    for column in zip(*rows):  # every level of every LoRA, each equally often within one
        counts = Counter(column)
        assert set(counts) == set(levels) and max(counts.values()) - min(counts.values()) <= 1
    assert fewshot.design(k, levels, budget) == rows  # deterministic


def test_fewshot_design_is_the_full_grid_when_that_fits_the_budget():
    assert fewshot.design(2, (0.4, 1.0)) == fewshot.grid(2, (0.4, 1.0))  # 4 <= 6
    assert fewshot.design(3, (0.4, 0.7, 1.0), budget=27) == fewshot.grid(3, (0.4, 0.7, 1.0))


def test_demo_few_shot_stage_renders_at_most_three_per_lora(demo):
    _, run, _ = demo
    grid = [e for e in events(run) if e["type"] == "render" and e["role"] == "grid"]
    assert 0 < len(grid) <= 3 * 3


def test_report_is_self_contained_html_showing_every_iteration(demo):
    _, run, _ = demo
    page = (run / "report.html").read_text()

    class Check(HTMLParser):
        def __init__(self):
            super().__init__()
            self.sources, self.stack = [], []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            self.sources += [v for k, v in a.items() if k in ("src", "href", "xlink:href") and v]

    checker = Check()
    checker.feed(page)
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert checker.sources and all(s.startswith(("data:image/png;base64,", "#")) or (run / s).is_file()
                                   for s in checker.sources)
    # Every thumbnail links to its full-size image in the run folder, by a relative path.
    links = [s for s in checker.sources if not s.startswith(("data:", "#"))]
    assert links and all(not Path(s).is_absolute() and ".." not in s for s in links)
    assert {"images", "rounds"} <= {Path(s).parts[0] for s in links}
    # The only URLs are the SVG namespace names, which are never fetched.
    assert "http://" not in page.replace("http://www.w3.org/", "") and "https://" not in page
    assert "Iteration 1" in page and "Iteration 2" in page and "<svg" in page and "Final pick" in page
    assert "a portrait of a girl in a garden" in page
    # The final pick's A1111 line, as final.png stores it, with a button that copies it.
    assert "&lt;lora:demo-character:" in page and "Steps: " in page and "navigator.clipboard.writeText" in page
    for name in ("demo-character", "demo-clothing", "demo-style"):
        assert f"<td>{name}</td>" in page and f"<figcaption>{name}</figcaption>" in page  # table, reference


def test_each_round_has_a_contact_sheet_of_its_candidates(demo):
    _, run, _ = demo
    from PIL import Image

    for r in (1, 2):
        with Image.open(run / "rounds" / f"round-{r}.png") as sheet:
            # 3 candidates of 256 px cells, 8 px apart, captions under them
            assert sheet.width == 8 + 3 * (256 + 8) and sheet.height > 256 + 16
            # the first cell holds candidate 1, scaled up from the run's image
            first = [e for e in events(run) if e.get("id") == f"iter{r}/cand1"][0]
            with Image.open(run / first["image"]) as im:
                expect = im.convert("RGB").resize((256, 256), Image.Resampling.NEAREST)
            assert sheet.convert("RGB").crop((8, 8, 264, 264)).tobytes() == expect.tobytes()


def test_plain_mode_prints_one_line_per_event(demo):
    _, run, _ = demo
    ev = events(run)
    console = Console(record=True, width=200)
    ui = PlainUI(console)
    for e in ev:
        ui.event(e)
    lines = console.export_text().splitlines()
    assert len(lines) == len(ev)
    assert any("iter1/generate" in ln for ln in lines)


def test_live_view_renders_progress_candidates_and_feedback(demo):
    _, run, _ = demo
    console = Console(record=True, width=120, force_terminal=True)
    ui = LiveUI(console)
    with ui:
        for e in events(run):
            ui.event(e)
            if e.get("id") == "iter2/scores":
                console.print(ui.view())
    text = console.export_text()
    for fragment in ("iterations", "images", "iteration 2 candidates", "CLIP-T", "latest feedback", "ETA"):
        assert fragment in text


def _copy_models(src_home: Path, dst_home: Path) -> None:
    shutil.copytree(src_home / "tiny", dst_home / "tiny")


KILL_ARGS = ["compose", "a girl", "-l", "demo-character", "-l", "demo-style", "-n", "2", "-c", "2",
             "--fewshot-levels", "0.5,1.0", "--seed", "3", "--plain"]


@pytest.fixture(scope="module")
def uncut(demo, tmp_path_factory):
    """The run the killed ones must end like, made once for every signal, in a home of its own
    (so its renders never serve the killed runs from the cache)."""
    root = tmp_path_factory.mktemp("uncut")
    _copy_models(demo[0], root / "home")
    reference = localora(*KILL_ARGS, "--out", root / "ref", home=root / "home")
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out
    return root / "ref"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_run_resumes_to_the_same_result(demo, uncut, tmp_path, sig):
    home, _, _ = demo
    args = KILL_ARGS
    cut_home = tmp_path / "cut-home"
    _copy_models(home, cut_home)
    total = len(events(uncut))

    stop_after = random.Random(int(sig)).randint(3, total - 3)
    proc = localora(*args, "--out", tmp_path / "cut", home=cut_home)
    signal_after(proc, stop_after, sig)
    assert proc.returncode != 0
    before = events(tmp_path / "cut")
    done_before = {e["id"] for e in before if "id" in e}
    assert 0 < len(done_before) and not (tmp_path / "cut" / "final.json").exists()

    resumed = localora("compose", "--resume", tmp_path / "cut", "--plain", home=cut_home)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    after = events(tmp_path / "cut")[len(before):]
    assert after[0]["type"] == "resume"
    redone = {e["id"] for e in after if "id" in e} & done_before
    assert redone == set()
    ref_final = json.loads((uncut / "final.json").read_text())
    cut_final = json.loads((tmp_path / "cut" / "final.json").read_text())
    assert cut_final["weights"] == ref_final["weights"]
    assert (tmp_path / "cut" / "final.png").read_bytes() == (uncut / "final.png").read_bytes()


# ------------------------------------------------------------------ bad input

def compose(*args):
    return CliRunner().invoke(main, ["compose", *map(str, args)])


def test_one_lora_is_nothing_to_combine(tmp_path):
    one_error_line(compose("x", "-l", "demo-style", "--out", tmp_path / "r"), "at least 2 LoRAs")


def test_zero_iterations(tmp_path):
    one_error_line(compose("x", "-l", "demo-style", "-l", "demo-character", "-n", "0", "--out", tmp_path / "r"),
                   "--iterations")


def test_bounds_min_above_max(tmp_path):
    one_error_line(compose("x", "-l", "demo-style", "-l", "demo-character", "--bounds", "1.5,0", "--out", tmp_path / "r"),
                   "--bounds", "min <= max")


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    one_error_line(compose("x", "-l", "demo-style", "-l", "demo-character", "--out", blocker / "run"),
                   "a part of the path is a file", "choose another --out")


def test_resume_a_folder_that_is_not_a_run(tmp_path):
    one_error_line(compose("--resume", tmp_path), "not a localora run folder")


def test_resume_refuses_a_changed_profile(demo, tmp_path):
    _, run, _ = demo
    from localora import paths

    changed = tmp_path / "models.toml"
    changed.write_text(paths.models_toml().read_text().replace("steps = 4\n", "steps = 3\n", 1))
    result = CliRunner().invoke(main, ["compose", "--resume", str(run)], env={"LOCALORA_MODELS": str(changed)})
    one_error_line(result, "profile 'tiny'", "changed since this run started")


def test_resume_refuses_options_it_would_ignore(demo):
    _, run, _ = demo
    one_error_line(compose("--resume", run, "--iterations", "3", "--seed", "2"), "--iterations", "--seed")


def test_resume_with_other_loras(demo):
    _, run, _ = demo
    one_error_line(compose("--resume", run, "-l", "demo-style", "-l", "demo-character"), "used the LoRAs")


def test_resume_refuses_a_run_whose_prompts_folder_is_gone(tmp_path):
    from localora.cli.compose import DEMO_LORAS
    from localora.cli.options import resolve_loras
    from localora.profiles import load_profile
    from localora.runs import session
    from localora.search.config import ComposeConfig

    mine = tmp_path / "prompts"
    mine.mkdir()
    prof = load_profile("tiny")
    cfg = ComposeConfig(prompt="x", loras=tuple(c.lora for c in resolve_loras(prof, DEMO_LORAS, ())),
                        prompts_dir=str(mine))
    run = session.start(cfg, prof, tmp_path / "run").path
    mine.rmdir()
    one_error_line(compose("--resume", run), f"{mine}: this run's --prompts folder is gone")


def test_fewshot_budget_smaller_than_the_levels(tmp_path):
    one_error_line(compose("x", "-l", "demo-style", "-l", "demo-character", "--fewshot-budget", "2",
                           "--out", tmp_path / "r"), "--fewshot-budget 2", "at least 3")


# ------------------------------------------------------------------ damaged and contested run folders (issue 17)

def _copy_run(demo, tmp_path) -> tuple[Path, Path, dict]:
    home, first, _ = demo
    run = tmp_path / "run"
    shutil.copytree(first, run)
    (run / ".lock").unlink(missing_ok=True)
    return home, run, {"LOCALORA_HOME": str(home)}


def test_a_torn_last_line_is_dropped_and_the_run_resumes(demo, tmp_path):
    home, run, env = _copy_run(demo, tmp_path)
    with open(run / "events.jsonl", "ab") as f:
        f.write(b'{"type": "render", "id": "iter9/ca\xc3')  # a kill mid-append, mid-character
    assert CliRunner().invoke(main, ["open", str(run)], env=env).exit_code == 0
    result = CliRunner().invoke(main, ["compose", "--resume", str(run), "--plain"], env=env)
    assert result.exit_code == 0, result.output
    assert all(json.loads(line) for line in (run / "events.jsonl").read_text(encoding="utf-8").splitlines())


@pytest.mark.parametrize("damage", [b'{"type": "render", "id": "ref/0", "ima\n', b'{"type": "vlm", "raw": "\xff\xfe"}\n',
                                    b'[1, 2]\n'])
def test_damage_in_the_middle_of_the_log_is_one_line_and_changes_nothing(demo, tmp_path, damage):
    home, run, env = _copy_run(demo, tmp_path)
    lines = (run / "events.jsonl").read_bytes().splitlines(keepends=True)
    lines[4] = damage
    (run / "events.jsonl").write_bytes(b"".join(lines))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    for args in (["compose", "--resume", str(run)], ["open", str(run)]):
        one_error_line(CliRunner().invoke(main, args, env=env), "events.jsonl: line 5", "head -n 4")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before


def test_deleted_images_are_put_back_on_resume(demo, tmp_path):
    home, run, env = _copy_run(demo, tmp_path)
    original = (run / "final.png").read_bytes()
    recorded = {e["image"] for e in events(run) if e["type"] == "render" and not e["id"].startswith("grid/")}
    for png in (run / "images").glob("*.png"):
        png.unlink()
    (run / "final.png").unlink()
    result = CliRunner().invoke(main, ["compose", "--resume", str(run), "--plain"], env=env)
    assert result.exit_code == 0, result.output
    assert all((run / rel).is_file() for rel in recorded)
    assert (run / "final.png").read_bytes() == original


def test_a_second_process_on_a_run_folder_is_refused(demo, tmp_path):
    home, run, env = _copy_run(demo, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from localora.files import hold_lock; "
         f"lock = hold_lock(Path({str(run / '.lock')!r})); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(main, ["compose", "--resume", str(run), "--plain"], env=env)
        one_error_line(result, str(run), f"being written by process {holder.pid}")
        assert CliRunner().invoke(main, ["open", str(run)], env=env).exit_code == 0  # reading is fine
    finally:
        holder.communicate("", timeout=60)
    # The holder is gone (as after a kill): its lock went with it.
    result = CliRunner().invoke(main, ["compose", "--resume", str(run), "--plain"], env=env)
    assert result.exit_code == 0, result.output


def test_stale_temporaries_in_a_resumed_run_are_removed(demo, tmp_path):
    home, run, env = _copy_run(demo, tmp_path)
    (run / ".tmp-abc.json").write_text("{")
    (run / "images" / ".tmp-def.png").write_bytes(b"half")
    assert CliRunner().invoke(main, ["compose", "--resume", str(run), "--plain"], env=env).exit_code == 0
    assert not list(run.rglob(".tmp-*"))


# ------------------------------------------------------------------ prompt templates

def test_every_template_is_checked_before_the_first_render(tmp_path):
    mine = tmp_path / "prompts"
    mine.mkdir()
    (mine / "select.txt").write_text("Pick one of {count} {nope}\n")
    out = tmp_path / "r"
    result = compose("x", "-l", "demo-style", "-l", "demo-character", "--prompts", mine, "--out", out)
    one_error_line(result, str(mine / "select.txt"), "{nope}")
    assert not out.exists()  # refused before the run folder, so before any render


def test_a_run_that_failed_before_its_first_step_does_not_block_the_same_command(tmp_path):
    from localora import paths

    models = tmp_path / "models.toml"
    out = tmp_path / "r"
    # A model that is not there at all is found before the run folder exists.
    models.write_text(paths.models_toml().read_text().replace('source = "tiny:qwen2-vl"', f'source = "{tmp_path}/gone"'))
    result = CliRunner().invoke(main, ["compose", "x", "-l", "demo-style", "-l", "demo-character", "--out", str(out)],
                                env={"LOCALORA_MODELS": str(models)})
    one_error_line(result, "tiny-qwen2-vl:", f"{tmp_path}/gone does not exist", "fix `source` in models.toml")
    assert not out.exists()
    # One that looks like a model but does not load fails at its load, in the run folder.
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    models.write_text(paths.models_toml().read_text().replace('source = "tiny:qwen2-vl"', f'source = "{tmp_path}/broken"'))
    for _ in range(2):
        result = CliRunner().invoke(main, ["compose", "x", "-l", "demo-style", "-l", "demo-character", "--out", str(out)],
                                    env={"LOCALORA_MODELS": str(models)})
        one_error_line(result, f"{tmp_path}/broken")
    assert (out / "run.json").is_file()
    # Once something was done in it, the folder is a run to resume, not to overwrite.
    (out / "events.jsonl").write_text('{"type": "start"}\n')
    one_error_line(compose("x", "-l", "demo-style", "-l", "demo-character", "--out", out), "not empty", "--resume")


def test_user_text_is_never_read_as_a_template_whatever_the_hash_seed():
    code = ("from localora.vlm import prompts; print(prompts.render('generate', None, prompt='a {loras} cat {hi}', "
            "loras='L', lo='0', hi='1', answer_format='F', current='C', last_reference='2', examples='E', candidates='3'))")
    outs = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                           capture_output=True, text=True, check=True).stdout for seed in range(4)}
    assert len(outs) == 1
    assert "a {loras} cat {hi}" in outs.pop()


def test_each_round_renders_m_distinct_vectors_new_to_the_run(demo):
    _, run, _ = demo
    seen: set[str] = set()
    rounds: dict[int, list[str]] = {}
    for e in events(run):
        if e["type"] != "render":
            continue
        if e["role"] == "candidate":
            assert e["key"] not in seen, e["id"]
            rounds.setdefault(e["iteration"], []).append(e["key"])
            assert e["origin"] in ("vlm", "vlm-again", "filled")
        seen.add(e["key"])
    assert len(rounds) == 2 and all(len(set(keys)) == len(keys) == 3 for keys in rounds.values())
