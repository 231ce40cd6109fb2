"""LoRAs named the way A1111 and ComfyUI users name them (issue 12, in part): LoRA folders
(--lora-dir, $LOCALORA_LORA_DIRS, config.toml), their sidecars, and <lora:NAME:WEIGHT> prompt tags."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from localora.cli import main
from localora.diffusion import loras
from localora.errors import LocaloraError
from support import one_error_line

SMALL = ["--steps", "2", "--width", "64", "--height", "64"]


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def _demo(demo_loras, name):
    return next(lo.path for lo in demo_loras["sdxl"] if lo.name == name)


def _other_numbers(source, target):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] * 0.5
    save_file(tensors, str(target), metadata=metadata)


@pytest.fixture
def webui(tmp_path, demo_loras):
    """An A1111 install's LoRA folder: models/Lora with subfolders and both kinds of sidecar."""
    root = tmp_path / "webui" / "models" / "Lora"
    (root / "Characters").mkdir(parents=True)
    (root / "styles").mkdir()
    shutil.copy(_demo(demo_loras, "demo-character"), root / "Characters" / "Hero.safetensors")
    shutil.copy(_demo(demo_loras, "demo-style"), root / "styles" / "watercolor.safetensors")
    (root / "styles" / "watercolor.json").write_text(json.dumps(
        {"activation text": "wc style", "preferred weight": 0.6, "sd version": "SDXL"}))
    # No header metadata and no A1111 sidecar: only civitai's info file knows the trigger words.
    # Another file of its own (the same bytes twice would be one LoRA applied twice: refused).
    _other_numbers(_demo(demo_loras, "demo-style"), root / "Ink.safetensors")
    (root / "Ink.civitai.info").write_text(json.dumps({"trainedWords": ["ink wash", " monochrome "]}))
    return root


@pytest.fixture
def comfy(tmp_path, demo_loras):
    """A ComfyUI install's LoRA folder: models/loras, flat."""
    root = tmp_path / "ComfyUI" / "models" / "loras"
    root.mkdir(parents=True)
    shutil.copy(_demo(demo_loras, "demo-clothing"), root / "jacket.safetensors")
    return root


def request(prompt="", specs=(), dirs=(), catalogs=()):
    from localora.cli.options import resolve_request
    from localora.profiles import load_profile

    return resolve_request(load_profile("tiny"), tuple(map(str, specs)), tuple(map(str, catalogs)),
                           tuple(map(str, dirs)), prompt)


def gen(prompt, *args, env=None, out="/tmp/localora-test-unused.png"):
    return run("generate", prompt, "-o", out, *SMALL, *args, env=env)


# ------------------------------------------------------------------ <lora:...> tags

@pytest.mark.parametrize("prompt, text, tags", [
    ("a cat, <lora:hero:0.8>, in a garden", "a cat, in a garden", [("hero", 0.8)]),
    ("<lora:hero> <lora:ink:-0.5> a cat", "a cat", [("hero", None), ("ink", -0.5)]),
    ("a cat,<lora:my lora:1e-1>,blue", "a cat, blue", [("my lora", 0.1)]),
    ("a cat <lora:sub/hero:0.7:0.7>", "a cat", [("sub/hero", 0.7)]),  # A1111 te:unet, equal
    ("a cat <LoRA:hero:te=0.4>", "a cat", [("hero", 0.4)]),
    ("no tags, <hypernet:x:1>", "no tags, <hypernet:x:1>", []),  # other networks are not ours to remove
])
def test_split_lora_tags(prompt, text, tags):
    assert loras.split_lora_tags(prompt) == (text, tags)


@pytest.mark.parametrize("tag, fragment", [
    ("<lora:hero:0.3:0.8>", "separate text-encoder and UNet weights"),
    ("<lora:hero:unet=0.5>", "separate text-encoder and UNet weights"),  # te stays 1 in A1111
    ("<lora:hero:1:1:8>", "does not support a fourth item"),
    ("<lora:hero:dyn=8>", "does not support dyn="),
    ("<lora:hero:abc>", "weight 'abc' is not a number"),
    ("<lora:hero:nan>", "finite"),
    ("<lora::1>", "no LoRA name"),
])
def test_bad_tags_are_one_line(tag, fragment):
    one_error_line(gen(f"a cat {tag}", "-l", "demo-style"), f"prompt tag {tag}", fragment)


def test_a_tagged_generate_equals_the_same_generate_with_lora(webui, tmp_path, monkeypatch):
    from localora.diffusion.render import Renderer

    jobs = []
    original = Renderer.render

    def spy(self, job, *args, **kwargs):
        jobs.append(job)
        return original(self, job, *args, **kwargs)

    monkeypatch.setattr(Renderer, "render", spy)
    tagged = gen("a cat, <lora:hero:0.8>, in a garden <lora:WATERCOLOR>", "--lora-dir", webui,
                 "--no-triggers", out=tmp_path / "tagged.png")
    assert tagged.exit_code == 0, tagged.output
    plain = gen("a cat, in a garden", "-l", f"{webui / 'Characters' / 'Hero.safetensors'}:0.8",
                "-l", f"{webui / 'styles' / 'watercolor.safetensors'}:0.6", "--no-triggers",
                out=tmp_path / "plain.png")
    assert plain.exit_code == 0, plain.output
    assert jobs[0].prompt == jobs[1].prompt == "a cat, in a garden"
    assert list(jobs[0].weights) == list(jobs[1].weights) == [0.8, 0.6]  # 0.6: watercolor's preferred weight
    assert "cache" in plain.output  # the same job, so the same cache entry
    a, b = (np.asarray(Image.open(tmp_path / f)) for f in ("tagged.png", "plain.png"))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)


def test_tags_join_the_lora_options_and_a_lora_given_twice_is_one_line(webui):
    r = request("x <lora:hero>", ["demo-style"], [webui])
    assert [c.lora.path.name for c in r.choices] == ["demo-style.safetensors", "Hero.safetensors"]
    one_error_line(gen("x <lora:hero:0.5>", "--lora-dir", webui, "-l", "Hero"),
                   "--lora Hero and prompt tag <lora:hero:0.5>", "same LoRA file")
    one_error_line(gen("x <lora:hero> <lora:characters/hero>", "--lora-dir", webui),
                   "prompt tag <lora:hero> and prompt tag <lora:characters/hero>", "same LoRA file")


def test_generate_needs_some_lora():
    one_error_line(gen("a cat"), "generate needs a LoRA", "<lora:NAME>")


def test_an_unknown_tag_names_the_folders_searched(webui, comfy):
    one_error_line(gen("x <lora:nobody>", "--lora-dir", webui, "--lora-dir", comfy),
                   "prompt tag <lora:nobody>", "no such LoRA name", str(webui), str(comfy))
    one_error_line(gen("x", "-l", "nobody"), "--lora nobody", "no LoRA folders to search", "--lora-dir",
                   "LOCALORA_LORA_DIRS", "config.toml")


# ------------------------------------------------------------------ folders

def test_bare_names_are_stems_case_insensitive_in_subfolders(webui, comfy):
    found = loras.lora_folders([webui, comfy])
    assert found.find("hero") == webui / "Characters" / "Hero.safetensors"
    assert found.find("HERO") == found.find("Characters/Hero") == found.find("characters\\hero.safetensors")
    assert found.find("Jacket") == comfy / "jacket.safetensors"
    assert found.find("styles/hero") is None
    r = request("portrait <lora:jacket:0.3>", ["hero:0.9", "STYLES/Watercolor"], [webui, comfy])
    assert [(c.lora.path.name, c.weight) for c in r.choices] == [
        ("Hero.safetensors", 0.9), ("watercolor.safetensors", 0.6), ("jacket.safetensors", 0.3)]
    assert r.prompt == "portrait"


def test_two_files_of_one_name_are_one_line_listing_both(webui, demo_loras):
    (webui / "old").mkdir()
    shutil.copy(_demo(demo_loras, "demo-clothing"), webui / "old" / "hero.safetensors")
    one_error_line(gen("x <lora:hero>", "--lora-dir", webui), "'hero' is ambiguous",
                   str(webui / "Characters" / "Hero.safetensors"), str(webui / "old" / "hero.safetensors"))
    assert request("x <lora:old/hero>", dirs=[webui]).choices[0].lora.path == (webui / "old" / "hero.safetensors")


def test_pickled_files_are_never_picked(webui):
    (webui / "evil.ckpt").write_bytes(b"never opened")
    (webui / "styles" / "evil.pt").write_bytes(b"never opened")
    one_error_line(gen("x <lora:evil>", "--lora-dir", webui), "prompt tag <lora:evil>", "no such LoRA name")


def test_a_lora_dir_that_is_not_a_folder_is_one_line(tmp_path):
    one_error_line(gen("x", "-l", "demo-style", "--lora-dir", tmp_path / "nope"), "--lora-dir", "no such folder")


def test_the_environment_variable_and_the_config_entry(webui, comfy, tmp_path, monkeypatch, demo_loras):
    monkeypatch.setenv("LOCALORA_LORA_DIRS", os.pathsep.join([str(tmp_path / "unplugged"), str(comfy)]))
    assert request("<lora:jacket>").choices[0].lora.path == comfy / "jacket.safetensors"
    config = tmp_path / "config"
    config.mkdir()
    (config / "config.toml").write_text('lora_dirs = ["../webui/models/Lora"]\n')  # relative to the file
    monkeypatch.setenv("LOCALORA_CONFIG", str(config))
    assert request("<lora:hero>").choices[0].lora.path == webui / "Characters" / "Hero.safetensors"
    # The order: --lora-dir, then the variable, then the config file; the first folder with the name wins.
    shutil.copy(_demo(demo_loras, "demo-style"), comfy / "hero.safetensors")
    assert request("<lora:hero>").choices[0].lora.path == comfy / "hero.safetensors"
    first = tmp_path / "first"
    first.mkdir()
    shutil.copy(_demo(demo_loras, "demo-clothing"), first / "HERO.safetensors")
    assert request("<lora:hero>", dirs=[first]).choices[0].lora.path == first / "HERO.safetensors"
    msg = str(pytest.raises(LocaloraError, request, "<lora:nobody>").value)
    assert str(tmp_path / "unplugged") + " (missing)" in msg and str(config / "../webui/models/Lora") in msg


@pytest.mark.parametrize("text, fragment", [
    ("lora_dir = []\n", "unknown key(s) lora_dir"),
    ("lora_dirs = \"~/loras\"\n", "must be a list of folder paths"),
    ("lora_dirs = [\n", "not valid TOML"),
])
def test_a_bad_config_file_is_one_line(tmp_path, text, fragment):
    (tmp_path / "config.toml").write_text(text)
    one_error_line(gen("x", "-l", "demo-style", env={"LOCALORA_CONFIG": str(tmp_path)}),
                   str(tmp_path / "config.toml"), fragment)


def test_a_catalog_entry_wins_over_a_folder_file(webui, tmp_path, demo_loras):
    cat = tmp_path / "cat.toml"
    cat.write_text(f'[loras.hero]\nfile = "{_demo(demo_loras, "demo-clothing")}"\ncategory = "clothing"\n')
    r = request("<lora:hero>", dirs=[webui], catalogs=[cat])
    assert r.choices[0].lora.path == _demo(demo_loras, "demo-clothing").resolve()
    assert r.choices[0].lora.category == "clothing"


# ------------------------------------------------------------------ sidecars

def test_sidecar_triggers_and_preferred_weight(webui):
    hero, wc, ink = (c for c in request("<lora:hero> <lora:watercolor> <lora:ink>", dirs=[webui]).choices)
    assert (hero.lora.triggers, hero.weight) == ("demo character, red hair", None)  # from the header
    assert (wc.lora.triggers, wc.weight) == ("wc style", 0.6)
    assert (ink.lora.triggers, ink.weight) == ("ink wash, monochrome", None)  # civitai's trainedWords
    assert loras.inspect(webui / "Ink.safetensors").triggers == "ink wash, monochrome"
    # An A1111 sidecar says more than civitai's file; a preferred weight of 0 means unset (as in A1111).
    (webui / "Ink.json").write_text(json.dumps({"activation text": "from a1111", "preferred weight": 0}))
    ink = request("<lora:ink>", dirs=[webui]).choices[0]
    assert (ink.lora.triggers, ink.weight) == ("from a1111", None)
    assert request("<lora:watercolor:0.9>", dirs=[webui]).choices[0].weight == 0.9


@pytest.mark.parametrize("file, text, fragment", [
    ("styles/watercolor.json", "{not json", "not valid JSON"),
    ("styles/watercolor.json", '{"preferred weight": "lots"}', "\"preferred weight\" must be a number"),
    ("styles/watercolor.json", '["a list"]', "JSON object"),
    ("Ink.civitai.info", "{truncated", "not valid JSON"),
    ("Ink.civitai.info", '{"trainedWords": "ink"}', "must be a list"),
])
def test_a_broken_sidecar_is_one_line_naming_it(webui, file, text, fragment):
    (webui / file).write_text(text)
    name = file.rsplit("/", 1)[-1].split(".")[0]
    one_error_line(gen(f"x <lora:{name}>", "--lora-dir", webui), str(webui / file), fragment)


def test_compose_keeps_the_cleaned_prompt_and_starts_from_the_tags(webui, monkeypatch):
    from localora.cli import compose as compose_cli

    seen = []
    monkeypatch.setattr(compose_cli, "_start", lambda cfg, *args, **kwargs: seen.append(cfg))
    r = run("compose", "a girl, <lora:hero:0.7>, <lora:watercolor>, garden", "--lora-dir", webui)
    assert r.exit_code == 0, r.output
    assert seen[0].prompt == "a girl, garden"
    assert [lo.path.name for lo in seen[0].loras] == ["Hero.safetensors", "watercolor.safetensors"]
    assert seen[0].start == (0.7, 0.6)  # 0.6: watercolor's preferred weight
    r = run("compose", "a girl <lora:hero> <lora:ink>", "--lora-dir", webui)
    assert r.exit_code == 0, r.output
    assert seen[1].prompt == "a girl" and seen[1].start is None  # no weight anywhere: the search's default
    one_error_line(run("compose", "<lora:hero> <lora:ink>", "--lora-dir", webui), "compose needs a PROMPT besides")


# ------------------------------------------------------------------ loras list, bench

def test_loras_list_shows_each_folder_and_the_names_to_give(webui, comfy, tmp_path, demo_loras):
    (webui / "old").mkdir()
    shutil.copy(_demo(demo_loras, "demo-clothing"), webui / "old" / "hero.safetensors")
    (webui / "evil.ckpt").write_bytes(b"never opened")
    r = run("loras", "list", "--lora-dir", webui, env={"LOCALORA_LORA_DIRS": str(comfy)})
    assert r.exit_code == 0, r.output
    lines = [ln.split() for ln in r.output.splitlines()]
    assert f"{webui}  (--lora-dir): 4 LoRA files" in r.output and f"{comfy}  ($LOCALORA_LORA_DIRS): 1 LoRA file" in r.output
    assert ["Characters/Hero", "Characters/Hero.safetensors"] in lines and ["old/hero", "old/hero.safetensors"] in lines
    assert ["Ink", "Ink.safetensors"] in lines and ["jacket", "jacket.safetensors"] in lines
    assert "evil" not in r.output
    assert "no LoRA folders to search" in run("loras", "list").output


def test_bench_finds_a_testbed_in_the_configured_folders(comfy, tmp_path, monkeypatch):
    from localora.bench import testbeds

    bed = tmp_path / "bed.toml"
    bed.write_text('name = "t"\nprofile = "tiny"\nprompt = "p"\n'
                   '[[lora]]\nid = "c"\ncategory = "clothing"\nfile = "jacket.safetensors"\ntriggers = "j"\n')
    with pytest.raises(LocaloraError, match="give --lora-dir, a folder holding jacket.safetensors"):
        testbeds.load(bed).resolve()
    monkeypatch.setenv("LOCALORA_LORA_DIRS", os.pathsep.join([str(tmp_path), str(comfy)]))
    assert testbeds.load(bed).resolve()["c"].path == comfy / "jacket.safetensors"
    assert testbeds.load(bed).resolve(comfy)["c"].path == comfy / "jacket.safetensors"  # --lora-dir as before
