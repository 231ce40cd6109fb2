"""`localora compose --prompts FILE.jsonl` on the tiny profile: one run folder per line, the same
results as single compose runs, models loaded once, reruns that skip finished lines and resume a
killed one, and one error line naming FILE:LINE for a bad line before anything renders.

One 2-line batch (in process, so its model loads can be counted) and the two single compose
runs of its lines serve most assertions.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from localora.cli import main
from localora.errors import INTERRUPTED
from support import ctrl_c_works, one_error_line

SMALL = ["-n", "1", "-c", "2", "--fewshot-levels", "0.5,1.0", "--steps", "2", "--width", "32", "--height", "32",
         "--plain"]
LINES = [{"prompt": "a cat", "loras": ["demo-character", "demo-style"]},
         {"prompt": "a dog <lora:demo-clothing:0.8>", "loras": ["demo-style"], "name": "dog", "seed": 4}]
# The same two lines as single runs: the tag stays in the prompt, the seed becomes --seed.
SINGLE = [["a cat", "-l", "demo-character", "-l", "demo-style"],
          ["a dog <lora:demo-clothing:0.8>", "-l", "demo-style", "--seed", "4"]]
MARK = "Answer as briefly as you can (batch-test)."


def write_lines(path: Path, lines: list, blank_first: bool = False) -> Path:
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    path.write_text(("\n" if blank_first else "") + text)
    return path


def invoke(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]


def snapshot(folder: Path) -> dict[Path, tuple[bytes, int]]:
    """Every file's bytes and mtime (the lock file aside: taking it is not writing the run)."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """A templates folder whose feedback.txt says a little more than the shipped one."""
    from localora import paths

    folder = tmp_path_factory.mktemp("templates")
    shipped = (paths.shipped_prompts_dir() / "feedback.txt").read_text()
    (folder / "feedback.txt").write_text(shipped.rstrip() + "\n" + MARK + "\n")
    return folder


@pytest.fixture(scope="module")
def batch(tmp_path_factory, templates):
    """The 2-line batch (blank line first: line numbers count it) with --templates, in process,
    counting how often the models are set up; then the single compose runs of its lines, the
    first with --prompts DIR (the old meaning), the second with --templates."""
    from localora.runs import session

    root = tmp_path_factory.mktemp("batch")
    source = write_lines(root / "lines.jsonl", LINES, blank_first=True)
    built = []
    real = session.components

    def counted(*args, **kw):
        built.append(args[0].name)
        return real(*args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(session, "components", counted)
        result = invoke("compose", "--prompts", source, "--templates", templates, *SMALL, "--out", root / "out")
    assert result.exit_code == 0, result.output
    singles = []
    for n, (args, option) in enumerate(zip(SINGLE, ("--prompts", "--templates")), 1):
        single = invoke("compose", *args, option, templates, *SMALL, "--out", root / f"single-{n}")
        assert single.exit_code == 0, single.output
        singles.append(root / f"single-{n}")
    return source, root / "out", built, singles, result.output


@pytest.mark.slow  # a whole 2-line batch and its single runs (the default run stays within 4 minutes)
def test_a_batch_writes_a_run_folder_per_line_and_batch_json(batch, templates):
    source, out, _, _, output = batch
    folders = [out / "002-a-cat", out / "dog"]  # line 2 (after the blank line) is unnamed: NNN-slug
    for folder in folders:
        for name in ("run.json", "events.jsonl", "final.png", "final.json", "report.html"):
            assert (folder / name).is_file(), (folder, name)
    doc = json.loads((out / "batch.json").read_text())
    assert doc["source"] == str(source.resolve())
    assert [(r["line"], r["folder"], r["status"]) for r in doc["lines"]] == \
        [(2, str(folders[0]), "done"), (3, str(folders[1]), "done")]
    for r, folder in zip(doc["lines"], folders):
        assert r["weights"] == json.loads((folder / "final.json").read_text())["weights"]
        assert Path(r["image"]).read_bytes() == (folder / "final.png").read_bytes()
    assert f"batch: {out / 'batch.json'}" in output
    # Line 3's seed and tags, and the command's other options, reached its run.
    config = json.loads((folders[1] / "run.json").read_text())["config"]
    assert config["sampling"]["seed"] == 4 and config["iterations"] == 1 and config["candidates"] == 2
    assert [lo["name"] for lo in config["loras"]] == ["demo-style", "demo-clothing"] and config["start"] == [None, 0.8]
    assert config["prompts_dir"] == str(templates.resolve())


@pytest.mark.slow  # a whole 2-line batch and its single runs (the default run stays within 4 minutes)
def test_batch_lines_end_like_single_compose_runs(batch):
    _, out, _, singles, _ = batch
    for folder, single in zip((out / "002-a-cat", out / "dog"), singles):
        assert json.loads((folder / "final.json").read_text()) == json.loads((single / "final.json").read_text())
        assert (folder / "final.png").read_bytes() == (single / "final.png").read_bytes()


@pytest.mark.slow  # a whole 2-line batch and its single runs (the default run stays within 4 minutes)
def test_the_models_load_once_for_the_whole_batch(batch):
    _, out, built, _, _ = batch
    assert built == ["tiny"]  # one set of components for both lines
    loads = [[e["model"] for e in events(folder) if e["type"] == "model" and e["action"] == "load"]
             for folder in (out / "002-a-cat", out / "dog")]
    assert sorted(loads[0]) == ["clip", "diffusion", "vlm"] and loads[1] == []


@pytest.mark.slow  # a whole 2-line batch and its single runs (the default run stays within 4 minutes)
def test_templates_and_prompts_dir_both_reach_the_vlm(batch):
    _, out, _, singles, _ = batch
    for folder in (out / "002-a-cat", out / "dog", *singles):
        feedback = [e for e in events(folder) if e["type"] == "vlm" and e["step"] == "feedback"]
        assert feedback and all(MARK in e["prompt"] for e in feedback), folder


@pytest.mark.slow  # a whole 2-line batch and its single runs (the default run stays within 4 minutes)
def test_rerunning_the_same_command_skips_finished_lines(batch, templates):
    source, out, _, _, _ = batch
    runs = [out / "002-a-cat", out / "dog"]
    before = {f: snapshot(f) for f in runs}
    result = invoke("compose", "--prompts", source, "--templates", templates, *SMALL, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    assert {f: snapshot(f) for f in runs} == before  # nothing rendered, nothing rewritten
    doc = json.loads(result.stdout)
    assert doc == json.loads((out / "batch.json").read_text())
    assert [r["status"] for r in doc["lines"]] == ["done", "done"]


@pytest.mark.slow  # a whole 2-line batch and its single runs (the default run stays within 4 minutes)
def test_a_changed_line_with_a_finished_folder_needs_a_new_out(batch, templates, tmp_path):
    source, out, _, _, _ = batch
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(".lock"))
    before = snapshot(copy)
    # The same folder names (line 2 by its number and slug, line 3 by its name), other settings.
    for lines, folder, what in (([{**LINES[0], "loras": ["demo-character", "demo-clothing"]}, LINES[1]], "002-a-cat",
                                 "loras"),
                                ([LINES[0], {**LINES[1], "seed": 5}], "dog", "sampling")):
        changed = write_lines(tmp_path / "lines.jsonl", lines, blank_first=True)
        result = invoke("compose", "--prompts", changed, "--templates", templates, *SMALL, "--out", copy)
        one_error_line(result, str(copy / folder), what, "new --out")
    assert snapshot(copy) == before


# ------------------------------------------------------------------ killed and interrupted batches

def localora(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "localora", *map(str, args)], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=ctrl_c_works)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_stopped_batch_continues_with_the_same_command(batch, templates, tmp_path, sig):
    _, first_out, _, _, _ = batch
    source = write_lines(tmp_path / "lines.jsonl", LINES)
    args = ["compose", "--prompts", source, "--templates", templates, *SMALL, "--out", tmp_path / "out"]
    proc = localora(*args)
    output, second_line, events_seen = [], False, 0
    for line in proc.stdout:  # a few events into the second line, stop the batch
        output.append(line)
        second_line = second_line or "batch: line 2" in line
        events_seen += second_line and line.startswith("[")
        if events_seen == 4:
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else INTERRUPTED), "".join(output) + rest
    if sig == signal.SIGINT:
        assert "the interrupted line's run folder is resumable" in rest and "the same command" in rest
    first, second = tmp_path / "out" / "001-a-cat", tmp_path / "out" / "dog"
    assert (first / "final.json").is_file() and (second / "run.json").is_file()
    assert not (second / "final.json").exists()
    doc = json.loads((tmp_path / "out" / "batch.json").read_text())
    assert [r["status"] for r in doc["lines"]] == ["done", "pending"]
    untouched = snapshot(first)

    again = localora(*args)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert snapshot(first) == untouched
    assert any(e["type"] == "resume" for e in events(second))
    assert json.loads((second / "final.json").read_text())["weights"] == \
        json.loads((first_out / "dog" / "final.json").read_text())["weights"]
    assert [r["status"] for r in json.loads((tmp_path / "out" / "batch.json").read_text())["lines"]] == ["done", "done"]


# ------------------------------------------------------------------ bad input: one line naming FILE:LINE

GOOD = LINES[0]


@pytest.mark.parametrize("bad, fragments", [
    ('{"prompt": "a cat", "loras": [}', ["not JSON"]),
    ({"prompt": "a cat", "loras": ["demo-style", "demo-character"], "lora": "x"}, ["unknown key 'lora'"]),
    ({"loras": ["demo-style", "demo-character"]}, ['no "prompt"']),
    ({"prompt": "a cat", "loras": ["demo-style", "no-such-lora"]}, ["no-such-lora"]),
    ({"prompt": "a cat", "loras": ["demo-style"]}, ["at least 2 LoRAs"]),
    ({"prompt": "<lora:demo-style> <lora:demo-character>"}, ["besides its <lora:...> tags"]),
    ({"prompt": "a cat", "loras": ["demo-style", "demo-character"], "seed": "7"}, ['"seed"']),
    ({"prompt": "a cat", "loras": ["demo-style", "demo-character"], "name": "../up"}, ["not a folder name"]),
    ({**GOOD, "name": "001-a-cat"}, ["folder name '001-a-cat' is line 1's too"]),
])
def test_a_bad_line_is_one_error_naming_file_and_line_before_anything_renders(tmp_path, bad, fragments):
    source = write_lines(tmp_path / "lines.jsonl", [GOOD, bad])
    result = invoke("compose", "--prompts", source, *SMALL, "--out", tmp_path / "out")
    one_error_line(result, f"{source}:2: ", *fragments)
    assert not (tmp_path / "out").exists()


def test_a_prompt_or_resume_or_lora_with_a_batch_is_an_error(tmp_path):
    source = write_lines(tmp_path / "lines.jsonl", [GOOD])
    one_error_line(invoke("compose", "a cat", "--prompts", source), "PROMPT", "not both")
    one_error_line(invoke("compose", "--resume", tmp_path, "--prompts", source), "--resume", "rerun the same command")
    one_error_line(invoke("compose", "--prompts", source, "-l", "demo-style"), "--lora", '"loras"')
    one_error_line(invoke("compose", "--prompts", tmp_path / "none.jsonl"), "none.jsonl", "no such prompts file")
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    one_error_line(invoke("compose", "--prompts", empty), "no prompts in it")


@pytest.mark.parametrize("option", ["--templates", "--prompts"])
def test_a_templates_folder_is_checked_by_either_option(tmp_path, option):
    mine = tmp_path / "prompts"
    mine.mkdir()
    (mine / "select.txt").write_text("Pick one of {count} {nope}\n")
    result = invoke("compose", "x", "-l", "demo-style", "-l", "demo-character", option, mine, "--out", tmp_path / "r")
    one_error_line(result, str(mine / "select.txt"), "{nope}")
    one_error_line(invoke("compose", "x", "-l", "demo-style", "-l", "demo-character", option, tmp_path / "gone"),
                   f"{option} {tmp_path / 'gone'}", "no such folder")
    assert not (tmp_path / "r").exists()


def test_help_says_what_prompts_takes():
    text = " ".join(invoke("compose", "--help").output.split())
    assert "FILE.jsonl" in text and "--templates" in text and "old command lines keep working" in text


# ------------------------------------------------------------------ the module's interface

def test_items_pickle_and_an_execute_hook_gets_the_lines_to_do(tmp_path, demo_loras):
    from localora.runs import batch as batches
    from localora.search.config import ComposeConfig

    loras = tuple(demo_loras["sdxl"][:2])
    source = write_lines(tmp_path / "lines.jsonl", [{"prompt": "a cat"}, {"prompt": "a dog", "name": "dog", "seed": 2}])
    items = batches.load(source, lambda line: (ComposeConfig(line["prompt"], loras, sampling=seed_of(line)), "tiny"))
    assert [(i.line, i.name) for i in items] == [(1, "001-a-cat"), (2, "dog")]
    assert pickle.loads(pickle.dumps(items)) == items
    asked = []

    def execute(todo):
        asked.extend((item.line, folder) for item, folder in todo)
        for item, folder in todo:
            yield item, {"weights": {"a": 1.0}, "iteration": 1, "renders": 0, "run_folder": str(folder),
                         "image": str(folder / "final.png"), "report": str(folder / "report.html")}

    records = batches.run(items, tmp_path / "out", ui=None, execute=execute, source=source)
    assert asked == [(1, tmp_path / "out" / "001-a-cat"), (2, tmp_path / "out" / "dog")]
    assert [r["status"] for r in records] == ["done", "done"]
    assert json.loads((tmp_path / "out" / "batch.json").read_text())["lines"] == records
    assert [batches.state(i, tmp_path / "out") for i in items] == ["new", "new"]  # the hook wrote no folder


def seed_of(line):
    from localora.diffusion.sampling import Sampling

    return Sampling(seed=line["seed"] or 0)


def test_the_batch_module_imports_no_torch():
    code = "import sys, localora.runs.batch; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
