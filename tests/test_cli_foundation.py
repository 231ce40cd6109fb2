"""The generate, models and loras commands, and bad input: one clear line, no traceback."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from localora.cli import main
from support import BUILDING, one_error_line

SMALL = ["--steps", "2", "--width", "32", "--height", "32"]


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def test_generate_writes_an_image_then_serves_it_from_cache(tmp_path):
    out = tmp_path / "a.png"
    args = ["generate", "a cat", "-l", "demo-character:0.8", "-l", "demo-clothing", "-l", "demo-style:-0.3",
            "--method", "switch", "--switch-every", "1", "-o", out, *SMALL]
    first = run(*args)
    assert first.exit_code == 0, first.output
    assert Image.open(out).size == (32, 32)
    second = run(*args, "--force")  # -o names the file the first run wrote (refused without --force)
    assert second.exit_code == 0 and "cache" in second.output


def test_models_lists_profiles_and_availability():
    r = run("models")
    assert r.exit_code == 0, r.output
    assert "tiny" in r.output and "sdxl-realistic" in r.output
    assert "localora pull sdxl-realistic" in r.output


def test_loras_inspect_prints_format_base_rank_and_triggers(demo_loras):
    path = next(lo.path for lo in demo_loras["sdxl"] if lo.name == "demo-clothing")
    r = run("loras", "inspect", path)
    assert r.exit_code == 0, r.output
    for fragment in ("kohya-ss", "SDXL", "rank      4", "scale 0.5", "demo clothing, blue jacket"):
        assert fragment in r.output


def gen(*loras, profile="tiny", env=None):
    args = ["generate", "x", "-p", profile, "-o", "/tmp/localora-test-unused.png", *SMALL]
    for lo in loras:
        args += ["-l", lo]
    return run(*args, env=env)


def test_missing_lora_file(tmp_path):
    one_error_line(gen(tmp_path / "nope.safetensors"), "nope.safetensors", "not found")


def test_catalog_entry_whose_file_is_missing(tmp_path):
    cat = tmp_path / "cat.toml"
    cat.write_text('[loras.gone]\nfile = "missing.safetensors"\ncategory = "style"\n')
    result = run("generate", "x", "--catalog", cat, "-l", "gone", "-o", tmp_path / "x.png", *SMALL)
    one_error_line(result, "missing.safetensors", "catalog entry 'gone'")
    cat.write_text('[loras.pickled]\nfile = "old.ckpt"\n')
    one_error_line(run("generate", "x", "--catalog", cat, "-l", "pickled", *SMALL), "old.ckpt", "pickle")


def test_corrupt_and_truncated_safetensors(tmp_path, demo_loras):
    truncated = tmp_path / "trunc.safetensors"
    data = demo_loras["sdxl"][0].path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    one_error_line(gen(truncated), "trunc.safetensors", "corrupt")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    one_error_line(gen(garbage), "garbage.safetensors")


def test_non_lora_safetensors(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"conv.weight": torch.zeros(4, 4)}, str(f))
    one_error_line(gen(f), "model.safetensors", "not a LoRA")


def test_sd15_lora_on_sdxl_profile(demo_loras, tmp_path):
    declared = next(lo.path for lo in demo_loras["sd15"] if lo.name == "demo-character")
    one_error_line(gen(declared), "SD1.5 LoRA", "SDXL")
    # With no metadata or sidecar, the shapes themselves do not fit.
    silent = tmp_path / "silent.safetensors"
    silent.write_bytes(next(lo.path for lo in demo_loras["sd15"] if lo.name == "demo-style").read_bytes())
    one_error_line(gen(silent), "silent.safetensors", "does not fit")


@pytest.mark.parametrize("weight", ["abc", "inf", "nan"])
def test_bad_weights(weight):
    one_error_line(gen(f"demo-style:{weight}"), "weight")


def test_unknown_profile():
    one_error_line(gen("demo-style", profile="nope"), "unknown profile 'nope'")


def test_malformed_models_toml(tmp_path):
    bad = tmp_path / "models.toml"
    bad.write_text("[profiles.tiny\ndiffusion = ")
    one_error_line(gen("demo-style", env={"LOCALORA_MODELS": str(bad)}), str(bad), "not valid TOML")
    bad.write_text('default_profile = "tiny"\n[profiles.tiny]\ndiffusion = "x"\nvlm = "y"\nclip = "z"\n')
    one_error_line(gen("demo-style", env={"LOCALORA_MODELS": str(bad)}), "diffusion 'x' is not defined")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickled_loras_are_refused_unopened(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    f = tmp_path / f"lora{suffix}"
    f.write_bytes(pickle.dumps(_Payload(str(marker))))
    one_error_line(gen(f), "pickle", ".safetensors")
    assert not marker.exists()


# ------------------------------------------------------------------ inputs that fight back (issue 17, in part)

def test_a_lora_with_nan_fails_the_render_and_is_never_cached(demo_loras, tmp_path):
    from safetensors.torch import load_file

    from localora import paths

    source = next(lo.path for lo in demo_loras["sdxl"] if lo.name == "demo-style")
    tensors = load_file(str(source))
    key = next(k for k in tensors if "lora_B" in k or "lora_up" in k)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    poisoned = tmp_path / "poisoned.safetensors"
    save_file(tensors, str(poisoned))
    cache = paths.render_cache_dir()
    before = set(cache.rglob("*.png")) if cache.exists() else set()
    result = run("generate", "x", "-l", str(poisoned), "-o", tmp_path / "out.png", *SMALL)
    one_error_line(result, "NaN/Inf", str(poisoned))
    assert not (tmp_path / "out.png").exists()
    assert (set(cache.rglob("*.png")) if cache.exists() else set()) == before


def test_a_decompression_bomb_is_one_line(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 M pixels in a small file
    one_error_line(run("score", bomb, "--prompt", "a cat"), "bomb.png", "pixels")


def test_a_negative_temperature_is_refused():
    result = run("compose", "x", "-l", "demo-style", "-l", "demo-character", "--temperature", "-1")
    assert result.exit_code == 2 and "--temperature" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("bad", ["../../../../escaped", "/abs", ".hidden", "a/b", "x\u0000y"])
def test_testbed_ids_that_would_escape_the_bench_folder_are_refused(bad, tmp_path):
    bed = tmp_path / "bed.toml"
    bed.write_text('name = "t"\nprofile = "tiny"\nprompt = "p"\n'
                   f'[[lora]]\nid = {json.dumps(bad)}\ncategory = "character"\nfile = "c.safetensors"\ntriggers = "c"\n'
                   '[[lora]]\nid = "s"\ncategory = "style"\nfile = "s.safetensors"\ntriggers = "s"\n')
    out = tmp_path / "out"
    one_error_line(run("bench", "--testbed", bed, "--methods", "merge", "--elements", "2", "--out", out), "must be letters")
    assert not out.exists() and not (tmp_path.parent / "escaped").exists()


def _models_toml(tmp_path, old: str, new: str):
    from localora import paths

    text = paths.models_toml().read_text()
    assert old in text
    changed = tmp_path / "models.toml"
    changed.write_text(text.replace(old, new, 1))
    return {"LOCALORA_MODELS": str(changed)}


@pytest.mark.parametrize("old,new,fragments", [
    ('source = "tiny:sdxl"', 'source = "tiny:sdxxl"', ["no tiny diffusion model 'tiny:sdxxl'", "tiny:sdxl"]),
    ('source = "tiny:qwen2-vl"', 'source = "tiny:clip"', ["no tiny vlm model 'tiny:clip'"]),
    ('min_pixels = ', 'min_pixels = 99999999 #', ["min_pixels 99999999", "max_pixels"]),
    ('guidance = ', 'guidance = nan #', ["'guidance' must be float"]),
])
def test_models_toml_that_would_crash_at_first_use_is_refused_when_read(tmp_path, old, new, fragments):
    env = _models_toml(tmp_path, old, new)
    one_error_line(run("models", env=env), "models.toml", *fragments)
    one_error_line(gen("demo-style", env=env), "models.toml", *fragments)


def test_a_device_that_does_not_exist_is_refused_when_read(tmp_path):
    env = _models_toml(tmp_path, "[profiles.tiny]\n", '[profiles.tiny]\ndevice = "tpu"\n')
    one_error_line(run("models", env=env), "[profiles.tiny]", "device 'tpu'")
    env = _models_toml(tmp_path, "[profiles.tiny]\n", '[profiles.tiny]\ndevice = "cuda:7"\n')
    if not torch.cuda.is_available():
        one_error_line(gen("demo-style", env=env), "device 'cuda:7'", "no such CUDA device")


def test_a_testbed_naming_an_unknown_tiny_folder_is_refused(tmp_path):
    bed = tmp_path / "bed.toml"
    bed.write_text('name = "t"\nprofile = "tiny"\nprompt = "p"\nlora_dir = "tiny:nope"\n'
                   '[[lora]]\nid = "c"\ncategory = "character"\nfile = "c.safetensors"\ntriggers = "c"\n'
                   '[[lora]]\nid = "s"\ncategory = "style"\nfile = "s.safetensors"\ntriggers = "s"\n')
    one_error_line(run("bench", "--testbed", bed, "--methods", "merge", "--elements", "2", "--out", tmp_path / "o"),
                   str(bed), "lora_dir", "tiny:nope", "tiny:loras-sdxl")


def test_the_same_lora_twice_is_refused(demo_loras):
    style = next(lo.path for lo in demo_loras["sdxl"] if lo.name == "demo-style")
    one_error_line(run("generate", "x", "-l", "demo-style", "-l", "demo-style:0.5", *SMALL),
                   "--lora demo-style and --lora demo-style:0.5", "same LoRA file")
    one_error_line(run("compose", "x", "-l", "demo-style", "-l", style, "-l", "demo-character"),
                   f"--lora {style}", "same LoRA file")


def test_stale_temporaries_in_the_render_cache_are_removed_fresh_ones_kept(sdxl_renderer):
    import os
    import time

    from localora.diffusion.render import Renderer

    folder = sdxl_renderer.cache_dir / "v2" / "ab"
    folder.mkdir(parents=True, exist_ok=True)
    stale, fresh = folder / ".tmp-killed.png", folder / ".tmp-in-flight.png"
    stale.write_bytes(b"half a png")
    fresh.write_bytes(b"another process, writing now")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    Renderer(sdxl_renderer.profile, sdxl_renderer.devices)
    assert not stale.exists() and fresh.exists()
    fresh.unlink()


# ------------------------------------------------------------------ the home and output folders

def _cli(*args, home, limit_bytes=None):
    """The CLI in a subprocess with LOCALORA_HOME=home; `limit_bytes` caps every file it writes, as
    a full disk does (RLIMIT_FSIZE applies to root too, and Python ignores SIGXFSZ)."""
    import os
    import resource
    import subprocess
    import sys

    def cap():
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "LOCALORA_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "localora", *map(str, args)], env=env, capture_output=True,
                          text=True, preexec_fn=cap, timeout=600)


def _one_line(proc, *fragments):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("warning", BUILDING))]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def _warm_home(tmp_path):
    import shutil

    from localora import paths, tiny

    for part in ("sdxl", "loras-sdxl"):
        tiny.ensure(part)
    home = tmp_path / "home"
    shutil.copytree(paths.home() / "tiny", home / "tiny")
    return home


def test_a_home_that_is_a_file_is_one_line(tmp_path):
    home = tmp_path / "home-file"
    home.write_text("not a folder")
    _one_line(_cli("generate", "x", "-l", "demo-style", "-o", tmp_path / "a.png", *SMALL, home=home),
              str(home), "LOCALORA_HOME")


def test_a_full_disk_under_the_home_is_one_line_and_keeps_what_was_written(tmp_path):
    home = _warm_home(tmp_path)
    args = ("generate", "x", "-l", "demo-style", *SMALL)
    # The run that fills the cache needs no cap: in process (a subprocess costs the imports again).
    ok = run(*args, "-o", tmp_path / "a.png", "--seed", "1", env={"LOCALORA_HOME": str(home)})
    assert ok.exit_code == 0, ok.output
    full = _cli(*args, "-o", tmp_path / "b.png", "--seed", "2", home=home, limit_bytes=200)
    _one_line(full, str(home), "file size limit", "LOCALORA_HOME")
    assert not (tmp_path / "b.png").exists() and not list(home.rglob(".tmp-*"))
    assert Image.open(tmp_path / "a.png").size == (32, 32)


def test_a_full_disk_under_the_output_folder_is_one_line(tmp_path):
    home = _warm_home(tmp_path)
    args = ("generate", "x", "-l", "demo-style", *SMALL, "--seed", "3")
    warm = run(*args, "-o", tmp_path / "warm.png", env={"LOCALORA_HOME": str(home)})  # in process: no cap needed
    assert warm.exit_code == 0, warm.output  # now a cache hit
    out = tmp_path / "out"
    out.mkdir()
    # A bigger cap than the cache needs (nothing is written there now) but less than the PNG.
    _one_line(_cli(*args, "-o", out / "b.png", home=home, limit_bytes=100), str(out), "--out")


def test_a_read_only_home_is_one_line(tmp_path):
    import os

    home = _warm_home(tmp_path)
    for folder in (home, *home.rglob("*")):
        if folder.is_dir():
            folder.chmod(0o555)
    try:
        try:
            (home / "probe").write_text("")
            pytest.skip("this user writes through read-only permissions (root)")
        except PermissionError:
            pass
        _one_line(_cli("generate", "x", "-l", "demo-style", "-o", tmp_path / "a.png", *SMALL, home=home),
                  str(home), "permission denied", "LOCALORA_HOME")
        empty = tmp_path / "empty"
        empty.mkdir(mode=0o555)
        _one_line(_cli("generate", "x", "-l", "demo-style", "-o", tmp_path / "a.png", *SMALL, home=empty),
                  str(empty), "permission denied", "LOCALORA_HOME")
    finally:
        for folder in (home, *home.rglob("*")):
            if folder.is_dir():
                os.chmod(folder, 0o755)
