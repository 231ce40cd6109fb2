"""The result leaves localora: A1111 infotext and the ComfyUI graph in every PNG localora writes,
and `localora export` to a1111, comfyui and diffusers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from localora import paths
from localora.cli import main
from localora.diffusion.loras import split_lora_tags
from localora.diffusion.render import RenderJob
from localora.diffusion.sampling import Sampling
from localora.export import a1111, comfyui, png, read_source
from support import one_error_line

SAMPLING = Sampling(seed=7, negative_prompt="ugly, blurry: bad", steps=3, width=32, height=32)
PROMPT = "a cat, in a hat: at noon"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def addnet_hash(path) -> str:
    """Written from A1111's description, independently of localora's: sha256 after the header."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


def idat(path) -> bytes:
    """The pixel data chunks of a PNG, as stored."""
    data, pos, out = path.read_bytes(), 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            out += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return out


@pytest.fixture(scope="module")
def merged(sdxl_renderer, demo_loras):
    loras = tuple(demo_loras["sdxl"][:2])
    job = RenderJob(PROMPT, loras, (0.7, 1.25), "merge", SAMPLING)
    return job, sdxl_renderer.render(job)


@pytest.fixture(scope="module")
def switched(sdxl_renderer, demo_loras):
    loras = tuple(demo_loras["sdxl"][:2])
    job = RenderJob(PROMPT, loras, (0.5, 1.0), "switch", dataclasses.replace(SAMPLING, switch_every=2))
    return job, sdxl_renderer.render(job)


def test_the_infotext_has_a1111s_layout_and_reads_back_as_the_render(merged, sdxl_renderer):
    job, rendered = merged
    s = job.sampling.resolved(sdxl_renderer.profile.diffusion)
    text = png.text_chunks(rendered.path)["parameters"]
    lines = text.split("\n")
    stems = [lora.path.stem for lora in job.loras]
    assert lines[0] == f"{PROMPT} <lora:{stems[0]}:0.7> <lora:{stems[1]}:1.25>"
    assert lines[1] == "Negative prompt: ugly, blurry: bad"
    assert lines[2].startswith(f"Steps: 3, Sampler: Euler, Schedule type: DDIM, CFG scale: {float(s.guidance)}, "
                               f"Seed: 7, Size: 32x32, Model: tiny-sdxl, Lora hashes: \"")
    parsed = a1111.parse_infotext(text)
    assert parsed["negative_prompt"] == s.negative_prompt
    assert split_lora_tags(parsed["prompt"]) == (PROMPT, [(stems[0], 0.7), (stems[1], 1.25)])
    f = parsed["fields"]
    assert list(f) == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model", "Lora hashes",
                       "Version", "localora"]
    assert (int(f["Steps"]), float(f["CFG scale"]), int(f["Seed"]), f["Size"]) == (s.steps, s.guidance, s.seed, "32x32")
    assert f["Lora hashes"] == ", ".join(f"{stem}: {addnet_hash(lo.path)}" for stem, lo in zip(stems, job.loras))
    assert f["Version"] == "localora 0.1.0"
    entry = parsed["localora"]
    assert entry["method"] == "merge" and entry["weights"] == [0.7, 1.25] and entry["prompt"] == PROMPT
    assert [x["sha256"] for x in entry["loras"]] == [hashlib.sha256(lo.path.read_bytes()).hexdigest() for lo in job.loras]
    assert [x["file"] for x in entry["loras"]] == [lo.path.name for lo in job.loras]
    assert Sampling.from_dict(entry) == dataclasses.replace(s, switch_every=Sampling().switch_every)
    assert (entry["profile"], entry["scheduler"], entry["dtype"]) == ("tiny", "euler", "float32")
    assert "switch_every" not in entry and "Note" not in f


def test_a_stock_a1111_infotext_parses():
    text = ("masterpiece, 1girl, <lora:add_detail:0.5> smiling <lora:style-x:1>\n"
            "Negative prompt: lowres, bad hands\n"
            "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 965400086, Size: 512x768, "
            "Model hash: 45dee52b1a, Model: anything-v5, Lora hashes: \"add_detail: 7c6bad76eb54, style-x: "
            "0123456789ab\", Version: v1.10.1")
    p = a1111.parse_infotext(text)
    assert p["negative_prompt"] == "lowres, bad hands"
    assert split_lora_tags(p["prompt"]) == ("masterpiece, 1girl, smiling", [("add_detail", 0.5), ("style-x", 1.0)])
    assert p["fields"]["Lora hashes"] == "add_detail: 7c6bad76eb54, style-x: 0123456789ab"
    assert p["fields"]["Schedule type"] == "Karras" and p["fields"]["Model hash"] == "45dee52b1a"
    assert p["localora"] is None


def test_a_merge_png_carries_a_comfyui_graph_of_core_nodes(merged):
    job, rendered = merged
    graph = json.loads(png.text_chunks(rendered.path)["prompt"])
    kinds = {spec["class_type"] for spec in graph.values()}
    assert kinds == set(comfyui.NODE_INPUTS)
    loaders = [graph[n] for n in ("10", "11")]
    assert [x["inputs"]["lora_name"] for x in loaders] == [lo.path.name for lo in job.loras]
    assert [(x["inputs"]["strength_model"], x["inputs"]["strength_clip"]) for x in loaders] == [(0.7, 0.7), (1.25, 1.25)]
    assert loaders[0]["inputs"]["model"] == ["1", 0] and loaders[1]["inputs"]["clip"] == ["10", 1]
    k = graph["6"]["inputs"]
    assert (k["seed"], k["steps"], k["sampler_name"], k["scheduler"], k["denoise"]) == (7, 3, "euler", "ddim_uniform", 1.0)
    assert k["model"] == ["11", 0] and graph["3"]["inputs"]["clip"] == ["11", 1]
    assert graph["3"]["inputs"]["text"] == PROMPT and graph["4"]["inputs"]["text"] == "ugly, blurry: bad"
    assert graph["5"]["inputs"] == {"width": 32, "height": 32, "batch_size": 1}


def test_a_switch_png_says_a1111_cannot_redo_it_and_has_no_graph(switched):
    job, rendered = switched
    chunks = png.text_chunks(rendered.path)
    assert "prompt" not in chunks
    fields = a1111.parse_infotext(chunks["parameters"])["fields"]
    assert fields["localora method"] == "Switch" and "rotating every 2 steps" in fields["Note"]
    assert json.loads(fields["localora"])["switch_every"] == 2
    one_error_line(run("export", rendered.path, "--to", "comfyui"), str(rendered.path), "switch render has no ComfyUI")


def test_metadata_never_changes_the_pixels(merged, sdxl_renderer, demo_loras, tmp_path):
    job, rendered = merged
    assert np.array_equal(np.asarray(Image.open(rendered.path).convert("RGB")), np.asarray(rendered.image))
    # The same file under another name: the same cache entry, relabelled, pixel data kept byte for byte.
    renamed = tmp_path / "Renamed Lora.safetensors"
    shutil.copyfile(job.loras[0].path, renamed)
    before = idat(rendered.path)
    other = dataclasses.replace(job, loras=(dataclasses.replace(job.loras[0], path=renamed), job.loras[1]))
    hit = sdxl_renderer.render(other)
    assert hit.cached and hit.key == rendered.key and idat(hit.path) == before
    assert "<lora:Renamed Lora:0.7>" in png.text_chunks(hit.path)["parameters"]
    sdxl_renderer.render(job)  # and back, for the other tests of this module
    assert f"<lora:{job.loras[0].path.stem}:0.7>" in png.text_chunks(rendered.path)["parameters"]


def test_a_cache_png_made_before_the_metadata_gets_it_on_its_next_hit(merged, sdxl_renderer):
    job, rendered = merged
    rendered.image.save(rendered.path, format="PNG")  # as an older localora wrote it
    assert "parameters" not in png.text_chunks(rendered.path)
    assert sdxl_renderer.render(job).cached
    assert "parameters" in png.text_chunks(rendered.path) and "prompt" in png.text_chunks(rendered.path)


def test_generate_out_is_the_cached_png_byte_for_byte(tmp_path):
    out = tmp_path / "g.png"
    result = run("generate", PROMPT, "-l", "demo-character:0.8", "-l", "demo-style", "-o", out, "--no-triggers",
                 "--steps", "2", "--width", "32", "--height", "32")
    assert result.exit_code == 0, result.output
    assert any(p.read_bytes() == out.read_bytes() for p in paths.render_cache_dir().glob("v*/*/*.png"))
    assert read_source(out).info.weights == (0.8, 1.0)
    text = run("export", out, "--to", "a1111")
    assert text.exit_code == 0
    assert text.output.split("\n")[0] == PROMPT + " <lora:demo-character:0.8> <lora:demo-style:1>"


def test_run_folder_copies_carry_the_chunks(merged, tmp_path):
    from localora.runs.folder import RunFolder

    _, rendered = merged
    run_dir = RunFolder.create(tmp_path / "run", {"x": 1})
    rel = run_dir.save_image(rendered)
    run_dir.copy(rel, "final.png")
    run_dir.close()
    assert (tmp_path / "run" / "final.png").read_bytes() == rendered.path.read_bytes()
    result = run("export", tmp_path / "run", "--to", "comfyui", "-o", tmp_path / "wf.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "wf.json").read_text())["6"]["class_type"] == "KSampler"


def test_export_to_diffusers_writes_a_script_that_redoes_the_merge(merged, tmp_path, monkeypatch):
    job, rendered = merged
    out = tmp_path / "redo.py"
    result = run("export", rendered.path, "--to", "diffusers", "-o", out)
    assert result.exit_code == 0, result.output
    script = out.read_text()
    code = compile(script, str(out), "exec")
    for lora in job.loras:
        assert lora.path.name in script
    assert "adapter_weights=[0.7, 1.25]" in script and "manual_seed(7)" in script
    # Run it with the LoRA files beside it, as the script expects: the very same pixels.
    for lora in job.loras:
        shutil.copyfile(lora.path, tmp_path / lora.path.name)
    monkeypatch.chdir(tmp_path)
    # Without the deprecated torch_dtype (diffusers 0.40+, pipeline_utils._resolve_dtype warns on it).
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*torch_dtype.*")
        exec(code, {"__name__": "__main__"})
    assert "torch_dtype=" not in script
    assert np.array_equal(np.asarray(Image.open(tmp_path / "render.png").convert("RGB")), np.asarray(rendered.image))


def test_bad_input_is_one_error_line(tmp_path, merged):
    _, rendered = merged
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    one_error_line(run("export", plain, "--to", "a1111"), str(plain), "no A1111 or localora metadata")
    one_error_line(run("export", tmp_path / "gone.png", "--to", "a1111"), "gone.png", "no such file")
    one_error_line(run("export", tmp_path, "--to", "a1111"), "without final.png")
    not_png = tmp_path / "x.png"
    not_png.write_text("hello")
    one_error_line(run("export", not_png, "--to", "a1111"), "not a PNG")
    # a folder that cannot be written: a file is in its place (any user), or no write permission
    one_error_line(run("export", rendered.path, "--to", "a1111", "-o", plain / "a.txt"), "plain.png", "-o")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user writes through read-only permissions (root)")
        one_error_line(run("export", rendered.path, "--to", "a1111", "-o", locked / "a.txt"), "locked", "-o")
    finally:
        os.chmod(locked, 0o700)


def test_a_stock_a1111_png_exports_to_a1111_only(tmp_path):
    stock = tmp_path / "stock.png"
    Image.new("RGB", (8, 8)).save(stock, pnginfo=_info("a dog <lora:x:1>\nSteps: 20, Sampler: Euler a, Seed: 1"))
    assert run("export", stock, "--to", "a1111").output.startswith("a dog <lora:x:1>\nSteps: 20")
    one_error_line(run("export", stock, "--to", "diffusers"), "without a localora entry")


def _info(text):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    return info


def test_model_hash_from_the_profile(tmp_path, merged, sdxl_renderer):
    from localora.errors import LocaloraError
    from localora.profiles import load_catalog

    info = dataclasses.replace(sdxl_renderer.info(sdxl_renderer.resolve(merged[0])), model_hash="0123456789")
    fields = list(a1111.parse_infotext(a1111.infotext(info))["fields"])
    assert fields[fields.index("Size") + 1:fields.index("Size") + 3] == ["Model hash", "Model"]
    toml = tmp_path / "models.toml"
    base = ('default_profile = "p"\n[profiles.p]\ndiffusion = "d"\nvlm = "v"\nclip = "c"\n'
            '[vlm.v]\nsource = "tiny:qwen2-vl"\n[clip.c]\nsource = "tiny:clip"\n'
            '[diffusion.d]\narch = "sdxl"\nsource = "tiny:sdxl"\n')
    toml.write_text(base + 'a1111_hash = "31e35c80fc"\n')
    assert load_catalog(toml).get("p").diffusion.a1111_hash == "31e35c80fc"
    toml.write_text(base + 'a1111_hash = "31E35C"\n')
    with pytest.raises(LocaloraError, match="a1111_hash"):
        load_catalog(toml)


def test_png_text_chunks_round_trip_unicode(merged, tmp_path):
    _, rendered = merged
    data = png.with_text(rendered.path.read_bytes(), {"parameters": "ein Hund mit Hut, 帽子"})
    (tmp_path / "u.png").write_bytes(data)
    assert png.text_chunks(tmp_path / "u.png")["parameters"] == "ein Hund mit Hut, 帽子"
    assert Image.open(tmp_path / "u.png").info["parameters"] == "ein Hund mit Hut, 帽子"
    assert idat(tmp_path / "u.png") == idat(rendered.path)


def test_samplers_and_schedules_map_to_a1111_and_comfyui_names(sd15_renderer, demo_loras):
    job = RenderJob("x", tuple(demo_loras["sd15"][:1]), (1.0,), "merge", Sampling(seed=2 ** 70))
    info = sd15_renderer.info(sd15_renderer.resolve(job))
    assert info.scheduler == "dpmpp_2m" and a1111.sampler(info) == ("DPM++ 2M", "DDIM")
    karras = dataclasses.replace(info, sigmas="karras", seed=3)
    assert a1111.sampler(karras) == ("DPM++ 2M", "Karras") and comfyui.sampler(karras) == ("dpmpp_2m", "karras")
    assert "Schedule type: Karras" in a1111.infotext(karras)
    ddim = dataclasses.replace(info, scheduler="ddim")
    assert a1111.sampler(ddim) == ("DDIM", "DDIM") and comfyui.sampler(ddim) == ("ddim", "ddim_uniform")
    assert comfyui.sampler(dataclasses.replace(info, scheduler="euler_a")) == ("euler_ancestral", "ddim_uniform")
    # A seed past ComfyUI's range: the PNG gets no graph (rendering goes on), the export says why.
    from localora.errors import LocaloraError
    from localora.export import png_texts

    assert "prompt" not in png_texts(info) and "parameters" in png_texts(info)
    with pytest.raises(LocaloraError, match="outside ComfyUI's range"):
        comfyui.workflow(info)
