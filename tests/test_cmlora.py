"""CMLoRA (cached Composite): c = 0 is Composite, the passes its schedule says, a deterministic and
cached frequency order, and the loop against a plain restatement of the paper."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from localora.diffusion import cmlora, denoisers, methods
from localora.diffusion.sampling import Sampling

PROMPT = "a portrait, demo character"


def sampling(renderer, steps=4, interval=2, every=2):
    return Sampling(negative_prompt="", steps=steps, guidance=5.0, seed=2, width=32, height=32, switch_every=every,
                    cache_interval=interval).resolved(renderer.profile.diffusion)


@pytest.fixture(scope="module")
def setup(sdxl_renderer, demo_loras):
    return sdxl_renderer.pipeline(), sdxl_renderer.adapters_for(demo_loras["sdxl"])


def test_interval_zero_is_composite_bit_for_bit(setup, sdxl_renderer):
    pipe, names = setup
    s = sampling(sdxl_renderer, interval=0)
    weights = [0.8, 0.6, 1.1]
    assert torch.equal(methods.get("cmlora").run(pipe, names, weights, PROMPT, s),
                       methods.composite(pipe, names, weights, PROMPT, s))


@pytest.mark.parametrize("steps,interval", [(4, 1), (4, 2), (5, 3), (6, 4)])
def test_denoiser_passes_are_what_the_schedule_says(setup, sdxl_renderer, steps, interval):
    pipe, names = setup
    s = sampling(sdxl_renderer, steps=steps, interval=interval)
    weights = [0.8, 0.6, 1.1]
    cmlora.frequency_order(pipe, names, weights, PROMPT, s)  # the single renders, drawn once beforehand
    rows = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        methods.get("cmlora").run(pipe, names, weights, PROMPT, s)
    finally:
        hook.remove()
    branches = 2  # uncond and cond
    assert sum(rows) // branches == cmlora.passes(steps, 3, interval)
    assert len(rows) == steps  # one denoiser batch per step
    assert cmlora.passes(steps, 3, interval) < steps * 3 or interval == 1


def test_frequency_order_is_deterministic_and_cached(setup, sdxl_renderer, monkeypatch):
    pipe, names = setup
    s = sampling(sdxl_renderer)
    weights = [0.8, 0.6, 1.1]
    first = cmlora.frequency_order(pipe, names, weights, PROMPT, s)
    assert sorted(first) == [0, 1, 2]
    calls = []
    original = methods.merge
    monkeypatch.setattr(methods, "merge", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert cmlora.frequency_order(pipe, names, weights, PROMPT, s) == first
    assert calls == []  # served from the cache: no single render again
    # The order follows the amplitudes of the single renders, highest first.
    amps = [cmlora.high_frequency_amplitude(methods.decode(pipe, original(pipe, [n], [w], PROMPT, s)))
            for n, w in zip(names, weights)]
    assert first == sorted(range(3), key=lambda i: -amps[i])


def test_high_frequency_amplitude_ranks_noise_above_a_smooth_image():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    ramp = Image.fromarray(np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], 64, 0).repeat(3, 2))
    assert cmlora.high_frequency_amplitude(noise) > cmlora.high_frequency_amplitude(ramp)


def test_loop_equals_a_plain_restatement(setup, sdxl_renderer):
    """Per step, one set_adapters pass per LoRA that the schedule runs, the others' last
    predictions reused, the dominant-weighted mean guided: as the paper describes it."""
    pipe, names = setup
    s = sampling(sdxl_renderer, steps=5, interval=2, every=2)
    weights = [0.8, 0.6, 1.1]
    got = methods.get("cmlora").run(pipe, names, weights, PROMPT, s)
    order = cmlora.frequency_order(pipe, names, weights, PROMPT, s)
    names, weights = [names[i] for i in order], [weights[i] for i in order]
    fam = denoisers.family_of("sdxl")
    with torch.no_grad():
        pipe.set_adapters(names, adapter_weights=weights)
        cond = fam.encode(pipe, PROMPT, s, True)
        run = fam.start(pipe, s, cond, s.seed)
        latents, cache = run.latents, {}
        for i, t in enumerate(run.timesteps):
            d = (i // 2) % 3
            for j in (range(3) if i % 2 == 0 else [d]):
                pipe.unet.set_adapters([names[j]], weights=[weights[j]])
                cache[j] = fam.predict(pipe, run, latents, t, cond, 1)
            n = i // 2
            c = 3 - 0.5 - sum(0.5 ** m for m in range(1, n + 1))
            a = [3 * c / (c + 2) if j == d else 3 / (c + 2) for j in range(3)]
            mean = sum(cache[j] * a[j] for j in range(3)) / 3
            latents = fam.step(run, fam.guide(mean.view(1, cond.branches, *mean.shape[1:]), s), t, latents)
        expected = fam.unpacked(pipe, latents, s)
    relative = float((got - expected).abs().max() / expected.abs().max())
    assert relative <= 1e-5, relative
    assert not torch.equal(got, methods.composite(pipe, names, weights, PROMPT, replace(s, cache_interval=0)))


# ------------------------------------------------------------------ --cache-interval in compose and bench

def _cli(*args):
    from click.testing import CliRunner

    from localora.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("interval", [0, 3])
def test_compose_renders_cmlora_at_its_cache_interval(interval, tmp_path):
    import json

    from localora.export import read_source

    out = tmp_path / "r"
    result = _cli("compose", "a girl", "-l", "demo-character", "-l", "demo-style", "--method", "cmlora",
                  "--cache-interval", interval, "-n", "1", "-c", "1", "--no-fewshot", "--steps", "4",
                  "--width", "32", "--height", "32", "--plain", "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["config"]["sampling"]["cache_interval"] == interval
    info = read_source(out / "final.png").info
    assert info.method == "cmlora" and info.cache_interval == interval


def test_bench_cmlora_at_cache_interval_zero_is_composite(tmp_path):
    import json
    import sqlite3

    from localora.bench.store import DB_FILE
    from localora.export import read_source

    out = tmp_path / "b"
    result = _cli("bench", "--testbed", "tiny", "--elements", "2", "--limit", "1", "--methods",
                  "composite,cmlora", "--judge-baseline", "composite", "--cache-interval", "0", "--seeds", "0",
                  "--out", out)
    assert result.exit_code == 0, result.output
    with sqlite3.connect(out / DB_FILE) as conn:
        rows = dict(conn.execute("SELECT method, image FROM results").fetchall())
        settings = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'settings'").fetchone()[0])
    assert settings["cache_interval"] == 0
    assert read_source(out / rows["cmlora"]).info.cache_interval == 0
    pixels = {m: np.asarray(Image.open(out / rel).convert("RGB")) for m, rel in rows.items()}
    assert np.array_equal(pixels["cmlora"], pixels["composite"])
