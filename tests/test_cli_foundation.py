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
from support import one_error_line

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
    second = run(*args)
    assert second.exit_code == 0 and "cache" in second.output


def test_models_lists_profiles_and_availability():
    r = run("models")
    assert r.exit_code == 0, r.output
    assert "tiny" in r.output and "sdxl-realistic" in r.output
    assert "hf download stabilityai/stable-diffusion-xl-base-1.0" in r.output


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
