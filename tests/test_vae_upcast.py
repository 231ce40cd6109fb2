"""The SDXL VAE in fp16 with force_upcast: upcast once and kept for the run, never a cast per
render, and the images equal a decode by an fp32 copy of the same weights (what the stock
pipeline's per-image upcast computes)."""

from __future__ import annotations

import copy

import numpy as np
import torch

from localora.diffusion import methods
from localora.diffusion.sampling import Sampling
from localora.profiles import load_profile


def test_fp16_vae_is_upcast_once_not_per_render(localora_home, demo_loras):
    from localora.diffusion.render import Renderer

    renderer = Renderer(load_profile("tiny"))  # its own pipeline: the fp16 VAE stays in this test
    pipe = renderer.pipeline()
    names = renderer.adapters_for(demo_loras["sdxl"])
    pipe.vae = pipe.vae.to(torch.float16)
    pipe.vae.register_to_config(force_upcast=True)
    reference = copy.deepcopy(pipe.vae).to(torch.float32)  # the same fp16-rounded weights, in fp32

    casts = []
    to = pipe.vae.to

    def counting_to(*args, **kwargs):
        before = pipe.vae.dtype
        out = to(*args, **kwargs)
        if pipe.vae.dtype != before:
            casts.append((before, pipe.vae.dtype))
        return out

    pipe.vae.to = counting_to
    s = Sampling(negative_prompt="", steps=2, guidance=5.0, seed=1, width=64, height=64)
    for i, weights in enumerate(([0.8, 0.5, 1.0], [0.2, 0.9, 0.4], [1.1, 0.0, 0.7])):
        latents = methods.merge(pipe, names, weights, "a portrait", s)
        image = methods.decode(pipe, latents)
        ours = np.asarray(image)
        pipe.vae, kept = reference, pipe.vae
        expected = np.asarray(methods.decode(pipe, latents))
        pipe.vae = kept
        np.testing.assert_array_equal(ours, expected)
    assert casts == [(torch.float16, torch.float32)]  # the first decode's upcast, and none after
    assert pipe.vae.dtype == torch.float32
