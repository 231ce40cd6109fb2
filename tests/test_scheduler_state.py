"""Every method gives the same latents whatever rendered before it in the process (issue 9).

Euler-type schedulers keep `init_noise_sigma` from the last schedule that was set, DPM++ keeps
earlier model outputs; a render must never see either from the render before it.
"""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from PIL import Image

from localora.diffusion import methods
from localora.files import file_hash, stable_hash
from localora.diffusion.pipeline import adapter_name, load_adapter, load_pipeline, model_identity
from localora.profiles import load_profile
from localora.diffusion.render import Renderer, RenderJob
from localora.diffusion.sampling import Sampling

CPU = torch.device("cpu")
WEIGHTS = [0.9, 0.6, 1.2]


PROMPT = "a portrait, demo character"


def sampling(steps=4, width=32, height=32):
    return Sampling(negative_prompt="", steps=steps, guidance=5.0, width=width, height=height, seed=7, switch_every=1)


def fresh_pipeline(spec, loras):
    pipe = load_pipeline(spec, CPU)
    names = []
    for lora in loras:
        name = adapter_name(file_hash(lora.path))
        load_adapter(pipe, lora, name, spec.arch)
        names.append(name)
    return pipe, names


SPECS = [("tiny", None), ("tiny", "euler_a"), ("tiny-sd15", None)]


@pytest.mark.parametrize("method", ["merge", "switch", "composite"])
@pytest.mark.parametrize("profile,scheduler", SPECS)
def test_latents_do_not_depend_on_earlier_renders(profile, scheduler, method, demo_loras):
    spec = load_profile(profile).diffusion
    spec = replace(spec, scheduler=scheduler or spec.scheduler)
    pipe, names = fresh_pipeline(spec, demo_loras[spec.arch])
    run = methods.METHODS[method].run
    on_fresh = run(pipe, names, WEIGHTS, PROMPT, sampling())
    # A render with another step count leaves another schedule (and init_noise_sigma) behind...
    methods.merge(pipe, names, WEIGHTS, PROMPT, sampling(steps=9))
    after_steps = run(pipe, names, WEIGHTS, PROMPT, sampling())
    # ...and one with another size leaves other state (DPM++ keeps its last model outputs).
    methods.composite(pipe, names, WEIGHTS, PROMPT, sampling(steps=2, width=48, height=40))
    after_size = run(pipe, names, WEIGHTS, PROMPT, sampling())
    assert torch.equal(on_fresh, after_steps)
    assert torch.equal(on_fresh, after_size)


@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
def test_composite_starts_from_the_stock_pipelines_noise(scheduler, demo_loras):
    spec = replace(load_profile("tiny").diffusion, scheduler=scheduler)
    pipe, names = fresh_pipeline(spec, demo_loras["sdxl"])
    methods.merge(pipe, names, WEIGHTS, PROMPT, sampling(steps=2))  # leave a 2-step schedule behind
    s = sampling(steps=4)
    first_inputs = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: first_inputs.append(args[0].clone()))
    try:
        methods.composite(pipe, names, WEIGHTS, PROMPT, s)
        composite_first = first_inputs[0]
        first_inputs.clear()
        pipe(prompt=PROMPT, num_inference_steps=s.steps, guidance_scale=s.guidance, width=s.width,
             height=s.height, generator=torch.Generator("cpu").manual_seed(s.seed), output_type="latent")
        stock_first = first_inputs[0]
    finally:
        hook.remove()
    # Composite's batch holds [uncond, cond] once per LoRA: each pair is the stock pipeline's input.
    assert all(torch.equal(pair, stock_first) for pair in composite_first.split(2))
    # And both are the seed's noise times init_noise_sigma of the 4-step schedule, then scaled.
    reference = type(pipe.scheduler).from_config(pipe.scheduler.config)
    reference.set_timesteps(s.steps)
    noise = torch.randn((1, 4, s.height // 2, s.width // 2), generator=torch.Generator("cpu").manual_seed(s.seed))
    t0 = reference.timesteps[0]
    expected = reference.scale_model_input(noise * reference.init_noise_sigma, t0)
    torch.testing.assert_close(composite_first[:1], expected, rtol=1e-6, atol=1e-6)


def test_a_render_cached_by_the_previous_format_is_not_reused(demo_loras, tmp_path, caplog):
    profile = load_profile("tiny")
    renderer = Renderer(profile, cache_dir=tmp_path)
    job = renderer.resolve(RenderJob("a cat", tuple(demo_loras["sdxl"]), tuple(WEIGHTS), method="composite",
                                     sampling=Sampling(seed=3, steps=3, width=32, height=32)))
    # Where format 1 stored this job: the key as that version computed it, DIR/xx/KEY.png.
    described = {"prompt": job.prompt, "loras": [file_hash(lora.path) for lora in job.loras],
                 "weights": [round(float(w), 6) for w in job.weights], "method": job.method,
                 **asdict(job.sampling)}
    described.pop("switch_every")
    old_key = stable_hash({"format": 1, "model": model_identity(profile.diffusion, CPU), "job": described})
    old = tmp_path / old_key[:2] / f"{old_key}.png"
    old.parent.mkdir(parents=True)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(old)

    with caplog.at_level("WARNING"):
        fresh = Renderer(profile, devices=renderer.devices, cache_dir=tmp_path)
        again = Renderer(profile, devices=renderer.devices, cache_dir=tmp_path)
    notes = [r for r in caplog.records if "older localora" in r.getMessage()]
    assert len(notes) == 1  # said once: the old entries are gone afterwards
    assert not old.exists()
    out = fresh.render(job)
    assert not out.cached and fresh.stats.renders == 1
    assert not (np.asarray(out.image) == [255, 0, 0]).all()
    assert again.render(job).cached
