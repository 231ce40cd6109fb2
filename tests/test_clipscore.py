"""CLIP-T / CLIP-I on the real tiny open_clip model, checked against open_clip computed by hand."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from localora import profiles, tiny
from localora.scoring import clip as clipscore
from localora.scoring.clip import ClipScorer
from localora.devices import DeviceManager
from localora.errors import LocaloraError
from localora.profiles import ClipSpec
from localora.tiny import clip as tiny_clip

TINY = ClipSpec("tiny-clip", "tiny:clip")


def _pattern(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _solid(rgb: tuple[int, int, int], size: int = 40) -> Image.Image:
    return Image.new("RGB", (size, size), rgb)


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    return ClipScorer.load(TINY, device="cpu")


@pytest.fixture(scope="module")
def reference_model():
    """The same tiny model, loaded straight with open_clip: the independent computation."""
    path = tiny.ensure("clip")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{path}")


def test_tiny_clip_is_a_real_open_clip_folder_and_deterministic(tmp_path):
    path = tiny.ensure("clip")
    cfg = json.loads((path / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["image_size"] == 32
    assert (path / "open_clip_model.safetensors").is_file()
    tiny_clip.build(tmp_path / "again", tiny.SEED)
    tiny_clip.build(tmp_path / "other", tiny.SEED + 1)
    a = load_file(path / "open_clip_model.safetensors")
    b = load_file(tmp_path / "again" / "open_clip_model.safetensors")
    c = load_file(tmp_path / "other" / "open_clip_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["text_projection"], c["text_projection"])


def test_scores_equal_open_clip_cosines(scorer, reference_model):
    model, preprocess, tokenizer = reference_model
    image, refs, text = _pattern(1), [_pattern(2), _pattern(3)], "a girl with red hair, watercolor"
    with torch.no_grad():
        img = F.normalize(model.encode_image(preprocess(image)[None]), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer([text])), dim=-1)
        ref = F.normalize(model.encode_image(torch.stack([preprocess(r) for r in refs])), dim=-1)
    assert scorer.clip_t(image, text) == pytest.approx((img @ txt.T).item(), abs=1e-5)
    assert scorer.clip_i(image, refs) == pytest.approx((img @ ref.T).mean().item(), abs=1e-5)


def test_batches_match_single_scores_and_paths_match_images(scorer, tmp_path):
    images = [_pattern(s) for s in range(5)]
    text = "demo character, red hair"
    assert scorer.clip_t_batch(images, text) == pytest.approx([scorer.clip_t(im, text) for im in images], abs=1e-5)
    refs = [_pattern(10), _pattern(11)]
    assert scorer.clip_i_batch(images, refs) == pytest.approx([scorer.clip_i(im, refs) for im in images], abs=1e-5)
    images[0].save(tmp_path / "a.png")
    assert scorer.clip_t(tmp_path / "a.png", text) == pytest.approx(scorer.clip_t(images[0], text), abs=1e-5)
    emb = scorer.image_embeddings(images, batch_size=2)
    assert emb.shape == (5, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)


def test_an_image_is_its_own_perfect_reference(scorer):
    image = _pattern(7)
    assert scorer.clip_i(image, [image]) == pytest.approx(1.0, abs=1e-5)


def test_near_duplicate_reference_ranks_above_a_different_image(scorer):
    image = _pattern(7)
    arr = np.asarray(image).astype(np.int16) + np.random.default_rng(0).integers(-6, 7, (48, 48, 3))
    near = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    assert scorer.clip_i(image, [near]) > scorer.clip_i(image, [_pattern(8)])


def test_matching_text_ranks_above_mismatch_on_a_model_fitted_to_know(tmp_path):
    # A known answer needs a model that knows something: fit the tiny CLIP's weights to two
    # colour/word pairs, write them as a local open_clip folder, and score through a profile source.
    src = tiny.ensure("clip")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{src}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{src}")
    red, blue = _solid((220, 30, 30)), _solid((30, 30, 220))
    texts = ["a red square", "a blue square"]
    pixels, tokens = torch.stack([preprocess(red), preprocess(blue)]), tokenizer(texts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(40):
            img = F.normalize(model.encode_image(pixels), dim=-1)
            txt = F.normalize(model.encode_text(tokens), dim=-1)
            logits = 20 * img @ txt.T
            loss = F.cross_entropy(logits, torch.arange(2)) + F.cross_entropy(logits.T, torch.arange(2))
            opt.zero_grad()
            loss.backward()
            opt.step()
    folder = tmp_path / "fitted-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text((src / "open_clip_config.json").read_text())
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))

    fitted = ClipScorer.load(ClipSpec("fitted", str(folder)), device="cpu")
    assert fitted.clip_t(red, "a red square") > fitted.clip_t(red, "a blue square")
    assert fitted.clip_t(blue, "a blue square") > fitted.clip_t(blue, "a red square")


def test_device_manager_loads_the_clip_component_once(scorer):
    manager = DeviceManager(device=torch.device("cpu"), placement="swap")
    managed = ClipScorer.load(profiles.load_profile("tiny").clip, manager=manager)
    image, text = _pattern(3), "a cat"
    assert managed.clip_t(image, text) == pytest.approx(scorer.clip_t(image, text), abs=1e-6)
    managed.clip_i(image, [_pattern(4)])
    assert [(p.component, p.action) for p in manager.history] == [("clip", "load")]
    manager.register("other", lambda device: torch.nn.Linear(1, 1))
    manager.acquire("other")  # evicts clip under "swap"; the next score acquires it again
    managed.clip_t(image, text)
    assert [p.action for p in manager.history if p.component == "clip"] == ["load", "offload", "to-device"]


def test_bad_model_folders_are_one_clear_error(tmp_path):
    with pytest.raises(LocaloraError, match="not an open_clip model folder"):
        clipscore.model_dir(ClipSpec("empty", str(tmp_path)))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_clip.MODEL_CFG}))
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"never opened")
    with pytest.raises(LocaloraError, match="only safetensors"):
        clipscore.model_dir(ClipSpec("pickled", str(tmp_path)))
    with pytest.raises(LocaloraError, match="does not exist"):
        clipscore.model_dir(ClipSpec("gone", str(tmp_path / "nope")))


def test_clip_i_without_references_and_missing_image_are_errors(scorer, tmp_path):
    with pytest.raises(LocaloraError, match="at least one reference"):
        scorer.clip_i(_pattern(1), [])
    with pytest.raises(LocaloraError, match="missing.png: no such file"):
        scorer.clip_t(tmp_path / "missing.png", "x")


def test_score_command_prints_clip_t_and_clip_i(scorer, tmp_path):
    from localora.cli.evaluate import score

    image, ref = tmp_path / "img.png", tmp_path / "ref.png"
    _pattern(5).save(image)
    _pattern(6).save(ref)
    result = CliRunner().invoke(score, [str(image), "--profile", "tiny", "--prompt", "a cat", "--reference", str(ref)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("CLIP-T ") and float(lines[0].split()[1]) == pytest.approx(scorer.clip_t(image, "a cat"), abs=1e-4)
    assert lines[1].startswith("CLIP-I ") and float(lines[1].split()[1]) == pytest.approx(scorer.clip_i(image, [ref]), abs=1e-4)
