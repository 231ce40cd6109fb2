"""Few-shot examples reach the VLM as pictures: each kept example's image, labelled with its
weights, in the Generate call, as many as the visual-token budget leaves room for."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from localora.cli import main
from localora.search import gpt4lora

ARGS = ["a girl", "-l", "demo-character", "-l", "demo-style", "-n", "1", "-c", "2", "--plain"]


def generate_calls(run):
    log = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]
    shots = next(e for e in log if e["type"] == "fewshot")
    # A fresh grid's images are the run's renders; a reused library's are the library's files.
    kept = [{**k, "image": f"{shots['library']}/{k['image']}" if shots["reused"] else k["image"]} for k in shots["kept"]]
    refs = [e["image"] for e in log if e["type"] == "render" and e["role"] == "reference"]
    return kept, refs, [e for e in log if e["type"] == "vlm" and e["step"] in ("generate", "regenerate")]


@pytest.mark.parametrize("budget", [None, 5])
def test_generate_shows_each_example_image_labelled_with_its_weights(tmp_path, monkeypatch, budget):
    if budget is not None:  # room for 5 tiny images: the current one, 2 references, 2 examples
        per_image = 12544 // (28 * 28)  # the tiny profile's max_pixels, at Qwen2-VL's 28x28 pixels a token
        monkeypatch.setattr(gpt4lora, "GENERATE_VISUAL_TOKENS", budget * per_image)
    result = CliRunner().invoke(main, ["compose", *ARGS, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    kept, refs, calls = generate_calls(tmp_path / "run")
    assert len(kept) >= 3 and calls
    shown = kept if budget is None else kept[:2]
    for call in calls:
        images = call["images"]
        assert images[1:3] == refs and len(images) == 3 + len(shown)
        for i, example in enumerate(shown, 4):
            assert images[i - 1] == example["image"]  # the grid render of those weights
            assert (tmp_path / "run" / images[i - 1]).is_file()
            pairs = ", ".join(f"{n}={w:.2f}" for n, w in zip(("demo-character", "demo-style"), example["weights"]))
            assert f"Picture {i}: weights {pairs} (prompt match" in call["prompt"]
        assert f"Picture {4 + len(shown)}:" not in call["prompt"]
        assert "this same composition" in call["prompt"]


@pytest.mark.parametrize("vlm, per_image", [("tiny-qwen2-vl", 12544 // (28 * 28)), ("tiny-qwen3-vl", 16384 // (32 * 32)),
                                            ("tiny-gemma-3", 256)])
def test_the_example_budget_counts_the_vlm_familys_tokens_per_image(vlm, per_image):
    """Generate's few-shot room is counted with each family's own visual tokens per image (Qwen3-VL
    merges 32x32 pixels a token, Gemma 3 spends 256 on any image), not Qwen2-VL's 28x28 for all."""
    from types import SimpleNamespace

    from localora.profiles import load_profile
    from localora.vlm.model import VLM

    profile = load_profile("tiny", vlm=vlm)
    model = VLM(profile.vlm)  # reads the family from the folder's config; loads no weights
    assert model.image_tokens(profile.vlm.max_pixels) == per_image
    steps = SimpleNamespace(vlm=model, renderer=SimpleNamespace(profile=profile))
    loop = gpt4lora.GPT4LoRA.__new__(gpt4lora.GPT4LoRA)  # example_room needs only its steps
    loop.steps = steps
    assert loop.example_room(2) == gpt4lora.GENERATE_VISUAL_TOKENS // per_image - 3
