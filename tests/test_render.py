"""The renderer: deterministic, and an identical request is served from disk without denoising."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from localora.profiles import load_profile
from localora.diffusion.render import Renderer, RenderJob
from localora.diffusion.sampling import Sampling


def job(loras, weights=(1.0, 0.5, 0.8), seed=4, method="merge", **sampling):
    return RenderJob("a cat", tuple(loras), weights, method,
                     Sampling(seed=seed, steps=3, width=32, height=32, **sampling))


@pytest.mark.own_pipelines  # two loads of the model, not one pipeline twice
def test_same_inputs_give_identical_images_across_renderers(demo_loras, tmp_path):
    profile = load_profile("tiny")
    a = Renderer(profile, cache_dir=tmp_path / "a").render(job(demo_loras["sdxl"], method="composite"))
    b = Renderer(profile, cache_dir=tmp_path / "b").render(job(demo_loras["sdxl"], method="composite"))
    assert not a.cached and not b.cached
    assert a.key == b.key
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_second_identical_request_is_a_cache_hit_with_no_denoising(demo_loras, sdxl_renderer, tmp_path):
    renderer = Renderer(sdxl_renderer.profile, devices=sdxl_renderer.devices, cache_dir=tmp_path)
    first = renderer.render(job(demo_loras["sdxl"], seed=9))
    unet_calls = []
    hook = renderer.pipeline().unet.register_forward_pre_hook(lambda m, a: unet_calls.append(1))
    try:
        second = renderer.render(job(demo_loras["sdxl"], seed=9))
    finally:
        hook.remove()
    assert first.cached is False and second.cached is True
    assert unet_calls == []
    assert renderer.stats.renders == 1 and renderer.stats.hits == 1
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
    assert second.path.is_file() and second.path.with_suffix(".json").is_file()


def test_any_change_of_input_changes_the_key(demo_loras, sdxl_renderer):
    base = job(demo_loras["sdxl"])
    variants = [
        job(demo_loras["sdxl"], seed=5), job(demo_loras["sdxl"], weights=(1.0, 0.5, 0.81)),
        job(demo_loras["sdxl"], method="composite"), job(demo_loras["sdxl"][::-1]),
        replace(base, prompt="a dog"), job(demo_loras["sdxl"], guidance=2.0),
    ]
    keys = {sdxl_renderer.key(v) for v in variants} | {sdxl_renderer.key(base)}
    assert len(keys) == len(variants) + 1
    # switch_every only matters to Switch.
    assert sdxl_renderer.key(base) == sdxl_renderer.key(job(demo_loras["sdxl"], switch_every=2))


def test_renderer_places_models_as_the_profile_asks(sdxl_renderer):
    profile = replace(sdxl_renderer.profile, device="cpu", placement="resident")
    renderer = Renderer(profile)
    assert renderer.devices.placement == "resident" and renderer.devices.device.type == "cpu"


def test_render_many_gives_one_image_per_weight_vector_in_order(demo_loras, sdxl_renderer):
    vectors = [(1.0, 1.0, 1.0), (0.2, 1.0, 1.0), (1.0, 1.0, 1.0)]
    out = sdxl_renderer.render_many(job(demo_loras["sdxl"], seed=21), vectors)
    assert [r.cached for r in out] == [False, False, True]
    assert not np.array_equal(np.asarray(out[0].image), np.asarray(out[1].image))
