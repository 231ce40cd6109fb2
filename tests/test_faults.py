"""Issue 27, "unsafe corners found by a fault run" (items 15-21): file modes of every file localora
writes, a full disk while tiny models are built, a resumed run whose images/ were deleted, the
same LoRA under two names, `generate -o` over an existing file, read-only and full run folders,
and options checked before anything is written."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from localora.cli import main


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


# ------------------------------------------------------------------ 15: every file gets the umask's mode

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_tiny_models_and_demo_loras_get_the_umasks_mode(tmp_path, monkeypatch, umask):
    """safetensors' save_file writes 0600; a tiny build (here the CLIP and the SD1.5 demo LoRAs,
    which build tiny SD1.5 too) must leave every file 0666 & ~umask and every folder 0777 & ~umask."""
    from localora import tiny

    monkeypatch.setenv("LOCALORA_HOME", str(tmp_path))
    old = os.umask(umask)
    try:
        tiny.ensure("loras-sd15")
    finally:
        os.umask(old)
    found = modes(tmp_path / "tiny" / f"v{tiny.VERSION}")
    assert any(name.endswith(".safetensors") for name in found)
    wrong = {name: oct(mode) for name, mode in found.items()
             if mode != (0o777 if (tmp_path / "tiny" / f"v{tiny.VERSION}" / name).is_dir() else 0o666) & ~umask
             and not name.endswith(".lock")}
    assert wrong == {}


# ------------------------------------------------------------------ 16: a full home while tiny models are built

def _fills_the_disk(out: Path, seed: int) -> None:
    (out / "part.safetensors").write_bytes(b"x" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")  # no filename, as safetensors' writer raises it


@pytest.mark.parametrize("part", ["sdxl", "qwen2-vl", "clip"])
def test_a_full_home_while_a_tiny_model_is_built_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch, part):
    from localora import tiny
    from localora.errors import RuntimeFailure

    monkeypatch.setenv("LOCALORA_HOME", str(tmp_path))
    monkeypatch.setitem(tiny.BUILDERS, part, f"{__name__}:_fills_the_disk")
    with pytest.raises(RuntimeFailure) as e:
        tiny.ensure(part)
    line = str(e.value)
    assert "\n" not in line and str(tiny.root()) in line and "MB" in line and "no space left" in line
    assert f"{tiny.SIZES_MB[part]} MB" in line and "--out" not in line
    assert [p.name for p in tiny.root().iterdir() if ".tmp-" in p.name] == []
    assert not tiny.is_built(part)


# ------------------------------------------------------------------ 17: a resumed run puts back its few-shot images

def _events(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "events.jsonl").read_text(encoding="utf-8").splitlines() if line]


def _named_images(run: Path) -> set[str]:
    """Every run-folder image events.jsonl names: renders, the few-shot examples a fresh grid kept,
    and the pictures each VLM call saw."""
    named = set()
    for e in _events(run):
        if e["type"] == "render":
            named.add(e["image"])
        elif e["type"] == "fewshot" and not e["reused"]:
            named |= {k["image"] for k in e["kept"]}
        elif e["type"] == "vlm":
            named |= {p for p in e["images"] if not Path(p).is_absolute()}
    return named


def test_deleted_fewshot_images_are_put_back_on_resume(tmp_path):
    run = tmp_path / "run"
    # A prompt of its own: no other test's few-shot library is reused, so the examples are this run's renders.
    args = ["compose", "a fault run of deleted few-shot images", "-l", "demo-character", "-l", "demo-style",
            "-n", "1", "-c", "2", "--plain"]
    result = CliRunner().invoke(main, [*args, "--out", str(run)])
    assert result.exit_code == 0, result.output
    shots = next(e for e in _events(run) if e["type"] == "fewshot")
    assert not shots["reused"] and shots["kept"]
    named = _named_images(run)
    for png in (run / "images").glob("*.png"):
        png.unlink()
    result = CliRunner().invoke(main, ["compose", "--resume", str(run), "--plain"])
    assert result.exit_code == 0, result.output
    assert sorted(rel for rel in named if not (run / rel).is_file()) == []


# ------------------------------------------------------------------ 10: a finished run leaves no .lock

def test_a_finished_run_and_a_failed_one_leave_no_lock(tmp_path, monkeypatch):
    from localora.runs.folder import RunFolder

    run = tmp_path / "run"
    result = run_compose("x", "-n", "1", "-c", "1", "--no-fewshot", "--out", run)
    assert result.exit_code == 0, result.output
    assert not (run / ".lock").exists()

    def broken(self, rendered, rel=None):
        raise RuntimeError("a bug mid-run")

    monkeypatch.setattr(RunFolder, "save_image", broken)
    result = run_compose("x", "-n", "1", "-c", "1", "--no-fewshot", "--out", tmp_path / "failed")
    assert isinstance(result.exception, RuntimeError)
    assert (tmp_path / "failed" / "run.json").is_file() and not (tmp_path / "failed" / ".lock").exists()


def test_a_lock_removed_by_its_holder_is_never_held_twice(tmp_path):
    """A process that opened the lock file before its holder released (and removed) it must not
    hold the old file while a third process holds the new one."""
    from localora.files import hold_lock, release_lock

    path = tmp_path / ".lock"
    first = hold_lock(path)
    waiting = open(path, "a+")  # what a second hold_lock had opened when the first released
    release_lock(first, path)
    third = hold_lock(path)
    assert third is not None and path.read_text().strip() == str(os.getpid())
    assert hold_lock(path) is None  # the new file is held: nobody else gets it
    waiting.close()
    release_lock(third, path)
    assert not path.exists()


# ------------------------------------------------------------------ 20: read-only and full run folders

LORAS = ["-l", "demo-character", "-l", "demo-style"]


def run_compose(prompt, *args):
    return run("compose", prompt, *LORAS, "--plain", "--steps", "1", "--width", "32", "--height", "32", *args)


def test_a_read_only_out_exits_4_naming_the_file(tmp_path, monkeypatch):
    """As root, permissions do not stop a write: the read-only file system is what the kernel says."""
    import localora.runs.folder as folder

    def read_only(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(folder, "write_json", read_only)
    out = tmp_path / "ro"
    result = run_compose("x", "--out", out)
    assert result.exit_code == 4, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(out / "run.json") in lines[0] and "read-only" in lines[0]
    assert not (out / ".lock").exists()


def test_a_full_disk_mid_run_names_the_file_that_failed_not_the_report(tmp_path, monkeypatch):
    import localora.runs.report as report
    from localora.runs.folder import RunFolder

    def full(self, rendered, rel=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "images" / "x.png"))

    def report_full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(RunFolder, "save_image", full)
    monkeypatch.setattr(report, "atomic_write", report_full)
    out = tmp_path / "full"
    result = run_compose("x", "-n", "1", "-c", "1", "--no-fewshot", "--out", out)
    assert result.exit_code == 4, result.output
    line = result.output.strip().splitlines()[-1]
    assert str(out / "images" / "x.png") in line and "no space left" in line and "report.html" not in line


# ------------------------------------------------------------------ 21: every option checked before anything is written

@pytest.mark.parametrize("args, fragment", [
    (["--guidance", "nan"], "--guidance nan"),
    (["--width", "65"], "65x"),
    (["--temperature", "nan"], "--temperature nan"),
    (["--fewshot-levels", "nan,0.5"], "--fewshot-levels nan,0.5"),
    (["--fewshot-levels", "0.4,2.5"], "within the bounds 0..1.5"),
    (["--fewshot-threshold", "nan"], "--fewshot-threshold nan"),
])
def test_a_bad_option_is_refused_before_the_run_folder_exists(tmp_path, args, fragment):
    from support import one_error_line

    out = tmp_path / "run"
    one_error_line(run("compose", "x", *LORAS, "--out", out, *args), fragment)
    assert not out.exists()
    # nothing blocks the same --out once the option is fixed (and nothing is left to --resume)
    assert run("compose", "--resume", out).exit_code != 0


# ------------------------------------------------------------------ 18: LoRAs told apart by content and by name

def _copy_lora(source: Path, target: Path, output_name: str | None = None, nudge: bool = False) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), "pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if output_name is not None:
        metadata["ss_output_name"] = output_name
    if nudge:  # another epoch of the same run: other numbers
        key = sorted(tensors)[0]
        tensors[key] = tensors[key] * 0.5
    save_file(tensors, str(target), metadata=metadata)
    return target


def test_the_same_lora_contents_under_two_file_names_is_refused_naming_both(demo_loras, tmp_path):
    from support import one_error_line

    style = next(lo.path for lo in demo_loras["sdxl"] if lo.name == "demo-style")
    a, b = tmp_path / "style.safetensors", tmp_path / "style-copy.safetensors"
    a.write_bytes(style.read_bytes())
    b.write_bytes(style.read_bytes())
    result = run("generate", "x", "-l", a, "-l", b, "-o", tmp_path / "out.png", "--steps", "1")
    one_error_line(result, str(a), str(b), "same contents")
    assert not (tmp_path / "out.png").exists()


def test_two_epochs_sharing_ss_output_name_are_named_by_their_files(demo_loras, tmp_path):
    from localora.cli.options import resolve_loras
    from localora.profiles import load_profile

    style = next(lo.path for lo in demo_loras["sdxl"] if lo.name == "demo-style")
    a = _copy_lora(style, tmp_path / "hero-000005.safetensors", "hero")
    b = _copy_lora(style, tmp_path / "hero-000010.safetensors", "hero", nudge=True)
    choices = resolve_loras(load_profile("tiny"), (str(a), str(b)), ())
    assert [c.lora.name for c in choices] == ["hero-000005", "hero-000010"]
    assert [c.lora.path for c in choices] == [a.resolve(), b.resolve()]


# ------------------------------------------------------------------ 19: generate -o never overwrites by surprise

@pytest.mark.parametrize("name", ["keep.png", "photo.jpg"])
def test_generate_refuses_an_existing_out_unless_force(demo_loras, tmp_path, name):
    from support import one_error_line

    out = tmp_path / name
    out.write_bytes(b"the user's own file")
    args = ["generate", "x", "-l", "demo-style", "--steps", "1", "--width", "32", "--height", "32", "-o", out]
    one_error_line(run(*args), str(out), "exists", "--force")
    assert out.read_bytes() == b"the user's own file"
    result = run(*args, "--force")
    assert result.exit_code == 0, result.output
    assert out.read_bytes() != b"the user's own file"


def test_generate_refuses_an_out_that_is_no_image_format(tmp_path):
    from support import one_error_line

    one_error_line(run("generate", "x", "-l", "demo-style", "-o", tmp_path / "notes.txt"), "notes.txt", ".txt")


def test_generate_without_out_writes_beside_an_existing_render_png(demo_loras, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "render.png").write_bytes(b"an earlier render")
    result = run("generate", "x", "-l", "demo-style", "--steps", "1", "--width", "32", "--height", "32")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "render.png").read_bytes() == b"an earlier render"
    assert (tmp_path / "render-2.png").read_bytes().startswith(b"\x89PNG") and "render-2.png" in result.output


# ------------------------------------------------------------------ item 9: models and pull say it once, truly

def test_models_says_once_per_profile_how_to_fetch_it_and_pull_tiny_says_already_built(tmp_path):
    result = run("models", env={"HF_HOME": str(tmp_path / "empty-hf"), "HF_HUB_CACHE": str(tmp_path / "empty-hf")})
    assert result.exit_code == 0, result.output
    assert "PROFILE" not in result.output
    assert result.output.count("localora pull") == result.output.count("fetch its models once with")
    profile = None
    for line in result.output.splitlines():
        if line and not line.startswith(" ") and ": " in line:
            profile = line.split(":", 1)[0]
        elif line.startswith("  fetch its models once with: "):
            assert line.endswith(f"localora pull {profile}"), line  # the real command, with its name
        elif line.startswith("  "):
            assert len(line) < 100 and "localora pull" not in line, line  # one model, one short line
    assert "fetch its models once with: localora pull" in result.output  # the hub profiles are not downloaded here
    first = run("pull", "tiny")
    assert first.exit_code == 0, first.output
    again = run("pull", "tiny")
    assert "already built" in again.output and ": built " not in again.output
