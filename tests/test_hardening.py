"""Issue 16, "wrong or unsafe" and "config that lies": files get the umask's mode, LoRA files that
lie about what they hold, pickle-free model loading, config files that are checked when read,
and a demo that opens no network connection. Every bad input is one error line."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from localora.cli import main
from support import DEMO_CONFIG, DEMO_CWD, DEMO_NETWORK_LOG, no_network_env, one_error_line


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


# ------------------------------------------------------------------ file modes

@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_get_the_mode_the_umask_gives(tmp_path, umask):
    from localora.files import atomic_write, write_json

    old = os.umask(umask)
    try:
        write_json(tmp_path / "run.json", {"a": 1})
        atomic_write(tmp_path / "images" / "x.png", lambda p: Image.new("RGB", (4, 4)).save(p))
        plain = tmp_path / "plain.txt"
        plain.write_text("as open() makes it")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for name in ("run.json", "images/x.png", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name


# ------------------------------------------------------------------ LoRA files that lie

SMALL = ["--steps", "1", "--width", "32", "--height", "32"]


def gen(lora, tmp_path, profile="tiny"):
    return run("generate", "x", "-p", profile, "-l", lora, "-o", tmp_path / "out.png", *SMALL)


def _demo_tensors(demo_loras, arch="sdxl"):
    from safetensors.torch import load_file

    return load_file(str(next(lo.path for lo in demo_loras[arch] if lo.name == "demo-style")))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_lora_with_nan_or_inf_tensors_is_one_line_at_inspect(demo_loras, tmp_path, value):
    from safetensors.torch import save_file

    tensors = _demo_tensors(demo_loras)
    key = sorted(k for k in tensors if "lora_A" in k)[3]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[5] = float(value)
    bad = tmp_path / "poisoned.safetensors"
    save_file(tensors, str(bad))
    one_error_line(run("loras", "inspect", bad), str(bad), key, "NaN/Inf")
    if value == "inf":  # before the render loads it, not after a black render
        one_error_line(gen(bad, tmp_path), str(bad), key, "NaN/Inf")
        assert not (tmp_path / "out.png").exists()


def test_the_finite_check_reads_a_file_once_per_content(demo_loras, tmp_path, monkeypatch):
    from localora.diffusion import loras

    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(next(lo.path for lo in demo_loras["sdxl"] if lo.name == "demo-style").read_bytes())
    reads = []
    real = loras._first_nonfinite
    monkeypatch.setattr(loras, "_first_nonfinite", lambda p: reads.append(p) or real(p))
    loras._NONFINITE.clear()
    loras.inspect(copy)
    loras.inspect(copy)
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(copy.read_bytes())
    loras.inspect(renamed)
    assert reads == [copy]


def test_mismatched_up_down_ranks_are_one_line(demo_loras, tmp_path):
    import torch
    from safetensors.torch import save_file

    tensors = _demo_tensors(demo_loras)
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 2)
    bad = tmp_path / "ranks.safetensors"
    save_file(tensors, str(bad))
    one_error_line(run("loras", "inspect", bad), str(bad), "mismatched ranks", key, "rank 6", "rank 4")
    one_error_line(gen(bad, tmp_path), str(bad), "mismatched ranks")
    del tensors[key]
    save_file(tensors, str(bad))
    one_error_line(run("loras", "inspect", bad), str(bad), f"no matching {key}")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_a_pickle_renamed_safetensors_says_so_unopened(tmp_path, how):
    import pickle

    import torch

    marker = tmp_path / "unpickled"
    f = tmp_path / "lora.safetensors"
    if how == "torch.save":
        torch.save({"w": torch.zeros(2), "payload": _Payload(str(marker))}, f)
        assert f.read_bytes()[:4] == b"PK\x03\x04"
    else:
        f.write_bytes(pickle.dumps(_Payload(str(marker)), protocol=4))
    for result in (run("loras", "inspect", f), gen(f, tmp_path)):
        one_error_line(result, str(f), "this is a pickle, not safetensors")
    assert not marker.exists()


def _lora_file(path: Path, pairs: dict[str, tuple[int, int]], kohya: bool = False) -> Path:
    """A LoRA with one (down, up) pair per module name: (in, out) widths, rank 4."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for name, (width_in, width_out) in pairs.items():
        down, up = (".lora_down.weight", ".lora_up.weight") if kohya else (".lora_A.weight", ".lora_B.weight")
        tensors[name + down] = torch.zeros(4, width_in)
        tensors[name + up] = torch.zeros(width_out, 4)
    save_file(tensors, str(path))
    return path


FOREIGN = {
    "flux-diffusers": ("Flux.1", {"transformer.single_transformer_blocks.0.attn.to_k": (64, 64)}, False),
    "flux-kohya": ("Flux.1", {"lora_unet_double_blocks_0_img_attn_qkv": (64, 192)}, True),
    "sd3-diffusers": ("SD3", {"transformer.transformer_blocks.0.ff_context.net.0.proj": (64, 256)}, False),
    "sd3-kohya": ("SD3", {"lora_unet_joint_blocks_0_context_block_attn_qkv": (64, 192)}, True),
    "sd2": ("SD2", {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (1024, 320)}, False),
}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_flux_sd3_and_sd2_loras_are_recognised(tmp_path, kind):
    base, pairs, kohya = FOREIGN[kind]
    f = _lora_file(tmp_path / f"{kind}.safetensors", pairs, kohya)
    r = run("loras", "inspect", f)
    assert r.exit_code == 0, r.output
    assert f"base      {base} (" in r.output


@pytest.mark.parametrize("kind,profile,ours", [("flux-diffusers", "tiny", "SDXL"), ("sd3-kohya", "tiny", "SDXL"),
                                               ("sd2", "tiny-sd15", "SD1.5")])
def test_a_foreign_base_lora_is_one_line_naming_both_bases(tmp_path, kind, profile, ours):
    base, pairs, kohya = FOREIGN[kind]
    f = _lora_file(tmp_path / f"{kind}.safetensors", pairs, kohya)
    # Flux.1 is a base localora renders (issue 23): the line says which profile to use instead.
    fix = "use a profile with a Flux.1 base" if base == "Flux.1" else "localora renders SDXL, SD1.5, Flux.1, Z-Image"
    one_error_line(gen(f, tmp_path, profile), str(f), f"{base} LoRA", f"profile's base is {ours}", fix)


# ------------------------------------------------------------------ safetensors only, for models too

def _models_toml(tmp_path, old: str, new: str) -> dict[str, str]:
    from localora import paths

    text = paths.models_toml().read_text()
    assert old in text
    changed = tmp_path / "models.toml"
    changed.write_text(text.replace(old, new, 1))
    return {"LOCALORA_MODELS": str(changed)}


def _pickled_copy(part: str, weights: str, tmp_path) -> tuple[Path, Path]:
    """A copy of a tiny model folder whose `weights` safetensors file is now a torch.save .bin (with
    a payload that would leave a marker file if it were ever unpickled); (folder, marker)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from localora import tiny

    folder = tmp_path / f"{part}-bin"
    shutil.copytree(tiny.ensure(part), folder)
    marker = tmp_path / "unpickled"
    safetensors = folder / weights
    bin_name = {"model.safetensors": "pytorch_model.bin"}.get(safetensors.name, safetensors.stem + ".bin")
    torch.save({**load_file(str(safetensors)), "payload": _Payload(str(marker))}, safetensors.with_name(bin_name))
    safetensors.unlink()
    return folder, marker


BIN_ONLY = {  # tiny part: (its weights file, the command that loads it, what the line names)
    "sdxl": ("unet/diffusion_pytorch_model.safetensors", ["generate", "x", "-l", "{style}", "-o", "{out}", *SMALL],
             ["unet/diffusion_pytorch_model.bin", "localora loads only safetensors"]),
    "qwen2-vl": ("model.safetensors", ["ask", "what is it?", "--image", "{image}"],
                 ["VLM", "pytorch_model.bin", "localora loads only safetensors"]),
    "clip": ("open_clip_model.safetensors", ["score", "{image}", "--prompt", "a cat"], ["safetensors"]),
}


@pytest.mark.parametrize("part", list(BIN_ONLY))
def test_a_model_folder_with_only_bin_weights_is_one_line_never_unpickled(tmp_path, demo_loras, part):
    weights, command, fragments = BIN_ONLY[part]
    folder, marker = _pickled_copy(part, weights, tmp_path)
    env = _models_toml(tmp_path, f'source = "tiny:{part}"', f'source = "{folder}"')
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    style = next(lo.path for lo in demo_loras["sdxl"] if lo.name == "demo-style")
    args = [a.format(style=style, out=tmp_path / "out.png", image=tmp_path / "a.png") for a in command]
    one_error_line(run(*args, env=env), str(folder), *fragments)
    assert not marker.exists()


# ------------------------------------------------------------------ config that lies

@pytest.mark.parametrize("old,kind,wanted", [('source = "tiny:sdxl"', "diffusion", "model_index.json"),
                                             ('source = "tiny:qwen2-vl"', "vlm", "config.json"),
                                             ('source = "tiny:clip"', "clip", "open_clip_config.json")])
def test_an_empty_folder_as_source_is_not_ok(tmp_path, old, kind, wanted):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run("models", env=_models_toml(tmp_path, old, f'source = "{empty}"'))
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.strip().startswith(kind) and str(empty) in ln)
    assert f"missing: {empty} has no {wanted}" in line and " ok" not in line


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+inf"])
def test_guidance_that_is_not_finite_is_refused_when_read(tmp_path, value):
    env = _models_toml(tmp_path, "guidance = ", f"guidance = {value} #")
    one_error_line(run("models", env=env), "models.toml", "[diffusion.tiny-sdxl]", "'guidance' must be float")


def test_a_misspelt_top_level_table_names_the_key_and_file(tmp_path):
    env = _models_toml(tmp_path, "[profiles.tiny]\n", '[profile.mine]\ndiffusion = "tiny-sdxl"\n\n[profiles.tiny]\n')
    one_error_line(run("models", env=env), env["LOCALORA_MODELS"], "unknown key(s) profile", "profiles")


# ------------------------------------------------------------------ the LoRA catalog

@pytest.mark.parametrize("line,key", [('trigger = "my hero"', "trigger"), ('categroy = "style"', "categroy")])
def test_a_catalog_key_that_is_not_known_names_the_key_entry_and_file(tmp_path, demo_loras, line, key):
    style = next(lo.path for lo in demo_loras["sdxl"] if lo.name == "demo-style")
    cat = tmp_path / "cat.toml"
    cat.write_text(f'[loras.hero]\nfile = "{style}"\n{line}\n')
    one_error_line(run("generate", "x", "--catalog", cat, "-l", "hero", *SMALL), str(cat), "[loras.hero]",
                   f"unknown key(s) {key}", "triggers")


def test_a_catalog_entry_without_triggers_keeps_the_files_own(tmp_path, demo_loras):
    from localora.diffusion import loras

    character = next(lo.path for lo in demo_loras["sdxl"] if lo.name == "demo-character")
    cat = tmp_path / "cat.toml"
    cat.write_text(f'[loras.hero]\nfile = "{character}"\ncategory = "character"\n')
    hero = loras.find_lora("hero", loras.read_catalog(cat), None, "--lora hero")
    assert (hero.name, hero.category, hero.triggers) == ("hero", "character", "demo character, red hair")
    cat.write_text('loras_dir = "x"\n')
    with pytest.raises(loras.LocaloraError, match="unknown key.*loras_dir"):
        loras.read_catalog(cat)


# ------------------------------------------------------------------ the user's config.toml

@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    folder = tmp_path / "config"
    folder.mkdir()
    monkeypatch.setenv("LOCALORA_CONFIG", str(folder))
    return folder


@pytest.mark.parametrize("text,fragments", [
    ('default_profil = "tiny"', ["unknown key(s) default_profil", "default_profile"]),
    ("default_profile = 3", ["default_profile must be a profile name"]),
    ('default_profile = "nope"', ["default_profile 'nope' is not a profile of", "models.toml", "tiny-sd15"]),
    ('bounds = "0;1.5"', ["bounds must be MIN,MAX", "'0;1.5'"]),
    ("bounds = [1.5, 0]", ["bounds must be MIN,MAX", "[1.5, 0]"]),
    ("bounds = [0, inf]", ["bounds must be MIN,MAX"]),
    ("bounds = [0, true]", ["bounds must be MIN,MAX"]),
    ("out = 3", ["out must be a folder path"]),
    ('lora_dirs = "~/loras"', ["lora_dirs must be a list of folder paths"]),
])
def test_a_bad_config_toml_is_one_line_naming_the_key_and_file(config_dir, text, fragments):
    (config_dir / "config.toml").write_text(text + "\n")
    one_error_line(run("models"), str(config_dir / "config.toml"), *fragments)


def test_config_toml_sets_the_default_profile_bounds_and_run_parent(config_dir, demo_loras):
    from localora import profiles
    from localora.cli.options import run_parent, weight_bounds

    (config_dir / "config.toml").write_text('default_profile = "tiny-sd15"\nbounds = [0, 0.5]\nout = "my-runs"\n')
    r = run("models")
    assert r.exit_code == 0, r.output
    assert "(default: tiny-sd15)" in r.output
    assert (f"your defaults: {config_dir / 'config.toml'} (default_profile = tiny-sd15; bounds = 0,0.5; "
            f"out = {config_dir / 'my-runs'})") in r.output
    assert profiles.load_profile().name == "tiny-sd15"
    assert (weight_bounds(None), weight_bounds("0,2")) == ((0.0, 0.5), (0.0, 2.0))
    assert run_parent() == config_dir / "my-runs"
    # compose takes the bounds when --bounds is not given: a start weight of 0.9 is now outside them.
    one_error_line(run("compose", "x", "-l", "demo-style:0.9", "-l", "demo-character"), "within the bounds 0..0.5")
    (config_dir / "config.toml").write_text('bounds = "0,1.2"\n')
    assert weight_bounds(None) == (0.0, 1.2)
    (config_dir / "config.toml").unlink()
    assert (weight_bounds(None), run_parent(), profiles.load_profile().name) == ((0.0, 1.5), Path("runs"), "tiny")
    assert "your defaults: " in run("models").output and "(not there)" in run("models").output


# ------------------------------------------------------------------ no network



def test_a_full_demo_opens_no_network_connection(demo, tmp_path):
    """The conftest demo's two runs (a first run in a clean home, which builds the tiny models, then
    one that reuses them) ran in subprocesses whose sockets cannot connect, without HF_HUB_OFFLINE
    or TRANSFORMERS_OFFLINE (the libraries must not need them to stay off the network). The second
    run's config.toml sets out, so its folder also shows that out is the parent of run folders."""
    import subprocess
    import sys

    # The guard works: a connect from a subprocess set up as the demo's were is refused and logged.
    log = tmp_path / "network.log"
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 9))"],
                           env=no_network_env(tmp_path / "site", log), cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
    assert probe.returncode != 0 and "network blocked" in probe.stderr
    assert log.read_text().startswith("create_connection ('127.0.0.1', 9)")

    home, first, second = demo
    root = home.parent
    assert not (root / DEMO_NETWORK_LOG).exists(), (root / DEMO_NETWORK_LOG).read_text()
    assert second.parent == root / DEMO_CONFIG / "demo-runs"
    assert not (root / DEMO_CWD / "runs").exists()
    from localora.files import current_umask

    for run_dir in (first, second):
        assert (run_dir / "final.png").is_file() and (run_dir / "report.html").is_file()
        modes = {stat.S_IMODE(p.stat().st_mode) for p in run_dir.rglob("*") if p.is_file()}
        assert modes == {0o666 & ~current_umask()}  # every file of the run folder, as a teammate needs it
