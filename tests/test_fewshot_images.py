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
        per_image = 12544 // gpt4lora.TOKEN_PIXELS  # the tiny profile's max_pixels
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
