"""Per-row LoRA batching: Composite's k passes as one UNet batch and several Merge renders as one,
equal to the one-at-a-time computation within float rounding (relative 1e-5 on latents: CPU
kernels round differently at other batch sizes, ~5e-7 per UNet pass, and w*(s*BAx) is summed
where peft computes (w*s)*BAx), with a constant number of set_adapters calls per render."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from localora.diffusion import methods
from localora.diffusion.render import Renderer, RenderJob
from localora.diffusion.sampling import Sampling

PROMPT = "a portrait, demo character"
WEIGHTS = [1.0, 0.6, 1.2]
ROWS = [[1.0, 0.6, 1.2], [0.2, 1.4, 0.5], [0.0, 0.0, 1.3], [0.7, 0.7, 0.7]]


def sampling(profile, steps=3, guidance=5.0):
    return Sampling(seed=4, steps=steps, guidance=guidance, width=32, height=32).resolved(profile.diffusion)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(params=["sdxl", "sd15"])
def setup(request, demo_loras, sdxl_renderer, sd15_renderer):
    renderer = sdxl_renderer if request.param == "sdxl" else sd15_renderer
    names = renderer.adapters_for(demo_loras[request.param])
    return renderer, renderer.pipeline(), names


def test_batched_composite_equals_one_pass_per_lora(setup):
    renderer, pipe, names = setup
    s = sampling(renderer.profile)
    batched = methods.composite(pipe, names, WEIGHTS, PROMPT, s)
    reference = methods.composite_per_lora(pipe, names, WEIGHTS, PROMPT, s)
    assert relative(batched, reference) < 1e-5


@pytest.mark.parametrize("guidance", [5.0, 1.0])  # at 1.0 the pipeline runs no unconditional rows
def test_batched_merge_renders_equal_single_renders(setup, guidance):
    renderer, pipe, names = setup
    s = sampling(renderer.profile, guidance=guidance)
    batched = methods.merge_many(pipe, names, ROWS, PROMPT, s)
    single = torch.cat([methods.merge(pipe, names, w, PROMPT, s) for w in ROWS])
    assert batched.shape[0] == len(ROWS)
    assert relative(batched, single) < 1e-5


def test_composite_calls_set_adapters_a_constant_number_of_times(setup, monkeypatch):
    renderer, pipe, names = setup
    calls = []
    for owner in (type(pipe), type(pipe.unet)):
        original = owner.set_adapters
        monkeypatch.setattr(owner, "set_adapters", lambda self, *a, _o=original, **k: (calls.append(1), _o(self, *a, **k))[1])
    counts = []
    for steps in (2, 6):
        calls.clear()
        methods.composite(pipe, names, WEIGHTS, PROMPT, sampling(renderer.profile, steps=steps))
        counts.append(len(calls))
    assert counts[0] == counts[1] <= 3  # was steps x LoRAs (18 at 6 steps)


def test_composite_splits_its_batch_when_memory_runs_out(setup, monkeypatch, caplog):
    renderer, pipe, names = setup
    s = sampling(renderer.profile)
    expected = methods.composite(pipe, names, WEIGHTS, PROMPT, s)
    forward = type(pipe.unet).forward

    def small_card(self, sample, *args, **kwargs):
        if sample.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(type(pipe.unet), "forward", small_card)
    with caplog.at_level(logging.WARNING):
        got = methods.composite(pipe, names, WEIGHTS, PROMPT, s)
    assert relative(got, expected) < 1e-5
    assert "out of accelerator memory" in caplog.text


def test_renderer_batches_merge_misses_and_caches_them_like_single_renders(demo_loras, sdxl_renderer, tmp_path,
                                                                         monkeypatch, caplog):
    profile = sdxl_renderer.profile
    job = RenderJob("a cat", tuple(demo_loras["sdxl"]), tuple(ROWS[0]),
                    sampling=Sampling(seed=2, steps=3, width=32, height=32))
    single = Renderer(profile, devices=sdxl_renderer.devices, cache_dir=tmp_path / "single", batch=1)
    batched = Renderer(profile, devices=sdxl_renderer.devices, cache_dir=tmp_path / "batched", batch=4)
    calls = []
    original = methods.merge_many
    monkeypatch.setattr(methods, "merge_many", lambda *a, **k: (calls.append(len(a[2])), original(*a, **k))[1])
    vectors = ROWS + [ROWS[1]]  # a vector asked for twice is rendered once
    one = single.render_many(job, vectors)
    many = batched.render_many(job, vectors)
    assert calls == [4] and batched.stats.renders == 4
    assert [r.key for r in one] == [r.key for r in many] and [r.cached for r in many] == [False] * 4 + [True]
    for a, b in zip(one, many):
        assert np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int)).max() <= 1
    # An out-of-memory batch is split and retried, never a crash.
    monkeypatch.setattr(methods, "merge_many", lambda *a, **k: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")) if len(a[2]) > 2 else original(*a, **k))
    again = Renderer(profile, devices=sdxl_renderer.devices, cache_dir=tmp_path / "again", batch=4)
    with caplog.at_level(logging.WARNING):
        split = again.render_many(job, ROWS)
    assert "going on with 2" in caplog.text and again.stats.renders == 4
    assert [r.key for r in split] == [r.key for r in one[:4]]
