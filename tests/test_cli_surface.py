"""The everyday CLI surface (issue 16): exit codes, --json, -v/--quiet, compose --method, commands
that answer without loading torch, and shell completion.

One Switch compose run with -v --json, and the same run again with --quiet (its renders come
from the cache), serve most assertions: they are real subprocesses, so stdout, stderr and the
libraries' own warnings are exactly what a user sees.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from localora.cli import main
from localora.errors import EXIT_CODES, FAILED, INTERRUPTED, MISSING, USAGE
from support import ctrl_c_works, heavy_imports, one_error_line

SMALL = ["--steps", "2", "--width", "32", "--height", "32"]
# demo-character is given second: Switch runs the character first, so the run must reorder it.
COMPOSE = ["compose", "a cat", "-l", "demo-style", "-l", "demo-character:0.8", "-n", "1", "-c", "2", "--no-fewshot",
           "--method", "switch", "--switch-every", "1", *SMALL]
LIBRARY_WARNING = "No LoRA keys associated"  # diffusers' warning on a UNet-only LoRA


def localora(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "localora", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_works, **kwargs)


def finished(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localora", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("surface")
    loud = finished("-v", *COMPOSE, "--json", "-o", root / "loud")
    assert loud.returncode == 0, loud.stderr
    quiet = finished("--quiet", *COMPOSE, "-o", root / "quiet")
    assert quiet.returncode == 0, quiet.stderr
    return root, loud, quiet


# ------------------------------------------------------------------ exit codes

def test_exit_codes_are_listed_in_help():
    r = run("--help")
    assert r.exit_code == 0
    for code, text in EXIT_CODES.items():
        assert re.search(rf"^\s+{code}\s+{re.escape(text)}$", r.output, re.M), (code, r.output)


def test_usage_and_bad_input_exit_2(tmp_path):
    r = run("compose", "x", "--iterations", "many")
    assert r.exit_code == USAGE and "--iterations" in r.output
    r = run("-v", "--quiet", "models")
    assert r.exit_code == USAGE and "exclude each other" in r.output
    pickled = tmp_path / "old.ckpt"
    pickled.write_bytes(b"\x80\x04not opened")
    r = run("loras", "inspect", pickled)
    one_error_line(r, "old.ckpt")
    assert r.exit_code == USAGE


def test_missing_file_or_model_exits_3(tmp_path, demo_loras):
    r = run("generate", "x", "-l", tmp_path / "nope.safetensors", *SMALL)
    one_error_line(r, "nope.safetensors", "not found")
    assert r.exit_code == MISSING
    # A profile whose weights are not downloaded: the render cannot start.
    lora = demo_loras["sdxl"][0].path
    r = run("generate", "x", "-p", "sdxl-realistic", "-l", lora, "-o", tmp_path / "x.png", *SMALL)
    one_error_line(r, "sdxl-base, madebyollin/sdxl-vae-fp16-fix not here", "`localora pull sdxl-realistic`")
    assert r.exit_code == MISSING and "PROFILE" not in r.output


NOT_HERE = {  # command -> (the models it names, the commands it gives)
    "compose": ("sdxl-base, madebyollin/sdxl-vae-fp16-fix, qwen2-vl-7b, clip-vit-l-14", "`localora pull sdxl-realistic`"),
    # a CLIP-scored search does not need the VLM, unless its final pick is the VLM's (--final-judge)
    "compose --search random": ("sdxl-base, madebyollin/sdxl-vae-fp16-fix, clip-vit-l-14", "`localora pull sdxl-realistic`"),
    "compose --search random --final-judge": ("sdxl-base, madebyollin/sdxl-vae-fp16-fix, qwen2-vl-7b, clip-vit-l-14",
                                              "`localora pull sdxl-realistic`"),
    "compose --vlm qwen3-vl-4b": ("sdxl-base, madebyollin/sdxl-vae-fp16-fix, qwen3-vl-4b, clip-vit-l-14",
                                  "`localora pull sdxl-realistic --vlm qwen3-vl-4b`"),
    "compose --prompts": ("sdxl-base, madebyollin/sdxl-vae-fp16-fix, qwen2-vl-7b, clip-vit-l-14", "`localora pull sdxl-realistic`"),
    "bench": ("sdxl-base, madebyollin/sdxl-vae-fp16-fix, qwen2-vl-7b, clip-vit-l-14", "`localora pull sdxl-realistic`"),
    # the tiny models are here; a judge that is not is fetched as that profile's --vlm
    "bench --profile tiny --methods merge,switch --judges qwen3-vl-4b,qwen3-vl-8b": (
        "qwen3-vl-4b, qwen3-vl-8b", "`localora pull tiny --vlm qwen3-vl-4b` and `localora pull tiny --vlm qwen3-vl-8b`"),
}


@pytest.mark.parametrize("command", list(NOT_HERE))
def test_weights_not_here_are_one_line_naming_them_and_the_real_pull_command_before_anything_is_written(
        tmp_path, demo_loras, command):
    """The models a command needs, each by name, and the pull command with the profile's own name
    (and --vlm), before a run folder or bench folder exists: not the first model's load error
    with a PROFILE placeholder after the folder was made."""
    lora = [str(lo.path) for lo in demo_loras["sdxl"][:2]]
    name, *options = command.split()
    out = tmp_path / "run"
    args = {"compose": ["a girl", "-p", "sdxl-realistic", "-l", lora[0], "-l", lora[1], "--out", out],
            "bench": ["--testbed", "tiny", "--methods", "merge,reflect", "--out", out,
                      *([] if "--profile" in options else ["--profile", "sdxl-realistic"])]}
    if options == ["--prompts"]:
        lines = tmp_path / "lines.jsonl"
        lines.write_text(json.dumps({"prompt": "a girl", "loras": lora}) + "\n")
        args[name] = ["-p", "sdxl-realistic", "--out", out, "--prompts", lines]
        options = []
    r = run(name, *args[name], *options)
    assert r.exit_code == MISSING and "PROFILE" not in r.output
    models, commands = NOT_HERE[command]
    one_error_line(r, f"{models} not here; fetch with {commands} (")
    assert not out.exists()


def test_nan_latents_exit_4_and_library_warnings_stay_hidden(tmp_path, demo_loras):
    # A finite but absurd guidance overflows the latents: the render fails, it is not input's fault.
    proc = finished("generate", "x", "-l", "demo-character", "--guidance", "1e38", "-o", tmp_path / "x.png", *SMALL)
    assert proc.returncode == FAILED, proc.stderr
    lines = proc.stderr.strip().splitlines()
    # The LoRA loaded on the way (diffusers warns about it) and that warning is hidden by default.
    assert len(lines) == 1 and lines[0].startswith("error: render failed: NaN/Inf"), proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_out_of_memory_exits_4_with_one_line():
    # No CPU test machine runs out of accelerator memory: the mapping is shown on the error torch raises.
    import click
    import torch

    from localora.cli import _Cli

    @click.group(cls=_Cli)
    def group():
        pass

    @group.command()
    def big():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    r = CliRunner().invoke(group, ["big"])
    one_error_line(r, "out of accelerator memory", "--batch 1")
    assert r.exit_code == FAILED


def test_ctrl_c_exits_130(tmp_path, demo_loras):
    # Its own seed: whatever it renders before the signal never serves the runs fixture's renders.
    proc = localora(*COMPOSE, "--seed", "11", "--plain", "-o", tmp_path / "cut")
    for line in proc.stdout:  # the first progress line: the run is under way
        if line.startswith("["):
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == INTERRUPTED, err
    assert "interrupted" in err and "--resume" in err


# ------------------------------------------------------------------ compose: --json, -v, --quiet, --method

def test_compose_json_is_the_whole_stdout_and_matches_the_run_folder(runs):
    root, loud, _ = runs
    data = json.loads(loud.stdout)
    final = json.loads((root / "loud" / "final.json").read_text())
    assert data["weights"] == final["weights"] and data["iteration"] == final["iteration"]
    assert Path(data["run_folder"]) == root / "loud" and Path(data["image"]).read_bytes() == \
        (root / "loud" / "final.png").read_bytes()
    events = [json.loads(x) for x in (root / "loud" / "events.jsonl").read_text().splitlines()]
    done = next(e for e in events if e["type"] == "done")
    spent = sum(e["type"] == "render" and e["role"] in ("candidate", "refined") for e in events)
    assert data["renders"] == done["renders"] == spent == 3  # 2 candidates + 1 refined


def test_quiet_prints_only_the_result_lines_with_the_json_numbers(runs):
    root, loud, quiet = runs
    data = json.loads(loud.stdout)
    assert quiet.stderr == ""
    lines = quiet.stdout.splitlines()
    assert len(lines) == 2, quiet.stdout
    m = re.fullmatch(r"final weights: (.*) \(round (\d+), (\d+) search renders of (\d+) images\)", lines[0])
    assert m, lines[0]
    weights = dict(kv.split("=") for kv in m[1].split(", "))
    assert {k: float(v) for k, v in weights.items()} == {k: round(v, 2) for k, v in data["weights"].items()}
    assert (int(m[2]), int(m[3])) == (data["iteration"], data["renders"])
    # Every image, as the live view's "images" bar counts them (the LoRAs alone, the start, each round's).
    events = [json.loads(x) for x in (root / "quiet" / "events.jsonl").read_text().splitlines()]
    assert int(m[4]) == sum(e["type"] == "render" for e in events) > int(m[3])
    assert lines[1].startswith("run folder: ") and "final.png" in lines[1]


def test_verbose_shows_library_warnings_and_timings_per_stage(runs):
    _, loud, quiet = runs
    assert LIBRARY_WARNING in loud.stderr and LIBRARY_WARNING not in quiet.stderr
    timings = loud.stderr[loud.stderr.index("timings per stage"):].splitlines()[1:]
    stages = {re.split(r"\s{2,}", t.strip())[0]: t for t in timings}
    assert {"render candidate", "render refined", "vlm generate", "vlm refine"} <= set(stages), stages
    assert re.search(r"2 x +\d+\.\d\d s = +\d+\.\d\d s", stages["render candidate"])


def test_compose_method_switch_renders_everything_with_switch(runs):
    from localora.export import read_source

    root, _, _ = runs
    settings = json.loads((root / "loud" / "run.json").read_text())["config"]
    assert settings["method"] == "switch" and settings["sampling"]["switch_every"] == 1
    assert [lo["name"] for lo in settings["loras"]] == ["demo-character", "demo-style"]  # character first
    assert settings["start"] == [0.8, None]
    images = sorted((root / "loud" / "images").glob("*.png"))
    assert len(images) >= 6  # 2 references, start, 2 candidates, refined (fewer only if two coincide)
    infos = [read_source(p).info for p in images]
    assert {(i.method, i.switch_every) for i in infos} == {("switch", 1)}


def test_compose_help_tells_every_sampling_option():
    r = run("compose", "--help")
    for option in ("--method", "--switch-every", "--steps", "--guidance", "--width", "--height", "--negative",
                   "--json"):
        block = r.output[r.output.index(option):].split("\n  -")[0]
        assert len(block.split(None, 2)) == 3, option  # the option, its type, and help text


# ------------------------------------------------------------------ models and doctor --json

def test_models_json_carries_what_the_lines_say():
    human, machine = run("models"), run("models", "--json")
    assert human.exit_code == machine.exit_code == 0
    data = json.loads(machine.stdout)
    assert f"(default: {data['default_profile']})" in human.output
    for p in data["profiles"]:
        assert f"\n{p['name']}: {p['description']}\n" in human.output
        for m in p["models"]:
            assert re.search(rf"^  {m['role']} +{re.escape(m['name'])} +{re.escape(m['availability'])}$",
                             human.output, re.M), m
        assert (f"  fetch its models once with: {p['fetch']}\n" in human.output) == (p["fetch"] is not None)


def test_doctor_json_carries_what_the_lines_say_and_keeps_exit_3():
    human, machine = run("doctor", "-p", "sdxl-realistic"), run("doctor", "-p", "sdxl-realistic", "--json")
    assert human.exit_code == machine.exit_code == MISSING
    data = json.loads(machine.stdout)
    assert "localora pull sdxl-realistic" in machine.stderr and machine.stdout.lstrip().startswith("{")
    est = data["estimate_gib"]
    assert f"{est['resident']:.1f} GiB with every model resident, {est['one_at_a_time']:.1f} GiB one at a time" \
        in human.stdout
    # SDXL fp16 (3.47e9 x 2 B = 6.46 GiB), its working memory (x 0.25 + 1 GiB) and the CUDA context (0.5)
    assert est["one_at_a_time"] == 9.6
    for m in data["models"]:
        assert f"{m['name']}: {m['availability']}" in human.stdout
    assert set(data["missing"]) == {m["name"] for m in data["models"] if m["availability"].startswith("missing")}
    assert f"torch {data['torch']}" in human.stdout and f"placement {data['placement']}: {data['plan']}" in human.stdout


# ------------------------------------------------------------------ commands that need no model load no torch

@pytest.mark.parametrize("command", ["loras inspect", "loras list", "open", "export --to a1111"])
def test_commands_without_a_model_load_no_torch(runs, localora_home, command):
    root, _, _ = runs
    lora = localora_home / "tiny" / "v1" / "loras-sdxl" / "demo-character.safetensors"
    args = {
        "loras inspect": ["loras", "inspect", lora],
        "loras list": ["loras", "list", "--lora-dir", lora.parent],
        "open": ["open", root / "loud"],
        "export --to a1111": ["export", root / "loud", "--to", "a1111"],
    }[command]
    code, heavy, out = heavy_imports(*args)
    assert code == 0 and heavy == [], (code, heavy, out)
    assert out.strip(), command  # it answered


# Each is refused on its arguments alone: before the fix, generate and compose imported the renderer
# (and torch, 6-9 s) first, so the one error line came seconds late.
USAGE_ERRORS = {
    "generate unknown LoRA": ["generate", "a cat", "--profile", "tiny", "-l", "no-such-lora"],
    "generate --width 65": ["generate", "a cat", "--profile", "tiny", "-l", "demo-character", "--width", "65"],
    "generate --from missing": ["generate", "--from", "no-such.png"],
    "compose unknown profile": ["compose", "a cat", "--profile", "no-such-profile"],
    "compose --guidance nan": ["compose", "a cat", "--profile", "tiny", "-l", "demo-character", "-l", "demo-style",
                               "--guidance", "nan"],
    "compose --resume not a run": ["compose", "--resume", "."],
}


@pytest.mark.parametrize("case", USAGE_ERRORS)
def test_usage_errors_answer_before_torch_loads(demo_loras, tmp_path, case):
    code, heavy, out = heavy_imports(*USAGE_ERRORS[case])
    assert code in (USAGE, MISSING) and heavy == [], (code, heavy, out)


# ------------------------------------------------------------------ shell completion

@pytest.fixture
def lora_dir(tmp_path):
    root = tmp_path / "Lora"
    for rel in ("hero.safetensors", "styles/ink.safetensors", "a/twin.safetensors", "b/twin.safetensors",
                "old.ckpt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")  # names only: completion never opens a file
    return root


def test_lora_names_are_catalog_entries_and_folder_stems(tmp_path, lora_dir):
    from localora.cli.options import lora_names

    catalog = tmp_path / "cat.toml"
    catalog.write_text('[loras.my-hero]\nfile = "x.safetensors"\n')
    # Catalog entries first, then each folder's files by path; a repeated stem by its subfolder path.
    assert lora_names("sdxl-realistic", [str(catalog)], [str(lora_dir)]) == ["my-hero", "a/twin", "b/twin", "hero", "ink"]


def test_complete_loras_profiles_and_testbeds(lora_dir, demo_loras):
    import click

    from localora.bench import testbeds
    from localora.cli.options import complete_loras, complete_profiles, complete_testbeds

    ctx = click.Context(main.commands["generate"])
    ctx.params = {"profile": "tiny", "catalog": (), "lora_dirs": (str(lora_dir),)}
    values = lambda items: [i.value for i in items]  # noqa: E731
    assert values(complete_loras(ctx, None, "demo-c")) == ["demo-character", "demo-clothing"]
    assert values(complete_loras(ctx, None, "H")) == ["hero"]  # names are case-insensitive
    assert complete_loras(ctx, None, "hero:0.") == []  # a weight is being typed
    assert [(i.value, i.type) for i in complete_loras(ctx, None, "./lo")] == [("./lo", "file")]
    assert values(complete_profiles(ctx, None, "sd15-")) == ["sd15-anime", "sd15-realistic"]
    assert values(complete_testbeds(ctx, None, "")) == testbeds.names()


def test_completion_through_click(lora_dir):
    env = {"_LOCALORA_COMPLETE": "bash_complete", "COMP_WORDS": f"localora compose --lora-dir {lora_dir} -l in",
           "COMP_CWORD": "5"}
    code, heavy, out = heavy_imports(env=env)
    assert (code, heavy) == (0, []) and out.split() == ["plain,ink"], out
    env.update(COMP_WORDS="localora doctor --profile sdxl-a", COMP_CWORD="3")
    assert heavy_imports(env=env)[2].split() == ["plain,sdxl-anime", "plain,sdxl-anime-small"]


def test_models_reads_the_hub_cache_as_snapshot_download_does(tmp_path, monkeypatch):
    # `models` looks into the HF cache itself (huggingface_hub's client takes seconds to import).
    import huggingface_hub.constants

    from localora import profiles

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--model"
    assert profiles.availability("org/model").startswith("missing: 'org/model' is not in the local")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    assert profiles.availability("org/model").startswith("missing")  # a ref without its snapshot
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    assert profiles.availability("hf-hub:org/model") == "ok"
    assert profiles.locate("org/model", "x") == repo / "snapshots" / "abc123"


def test_compose_views_pass_on_every_call_the_session_makes():
    # The session calls what a view has (status, generating, step, placement, event): a wrapper
    # that lacks one silently drops the first line or the VLM's token count.
    import io

    from rich.console import Console

    from localora.cli.compose import _Silent, _Watch
    from localora.ui.live import LiveUI, PlainUI

    calls = ("event", "step", "placement", "status", "generating")
    for view in (PlainUI, LiveUI):
        assert all(callable(getattr(view, name, None)) for name in calls), view
    assert all(callable(getattr(_Silent(), name, None)) for name in calls)
    out = io.StringIO()
    watched = _Watch(PlainUI(Console(file=out)))
    assert all(callable(getattr(watched, name, None)) for name in calls)
    watched.status("run x, profile tiny")
    assert out.getvalue().startswith("localora: run x, profile tiny")
