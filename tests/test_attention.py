"""Which attention each model runs: the tiny profiles' loaded models all run SDPA, doctor (which
builds them from their configs on the meta device) says the same, and a model forced to eager
attention is reported as eager, by the function and by doctor."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from localora import attention, profiles
from localora.attention import SDPA
from localora.cli import main
from localora.diffusion import render
from localora.diffusion.pipeline import empty_models
from localora.scoring import clip as cliplib
from localora.vlm import model as vlmlib

TINY_LINE = "attention: unet sdpa (AttnProcessor2_0), text encoders sdpa, vlm sdpa, clip sdpa (nn.MultiheadAttention)"


def doctor(*args: str) -> tuple[str, dict]:
    human = CliRunner().invoke(main, ["doctor", *args])
    machine = CliRunner().invoke(main, ["doctor", *args, "--json"])
    assert human.exit_code == machine.exit_code == 0, human.output
    return human.stdout, json.loads(machine.stdout)["attention"]


@pytest.mark.parametrize("name, denoiser, processor, encoders", [
    ("tiny", "unet", "AttnProcessor2_0", {"CLIPTextModel"}),
    ("tiny-flux", "transformer", "FluxAttnProcessor", {"CLIPTextModel", "T5Stack"}),
])
def test_loaded_tiny_models_run_sdpa_and_doctor_says_so(name, denoiser, processor, encoders):
    profile = profiles.load_profile(name)
    pipe = render.load_pipeline(profile.diffusion, torch.device("cpu"))
    encoder_attention = {}
    for attr in ("text_encoder", "text_encoder_2"):
        encoder_attention.update(attention.used(getattr(pipe, attr)))
    loaded = {
        "denoiser": attention.used(getattr(pipe, denoiser)),
        "text_encoders": encoder_attention,
        "vlm": attention.used(vlmlib.VLM(profile.vlm).model),
        "clip": attention.used(cliplib.load_model(cliplib.model_dir(profile.clip))),
    }
    assert loaded["denoiser"] == {processor: SDPA}
    assert set(loaded["text_encoders"]) == encoders and set(loaded["text_encoders"].values()) == {SDPA}
    assert set(loaded["vlm"].values()) == {SDPA} and len(loaded["vlm"]) == 2  # vision tower and language model
    assert loaded["clip"] == {"nn.MultiheadAttention": SDPA}

    human, reported = doctor("--profile", name)
    # doctor reads no weights, yet names exactly what the loaded models run
    assert {role: reported[role]["via"] for role in loaded} == loaded
    assert {reported[role]["implementation"] for role in loaded} == {SDPA}
    assert reported["denoiser"]["model"] == denoiser
    if name == "tiny":
        assert TINY_LINE in human.splitlines()


def test_a_model_forced_to_eager_is_reported_as_eager(monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor
    from transformers import CLIPTextModel

    folder = profiles.locate("tiny:sdxl", "tiny")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", attn_implementation="eager")
    assert attention.summary(attention.used(encoder)).implementation == "eager"
    # what load_pipeline does to a pipeline's text encoders: SDPA where it was something else
    assert attention.used(attention.prefer_sdpa(encoder)) == {"CLIPTextModel": SDPA}

    unet = empty_models(profiles.load_profile("tiny").diffusion)["unet"]  # its own, on the meta device
    name, _ = next(iter(unet.attn_processors.items()))
    unet.set_attn_processor({**unet.attn_processors, name: AttnProcessor()})
    mixed = attention.summary(attention.used(unet))
    assert (mixed.implementation, str(mixed)) == ("mixed", "mixed (AttnProcessor eager, AttnProcessor2_0 sdpa)")
    unet.set_attn_processor(AttnProcessor())
    assert str(attention.summary(attention.used(unet))) == "eager (AttnProcessor)"

    # The VLM loaded as localora would load it if it asked for eager attention: doctor's line and JSON say so.
    monkeypatch.setattr(vlmlib, "ATTENTION", "eager")
    loaded = attention.used(vlmlib.VLM(profiles.load_profile("tiny").vlm).model)
    assert set(loaded.values()) == {"eager"} and len(loaded) == 2
    human, reported = doctor()
    assert reported["vlm"]["implementation"] == "eager" and set(reported["vlm"]["via"].values()) == {"eager"}
    assert "vlm eager, clip sdpa" in human and TINY_LINE not in human


def test_doctor_says_not_here_for_models_whose_configs_are_not_here():
    result = CliRunner().invoke(main, ["doctor", "--profile", "sdxl-realistic", "--json"])
    assert result.exit_code == 3  # missing models, as before
    reported = json.loads(result.stdout)["attention"]
    assert {reported[r]["implementation"] for r in ("denoiser", "text_encoders", "vlm", "clip")} == {"not here"}
    human = CliRunner().invoke(main, ["doctor", "--profile", "sdxl-realistic"]).stdout
    assert "attention: unet not here, text encoders not here, vlm not here, clip not here" in human


def test_doctor_keeps_the_report_until_a_models_files_change(monkeypatch):
    """The second doctor reads the report doctor kept in the home instead of building the models
    again (the builds, and importing diffusers for them, are most of doctor's time); a changed
    config file is a new state, found again."""
    from localora.cli import vlm as doctor_cli

    config = profiles.locate("tiny:sdxl", "tiny") / "unet" / "config.json"  # built here if it was not
    first = doctor()[1]
    assert first["denoiser"]["implementation"] == SDPA
    built = []
    real = doctor_cli._find_attention
    monkeypatch.setattr(doctor_cli, "_find_attention", lambda profile: built.append(profile.name) or real(profile))
    assert doctor()[1] == first and built == []
    text = config.read_text()
    try:
        config.write_text(text + " ")  # same config, another size: the key changes
        assert doctor()[1] == first and built == ["tiny"]  # found again once, then kept for --json
    finally:
        config.write_text(text)
