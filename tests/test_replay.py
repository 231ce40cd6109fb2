"""Reading a render back from its PNG: `generate --from` and `export --to lora`."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from localora.cli import main
from localora.export import read_source
from localora.files import file_hash
from support import one_error_line

SMALL = ("--steps", "2", "--width", "32", "--height", "32")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])  # .output: stdout and stderr, .stderr alone


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A Merge and a Switch render written by `generate -o`, trigger words appended."""
    out = tmp_path_factory.mktemp("made")
    merge, switch = out / "merge.png", out / "switch.png"
    for path, extra in ((merge, ()), (switch, ("--method", "switch", "--switch-every", "1"))):
        result = run("generate", "a girl, garden", "-l", "demo-character:0.6", "-l", "demo-style:1.2",
                     "--seed", "3", *SMALL, *extra, "-o", path)
        assert result.exit_code == 0, result.output
    return merge, switch


@pytest.mark.parametrize("which", [0, 1])
def test_generate_from_a_localora_png_renders_the_same_image(made, tmp_path, which):
    source = made[which]
    again = tmp_path / "again.png"
    result = run("generate", "--from", source, "-o", again)
    assert result.exit_code == 0, result.output
    assert "cache" in result.output  # the same job, to the last setting: the same cache key
    assert again.read_bytes() == source.read_bytes()
    assert read_source(again).info == read_source(source).info


def test_generate_from_finds_the_loras_by_sha256_in_a_lora_folder(made, demo_loras, tmp_path):
    # Outside the tiny catalog's names: the files, renamed, in an A1111-style folder.
    folder = tmp_path / "models" / "Lora" / "sub"
    folder.mkdir(parents=True)
    info = read_source(made[0]).info
    by_hash = {file_hash(lo.path): lo for lo in demo_loras["sdxl"]}
    for x in info.loras:
        shutil.copyfile(by_hash[x.sha256].path, folder / x.file)
    result = run("generate", "--from", made[0], "--lora-dir", tmp_path / "models", "-o", tmp_path / "b.png")
    assert result.exit_code == 0, result.output
    assert np.array_equal(pixels(tmp_path / "b.png"), pixels(made[0]))


def test_generate_from_a_stock_a1111_png_resolves_its_tags(made, demo_loras, tmp_path):
    folder = tmp_path / "ComfyUI" / "models" / "loras"
    folder.mkdir(parents=True)
    for lo in demo_loras["sdxl"][:2]:
        shutil.copyfile(lo.path, folder / lo.path.name)
    stock = tmp_path / "stock.png"
    text = ("a girl, garden, <lora:demo-character:0.6> <lora:demo-clothing:1.1>\nNegative prompt: blurry\n"
            "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4.5, Seed: 11, Size: 32x32, "
            "Model: sd_xl_base_1.0, Lora hashes: \"demo-character: 000000000000\", Version: v1.10.1")
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (32, 32)).save(stock, pnginfo=info)
    result = run("generate", "--from", stock, "--lora-dir", folder, "-o", tmp_path / "redo.png")
    assert result.exit_code == 0, result.output
    # The same render asked for by options instead: the very same pixels.
    direct = run("generate", "a girl, garden", "-l", "demo-character:0.6", "-l", "demo-clothing:1.1", "--seed", "11",
                 "--steps", "2", "--guidance", "4.5", "--width", "32", "--height", "32", "--negative", "blurry",
                 "--no-triggers", "-o", tmp_path / "direct.png")
    assert direct.exit_code == 0, direct.output
    assert np.array_equal(pixels(tmp_path / "redo.png"), pixels(tmp_path / "direct.png"))
    redone = read_source(tmp_path / "redo.png").info
    assert redone.prompt == "a girl, garden" and redone.weights == (0.6, 1.1) and redone.guidance == 4.5
    # What differs from the original is said, not hidden: another sampler, a LoRA of another hash.
    assert "Lora hash 000000000000" in result.stderr and "DPM++ 2M" in result.stderr


def test_generate_from_bad_input_is_one_line(made, tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    one_error_line(run("generate", "--from", plain), str(plain), "no A1111 or localora metadata", "give a PNG")
    assert "export" not in run("generate", "--from", plain).output  # generate is not exporting anything
    one_error_line(run("generate", "--from", made[0], "--seed", "5"), "--from takes every setting", "--seed")
    one_error_line(run("generate", "x", "--from", made[0], "-l", "demo-style"), "PROMPT", "--lora")
    stock = tmp_path / "stock.png"
    info = PngInfo()
    info.add_text("parameters", "a dog <lora:not-here:0.5>\nSteps: 2, Sampler: Euler, Seed: 1, Size: 32x32")
    Image.new("RGB", (8, 8)).save(stock, pnginfo=info)
    one_error_line(run("generate", "--from", stock, "--lora-dir", tmp_path), "<lora:not-here>", str(tmp_path))
    one_error_line(run("generate", "--from", made[0], "--profile", "tiny-sd15"), "profile 'tiny'", "--profile tiny")


def test_export_to_lora_bakes_what_the_png_shows(made, sdxl_renderer, tmp_path):
    from localora.diffusion import loras
    from localora.diffusion.render import RenderJob
    from localora.diffusion.sampling import Sampling

    out = tmp_path / "combo.safetensors"
    result = run("export", made[0], "--to", "lora", "-o", out)
    assert result.exit_code == 0, result.output
    assert "weight 1.0" in result.output
    baked = loras.inspect(out)
    assert baked.format == "kohya" and baked.arch == "sdxl"
    info = read_source(made[0]).info
    # The baked file alone at 1.0, with the same prompt and settings, gives the PNG's pixels.
    sampling = Sampling(seed=info.seed, negative_prompt=info.negative_prompt, steps=info.steps,
                        guidance=info.guidance, width=info.width, height=info.height)
    alone = sdxl_renderer.render(RenderJob(info.prompt, (loras.lora_from_file(out),), (1.0,), "merge", sampling))
    assert np.abs(np.asarray(alone.image, dtype=int) - pixels(made[0]).astype(int)).max() <= 1
    # A Switch render bakes its weights merged, and says so.
    switched = run("export", made[1], "--to", "lora", "-o", tmp_path / "sw.safetensors")
    assert switched.exit_code == 0 and "another image" in switched.output


def test_a_png_whose_lora_file_is_gone_names_it(demo_loras, tmp_path):
    from safetensors.torch import load_file, save_file

    mine = tmp_path / "mine.safetensors"
    tensors = load_file(str(demo_loras["sdxl"][2].path))
    save_file({k: v * 0.5 for k, v in tensors.items()}, str(mine))  # other bytes than any known LoRA
    made = tmp_path / "made.png"
    result = run("generate", "a cat", "-l", mine, "-l", "demo-style", *SMALL, "-o", made)
    assert result.exit_code == 0, result.output
    mine.unlink()
    one_error_line(run("generate", "--from", made), "mine.safetensors", "--lora-dir")
    one_error_line(run("export", made, "--to", "lora"), "mine.safetensors", "--lora-dir")
