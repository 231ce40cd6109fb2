"""Every VLM family on its tiny random model, in nf4 on the CPU: the real processor, chat
template, generate and grammar; the vision reuse; --vlm on ask, compose and judge; doctor --vlm."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter

import pytest
from click.testing import CliRunner
from PIL import Image

from localora import profiles, tiny
from localora.cli import main
from localora.scoring import judge
from localora.vlm import schemas
from localora.vlm.families import FAMILIES
from localora.vlm.model import VLM
from support import one_error_line

# [vlm.NAME] -> (tiny part, builder's model class, family)
TINY = {
    "tiny-qwen2.5-vl": ("qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2.5-VL"),
    "tiny-qwen3-vl": ("qwen3-vl", "Qwen3VLForConditionalGeneration", "Qwen3-VL"),
    "tiny-gemma-3": ("gemma-3", "Gemma3ForConditionalGeneration", "Gemma 3"),
}
ELEMENT = "character (Demo Character): demo character, red hair"


@pytest.fixture(scope="module")
def catalog():
    return profiles.load_catalog()


@pytest.fixture(scope="module", params=list(TINY))
def vlm(request, catalog):
    return VLM(catalog.vlm(request.param))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("family-pictures")
    paths = []
    for i, (colour, size) in enumerate([("red", (64, 64)), ("blue", (64, 48)), ("white", (48, 64))]):
        img = Image.new("RGB", size, colour)
        img.paste((i * 80, 200, 30), (0, 0, size[0] // 2, size[1] // 3))
        paths.append(folder / f"p{i + 1}.png")
        img.save(paths[-1])
    return paths


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------ the tiny models

def test_each_tiny_family_is_a_real_nf4_checkpoint(vlm):
    part, cls, family = TINY[vlm.spec.name]
    model = vlm.model
    assert type(model).__name__ == cls and vlm.family.name == family
    assert vlm.quantization == "nf4"
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert vlm.identity() == {"name": vlm.spec.name, "source": f"tiny:{part}", "revision": f"tiny-v{tiny.VERSION}",
                              "family": family}
    # The image placeholder the family declares is the one its template writes.
    assert vlm.family.image_placeholder in vlm.prompt(None, 1, "x")


def test_each_tiny_family_builds_deterministically(vlm, tmp_path):
    import importlib

    module, func = tiny.BUILDERS[TINY[vlm.spec.name][0]].split(":")
    getattr(importlib.import_module(module), func)(tmp_path, tiny.SEED)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert hashlib.sha256((tmp_path / name).read_bytes()).digest() == \
            hashlib.sha256((vlm.path / name).read_bytes()).digest(), name


def test_gemma_template_is_gemma_3s_own():
    """The tiny Gemma 3's prompt reads as the published template writes it: <bos>, no system
    turn (the system text opens the first user turn), the assistant is "model"."""
    spec = profiles.load_catalog().vlm("tiny-gemma-3")
    text = VLM(spec).prompt("Be brief.", 2, "Which is better?")
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nPicture 1:<start_of_image>Picture 2:<start_of_image>"
                    "Which is better?<end_of_turn>\n<start_of_turn>model\n")


# ------------------------------------------------------------------ answers

@pytest.mark.parametrize("schema", [schemas.judge_answer(), schemas.weights(["a", "b", "c"], 0.0, 1.5),
                                    schemas.choice(3), schemas.refine(["a", "b"], 0.0, 1.5, 80)],
                         ids=["judge", "weights", "choice", "refine"])
def test_every_constrained_answer_parses(vlm, pictures, schema):
    answer = vlm.chat("You are a judge.", pictures, "Answer.\n" + schema.describe(), schema=schema)
    assert answer.value == schema.parse(answer.text)


def test_vision_reuse_gives_the_same_greedy_tokens(vlm, pictures):
    """The same questions with the vision tower's output reused and with every image encoded
    anew (plain generate): identical tokens; repeated images are encoded once."""
    plain = VLM(vlm.spec, vision_cache=0)
    vlm.vision.clear()
    hits, misses = vlm.vision.hits, vlm.vision.misses
    questions = [(pictures[:2], schemas.judge_answer()), (pictures[::-1], schemas.weights(["a", "b"], 0, 1.5)),
                 (pictures[1:], None)]
    for images, schema in questions:
        kwargs = dict(schema=schema) if schema else dict(max_new_tokens=12)
        reused = vlm.chat("Look.", images, "Which is better?", **kwargs)
        fresh = plain.chat("Look.", images, "Which is better?", **kwargs)
        assert reused.tokens == fresh.tokens and reused.text == fresh.text
    # 7 images shown, 3 distinct: each encoded once.
    assert (vlm.vision.misses - misses, vlm.vision.hits - hits) == (3, 4)
    assert plain.vision is None


def test_other_processor_settings_are_encoded_again(catalog, pictures):
    spec = catalog.vlm("tiny-qwen2.5-vl")
    small = VLM(dataclasses.replace(spec, max_pixels=56 * 56))
    big = VLM(spec)
    assert small.vision.settings != big.vision.settings


def test_special_tokens_in_a_prompt_template_and_question_stay_text(vlm, pictures, tmp_path):
    """The family's structure tokens (roles, turns, image slots) in a system prompt, a prompt
    template and a question reach the model as text: the prompt has exactly the structure the
    template itself writes, and the processor sees one image per picture."""
    tokens = [t for t in vlm.family.structure_tokens if t in vlm.specials]
    noise = " ".join(tokens)
    (tmp_path / "judge.txt").write_text(f"Rate {noise} these.\n{{elements}}\n{{answer_format}}\n")
    elements = [judge.parse_element(f"character (Hero {noise}): red {noise}")]
    template = judge.judge_prompt(elements, tmp_path)
    tok = vlm.processor.tokenizer
    special_ids = set(tok.convert_tokens_to_ids(tokens))

    def structure(system, text):
        ids = vlm.processor(text=[vlm.prompt(system, 2, text)], images=[Image.open(p) for p in pictures[:2]],
                            return_tensors="pt", add_special_tokens=False)["input_ids"][0].tolist()
        return Counter(i for i in ids if i in special_ids)

    clean = structure("Be a judge.", "Which is better?")
    assert structure(f"Be a judge. {noise}", f"{template} Which {noise} is better?") == clean
    answer = vlm.chat(f"Be a judge. {noise}", pictures[:2], template, schema=judge.judge_schema())
    judge.read_scores(answer.value)


# ------------------------------------------------------------------ --vlm on the commands

@pytest.mark.parametrize("name", list(TINY))
def test_ask_with_vlm(name, pictures):
    result = cli("ask", "Weights?", "--image", pictures[0], "--image", pictures[1], "--vlm", name,
                 "--json", "weights", "--loras", "a,b")
    assert result.exit_code == 0, result.output
    value = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(value) == {"a", "b"} and all(0 <= w <= 1.5 for w in value.values())


@pytest.mark.parametrize("name", list(TINY))
def test_judged_pair_with_vlm(name, pictures):
    result = cli("judge", pictures[0], pictures[1], "--element", ELEMENT, "--vlm", name, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["judge"]["name"] == name and data["judge"]["family"] == TINY[name][2]
    assert all(0 <= data["scores"][s][d] <= 10 for s in "ab" for d in judge.DIMENSIONS)


@pytest.mark.parametrize("name", list(TINY))
def test_one_round_compose_with_vlm_records_the_vlm(name, tmp_path):
    out = tmp_path / "run"
    result = cli("compose", "a girl", "-l", "demo-character", "-l", "demo-style", "-n", "1", "-c", "2",
                 "--no-fewshot", "--vlm", name, "--out", out, "--plain")
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "run.json").read_text())
    assert settings["vlm"]["name"] == name and settings["vlm"]["family"] == TINY[name][2]
    assert settings["profile"] == "tiny" and settings["profile_spec"]["vlm"]["source"] == f"tiny:{TINY[name][0]}"
    calls = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    calls = [e for e in calls if e.get("type") == "vlm"]
    assert calls and all(e.get("value") is not None for e in calls)
    # A resumed run keeps the VLM it started with (run.json), not the profile's.
    from localora.runs import session

    run, _, prof = session.reopen(out)
    run.close()
    assert prof.vlm.name == name


def test_unknown_vlm_is_one_line(pictures):
    result = cli("ask", "x", "--image", pictures[0], "--vlm", "no-such-vlm")
    one_error_line(result, "--vlm no-such-vlm", "tiny-gemma-3")
    assert result.exit_code == 2


def test_doctor_with_a_real_vlm_that_is_absent(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    result = CliRunner().invoke(main, ["doctor", "--profile", "sdxl-realistic", "--vlm", "qwen3-vl-8b"])
    assert result.exit_code == 3, result.output
    assert "vlm       qwen3-vl-8b: missing" in result.output
    estimate = next(line for line in result.output.splitlines() if line.strip().startswith("diffusion ") and "GiB" in line)
    assert "vlm 7.1 GiB" in estimate  # 8.77e9 parameters x 0.6 bytes (nf4) x 1.25 + 1 GiB working memory, in GiB
    assert "placement auto:" in result.output
    assert "localora pull sdxl-realistic --vlm qwen3-vl-8b" in result.output


def test_every_family_is_declared_once():
    assert set(FAMILIES) == {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3"}
    assert set(tiny.KINDS["vlm"]) == {"qwen2-vl", "qwen2.5-vl", "qwen3-vl", "gemma-3"}
