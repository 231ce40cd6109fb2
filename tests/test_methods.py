"""Merge, Switch and Composite against references computed independently of the code under test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from localora.diffusion import methods
from localora.diffusion.loras import Lora
from localora.diffusion.pipeline import set_unet_weights
from localora.diffusion.render import RenderJob
from localora.diffusion.sampling import Sampling
from localora.tiny.diffusion import random_lora, save_diffusers_lora, save_kohya_lora

SMALL = dict(width=32, height=32)


PROMPT = "a portrait, demo character"


def sampling(steps=4, guidance=5.0, every=5, seed=3):
    return Sampling(negative_prompt="", steps=steps, guidance=guidance, seed=seed, switch_every=every, **SMALL)


def lora_delta(path, module: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scale) of one module, read straight from the LoRA file on disk."""
    t = load_file(str(path))
    kohya = "lora_unet_" + module.replace(".", "_")
    if f"{kohya}.lora_down.weight" in t:
        a, b = t[f"{kohya}.lora_down.weight"], t[f"{kohya}.lora_up.weight"]
        return a, b, float(t[f"{kohya}.alpha"]) / a.shape[0]
    return t[f"unet.{module}.lora_A.weight"], t[f"unet.{module}.lora_B.weight"], 1.0


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_merge_equals_weighted_sum_of_lora_products(arch, demo_loras, sdxl_renderer, sd15_renderer):
    renderer = sdxl_renderer if arch == "sdxl" else sd15_renderer
    loras = demo_loras[arch]
    names = renderer.adapters_for(loras)
    pipe = renderer.pipeline()
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    layer = pipe.unet.get_submodule(module)
    seen = []
    hook = layer.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    weights = [0.7, -0.4, 1.3]  # negative weights are legal
    try:
        methods.merge(pipe, names, weights, PROMPT, sampling(steps=1))
    finally:
        hook.remove()
    x, out = seen[0]
    base = load_file(str(renderer_path(renderer) / "unet" / "diffusion_pytorch_model.safetensors"))
    expected = torch.nn.functional.linear(x, base[f"{module}.weight"])
    for lora, w in zip(loras, weights):
        a, b, scale = lora_delta(lora.path, module)
        expected = expected + w * scale * (x @ a.T @ b.T)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def renderer_path(renderer):
    from localora import profiles

    return profiles.locate(renderer.profile.diffusion.source, "test")


def reference_switch_schedule(steps: int, n: int, every: int) -> list[int]:
    # As the notes state it: the first LoRA covers steps 0..every, each later turn `every` steps.
    order = [0] * (every + 1)
    k = 1
    while len(order) < steps:
        order += [k % n] * every
        k += 1
    return order[:steps]


@pytest.fixture(scope="module")
def four_sdxl_loras(demo_loras, sdxl_renderer, tmp_path_factory):
    path = tmp_path_factory.mktemp("loras") / "extra-object.safetensors"
    save_diffusers_lora(path, random_lora(sdxl_renderer.pipeline().unet, rank=2, seed=77))
    return demo_loras["sdxl"] + [Lora("extra-object", path, "object")]


@pytest.mark.parametrize("every", [1, 2, 5])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_switch_follows_reference_timing(every, n, four_sdxl_loras, sdxl_renderer):
    names = sdxl_renderer.adapters_for(four_sdxl_loras[:n])
    pipe = sdxl_renderer.pipeline()
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    unit = {}
    for name in names:  # the layer's scaling of each adapter at weight 1 (alpha / rank)
        set_unet_weights(pipe, [name], [1.0])
        unit[name] = layer.scaling[name]
    weights = [0.5, 0.9, 1.2, 0.7][:n]
    seen = []

    def record(m, args):
        # The UNet's own: the pipeline's answer may be a text encoder's, which Switch leaves alone.
        (name,) = pipe.unet.active_adapters()
        seen.append((name, round(layer.scaling[name] / unit[name], 6)))

    hook = pipe.unet.register_forward_pre_hook(record)
    steps = 2 * every * n + 1
    try:
        methods.switch(pipe, names, weights, PROMPT, sampling(steps=steps, every=every))
    finally:
        hook.remove()
    assert seen == [(names[i], weights[i]) for i in reference_switch_schedule(steps, n, every)]


@pytest.mark.parametrize("guidance", [1.0, 0.5, 6.0])
@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_composite_noise_is_guided_mean_of_per_lora_passes(arch, guidance, demo_loras, sdxl_renderer, sd15_renderer,
                                                            monkeypatch):
    renderer = sdxl_renderer if arch == "sdxl" else sd15_renderer
    names = renderer.adapters_for(demo_loras[arch])
    weights = [1.0, 0.6, 1.2]
    pipe = renderer.pipeline()
    inputs, eps = [], []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append((args[0].clone(), args[1], kwargs)), with_kwargs=True)
    cls = type(pipe.scheduler)  # each render builds its own scheduler of this class
    original_step = cls.step

    def recording_step(self, model_output, *args, **kwargs):
        eps.append(model_output.clone())
        return original_step(self, model_output, *args, **kwargs)

    monkeypatch.setattr(cls, "step", recording_step)
    try:
        methods.composite(pipe, names, weights, PROMPT, sampling(steps=3, guidance=guidance))
    finally:
        hook.remove()
        monkeypatch.undo()
    assert len(inputs) == 3  # one UNet batch per step: [uncond, cond] for each LoRA
    for step in range(3):
        x, t, kw = inputs[step]
        assert x.shape[0] == 2 * len(names)
        x, embeds = x[:2], kw["encoder_hidden_states"][:2]
        added = kw["added_cond_kwargs"] and {k: v[:2] for k, v in kw["added_cond_kwargs"].items()}
        outs = []
        with torch.no_grad():  # the reference: each LoRA alone, one pass each, as peft computes it
            for name, w in zip(names, weights):
                set_unet_weights(pipe, [name], [w])
                outs.append(pipe.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample)
        u = torch.stack([o.chunk(2)[0] for o in outs]).mean(0)
        c = torch.stack([o.chunk(2)[1] for o in outs]).mean(0)
        # The passes run as one batch of 2k rows: CPU kernels round ~5e-7 differently per pass at another
        # batch size, and guidance g multiplies that (eps values are of order 1).
        torch.testing.assert_close(eps[step], u + guidance * (c - u), rtol=1e-5, atol=2e-6 * max(guidance, 1))


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_composite_of_one_lora_is_merge_of_it(arch, demo_loras, sdxl_renderer, sd15_renderer):
    renderer = sdxl_renderer if arch == "sdxl" else sd15_renderer
    lora = demo_loras[arch][0]
    job = RenderJob("a portrait", (lora,), (0.9,), sampling=Sampling(seed=5, steps=3, **SMALL))
    merged = np.asarray(renderer.render(job).image, dtype=np.int16)
    composed = np.asarray(renderer.render(RenderJob(**{**job.__dict__, "method": "composite"})).image, dtype=np.int16)
    assert np.abs(merged - composed).max() <= 1  # the same computation, up to float rounding


def test_kohya_and_diffusers_copies_render_identically(sdxl_renderer, tmp_path):
    layers = random_lora(sdxl_renderer.pipeline().unet, rank=4, seed=11)
    kohya, diffusers_copy = tmp_path / "k.safetensors", tmp_path / "d.safetensors"
    save_kohya_lora(kohya, layers, alpha=2.0)  # scale 2/4
    save_diffusers_lora(diffusers_copy, {n: (a, b * 0.5) for n, (a, b) in layers.items()})
    images = []
    for path in (kohya, diffusers_copy):
        job = RenderJob("a cat", (Lora(path.stem, path),), (0.8,), sampling=Sampling(seed=2, steps=3, **SMALL))
        images.append(np.asarray(sdxl_renderer.render(job).image))
    baseline = RenderJob("a cat", (Lora("k", kohya),), (0.0,), sampling=Sampling(seed=2, steps=3, **SMALL))
    assert np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], np.asarray(sdxl_renderer.render(baseline).image))


@pytest.mark.parametrize("method", ["merge", "switch", "composite"])
def test_sd15_renders_every_method(method, demo_loras, sd15_renderer):
    job = RenderJob("a cat", tuple(demo_loras["sd15"]), (1.0, 0.5, 0.8), method=method,
                    sampling=Sampling(seed=1, steps=3, switch_every=1, **SMALL))
    image = sd15_renderer.render(job).image
    assert image.size == (32, 32)
    assert np.asarray(image).std() > 0
