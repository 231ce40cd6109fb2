"""Memory accounting and placement on simulated cards (issue 28): the VLM estimate counted from
its config against a real 4-bit load, measured footprints kept in the home, the plan doctor prints
against the moves of a real compose run on a simulated 12/16/24 GiB card, and out-of-memory errors
handled once per run."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from localora import estimates, planning
from localora.devices import DeviceManager, SimulatedCard
from localora.estimates import GIB
from localora.profiles import load_profile

SDXL_PROFILES = ("sdxl-realistic", "sdxl-anime", "sdxl-realistic-small", "sdxl-anime-small")
CARDS = (12, 16, 24)


def published(name: str) -> dict:
    return json.loads((estimates.CONFIGS / f"{name}.json").read_text())


# ------------------------------------------------------------------ true memory accounting

def test_the_breakdown_counts_every_parameter_of_the_tiny_vlm(localora_home):
    spec = load_profile("tiny").vlm
    path = estimates.profiles.locate(spec.source, "vlm")
    b = estimates.vlm_breakdown(json.loads((path / "config.json").read_text()))
    assert b.total == estimates._safetensors_params(path)  # every tensor of the checkpoint, none twice
    assert b.embeddings == 2 * 448 * 64  # untied: the embedding and lm_head both stay unquantized


@pytest.mark.parametrize("name, params", [("Qwen--Qwen2-VL-2B-Instruct", 2.21e9), ("Qwen--Qwen2-VL-7B-Instruct", 8.29e9),
                                          ("Qwen--Qwen2.5-VL-3B-Instruct", 3.75e9)])
def test_published_configs_give_the_published_parameter_counts(name, params):
    assert abs(estimates.vlm_breakdown(published(name)).total - params) <= 0.005 * params


def test_the_7b_in_nf4_counts_its_bf16_embedding_and_lm_head():
    b = estimates.vlm_breakdown(published("Qwen--Qwen2-VL-7B-Instruct"))
    assert b.embeddings == 2 * 152064 * 3584  # tie_word_embeddings false: two 152k x 3584 matrices
    nf4 = estimates.quantized_bytes(b, "nf4", "bfloat16")
    assert 2 * b.embeddings / GIB > 2.0  # of which the two matrices in bf16: over 2 GiB
    assert 5.3 < nf4 / GIB < 5.7  # what a real load takes, about 5.5 GiB
    assert nf4 > 8.29e9 * estimates.BYTES["nf4"] + 0.5 * GIB  # the flat 0.6 B/param said 4.6 GiB
    assert estimates.vlm_bytes("Qwen/Qwen2-VL-7B-Instruct", "nf4", "bfloat16") == nf4  # from the shipped config


def test_the_tiny_nf4_vlm_measured_is_within_10_percent_of_its_estimate_and_is_kept(localora_home):
    from localora.vlm.model import VLM

    spec = load_profile("tiny").vlm
    devices = DeviceManager(device=torch.device("cpu"), placement="resident")
    vlm = VLM(spec, devices=devices)
    estimate = estimates.vlm_bytes(spec.source, spec.quantization, spec.dtype)
    vlm.model  # noqa: B018  (loads it)
    assert vlm.quantization == "nf4"
    measured = devices.sizes()["vlm"]
    assert abs(measured - estimate) <= 0.10 * measured, (measured, estimate)
    key = estimates.vlm_key(spec, spec.dtype)
    assert estimates.measured(key) == measured  # kept in the home for the next run
    again = DeviceManager(device=torch.device("cpu"))
    again.register("vlm", lambda d: None, key=key, estimate=1)
    assert again._components["vlm"].estimate == measured  # and planned with from the start


def test_free_memory_counts_the_allocators_cached_blocks(monkeypatch):
    from localora import devices

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * GIB, 12 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4 * GIB)
    assert devices._free_memory(torch.device("cuda")) == 4 * GIB  # 3 free at the driver + 1 cached, unused
    assert devices._free_memory(torch.device("cpu")) is None


def test_cpu_copies_are_made_once_and_reused():
    from localora.devices import to_cpu

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    pinned: dict[str, torch.Tensor] = {}
    to_cpu(model, pinned)
    first = {k: v.data_ptr() for k, v in pinned.items()}
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():  # as a move to the card and back gives new tensors
        p.data = p.data.clone()
    to_cpu(model, pinned)
    assert {k: v.data_ptr() for k, v in pinned.items()} == first and len(first) == 4
    assert [p.data_ptr() for p in model.parameters()] == [first[k] for k in ("0.weight", "0.bias", "1.weight", "1.bias")]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ------------------------------------------------------------------ the plan against a real run

@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory, localora_home, demo_loras):
    """A real compose run (tiny models, N=5, M=3, few-shot on) whose device manager sees a
    simulated 12 GiB card holding sdxl-realistic's full-size models."""
    from localora.runs import session
    from localora.search.config import ComposeConfig

    sizes = {n: b for n, b in estimates.weights(load_profile("sdxl-realistic")).items()}
    card = SimulatedCard(12 * GIB, sizes)
    made: list[DeviceManager] = []
    original = DeviceManager.for_profile.__func__

    def for_profile(cls, profile, log=None):
        made.append(card.attach(original(cls, profile, log)))
        return made[-1]

    out = tmp_path_factory.mktemp("memory") / "run"
    prof = load_profile("tiny")
    cfg = ComposeConfig("a lighthouse keeper on a 12 GB card", tuple(demo_loras["sdxl"][:2]), iterations=5,
                        candidates=3, fewshot_threshold=0.02)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DeviceManager, "for_profile", classmethod(for_profile))
        run = session.start(cfg, prof, out)
        session.compose(cfg, prof, run, ui=None)
    (manager,) = made
    return manager, card, out


def counts(manager: DeviceManager) -> tuple[dict[str, int], dict[str, int]]:
    loads = Counter(p.component for p in manager.history if p.action == "load")
    moves = Counter(p.component for p in manager.history if p.action in planning.MOVES)
    return {n: loads[n] for n in planning.COMPONENTS}, {n: moves[n] for n in planning.COMPONENTS}


def used(events: list[dict], hits_too: bool) -> list[str]:
    """The models a run's events say it used, in order, one entry per stretch: an uncached render
    (or, with `hits_too`, any render) the diffusion model, CLIP scores CLIP, a question the VLM."""
    out: list[str] = []
    for e in events:
        model = {"render": "diffusion" if hits_too or not e.get("cached") else None, "fewshot": "clip",
                 "scores": "clip", "vlm": "vlm"}.get(e["type"])
        if model and (not out or out[-1] != model):
            out.append(model)
    return out


@pytest.mark.slow  # a whole 5-round compose run (the default run stays within 4 minutes)
def test_a_real_run_uses_its_models_in_the_order_the_plan_assumes(recorded_run):
    manager, _, out = recorded_run
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert manager.uses == used(events, hits_too=False)  # cache hits (the start, repeated weights) need no model
    assert planning.run_uses(5) == used(events, hits_too=True)  # the plan: every render new


@pytest.mark.slow  # a whole 5-round compose run (the default run stays within 4 minutes)
def test_a_real_run_on_a_simulated_12_gib_card_moves_as_the_plan_says(recorded_run):
    manager, card, _ = recorded_run
    profile = load_profile("sdxl-realistic")
    loads, moves = counts(manager)
    real = planning.plan(profile, 12 * GIB, uses=manager.uses)
    assert real.verdict == "moving" and (loads, moves) == (real.loads, real.moves)
    assert moves["diffusion"] >= 10 and moves["vlm"] >= 10  # a round trip of each per round
    assert moves["clip"] == 0 and real.on_cpu == ("clip",)  # CLIP runs on the CPU instead of pushing SDXL off
    assert card.releases == 0 and manager.releases == 0  # models moved, but memory was never short
    fresh = planning.plan(profile, 12 * GIB)  # what doctor prints: every render new
    assert fresh.moves["diffusion"] == 21 and fresh.moves["vlm"] == 20  # 10 round trips each, and the last offload


@pytest.mark.parametrize("card", CARDS)
@pytest.mark.parametrize("name", SDXL_PROFILES)
def test_each_sdxl_profile_moves_on_each_card_as_doctor_prints(name, card):
    """A run's use of its models (every render new, as the test above checks against a real run),
    replayed on the real DeviceManager on a simulated card of each size with each SDXL profile's
    models, moves them as the plan doctor prints."""
    from click.testing import CliRunner

    from localora.cli import main

    profile = load_profile(name)
    sim = SimulatedCard(card * GIB, {n: b or 0 for n, b in estimates.weights(profile).items()})
    replay = DeviceManager(device=torch.device("cpu"), placement=profile.placement)
    for component in planning.COMPONENTS:
        replay.register(component, lambda device: object(), source=component, cpu_ok=component == "clip")
    sim.attach(replay)
    for component in planning.run_uses(5):
        replay.acquire(component)
    loads, moves = counts(replay)
    result = CliRunner().invoke(main, ["doctor", "--profile", name, "--vram", str(card), "--json"])
    (printed,) = json.loads(result.stdout)["plans"]
    assert (loads, moves) == (printed["loads"], printed["moves"])
    assert sim.releases == 0  # no empty_cache() where nothing was short
    if name.endswith("-small") or card >= 16:
        assert printed["verdict"] == "resident" and "diffusion" in printed["on_card"] and moves["diffusion"] == 0


def test_doctor_vram_plans_a_card_that_is_not_here_and_names_pull():
    from click.testing import CliRunner

    from localora.cli import main

    for vram, verdict in (("12", "resident"), ("8", "too large")):
        result = CliRunner().invoke(main, ["doctor", "--profile", "sdxl-realistic-small", "--vram", vram])
        assert result.exit_code == 3  # the models are not here
        assert f"{vram} GiB card (auto, a 5-iteration run): {verdict}" in result.stdout
        assert "localora pull sdxl-realistic-small" in result.stderr
    twelve = CliRunner().invoke(main, ["doctor", "--profile", "sdxl-realistic-small", "--vram", "12"]).stdout
    assert "diffusion 6.5 GiB loads once, never leaves the card" in twelve and "clip 1.6 GiB runs on the CPU" in twelve
    assert "it needs a 9.6 GiB card" in CliRunner().invoke(main, ["doctor", "-p", "sdxl-realistic-small",
                                                                  "--vram", "8"]).stdout


def test_doctor_without_a_gpu_plans_12_16_and_24_gib(monkeypatch):
    from click.testing import CliRunner

    from localora.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = json.loads(CliRunner().invoke(main, ["doctor", "--profile", "sdxl-realistic", "--json"]).stdout)
    assert [p["card_gib"] for p in data["plans"]] == [12, 16, 24]
    assert [p["verdict"] for p in data["plans"]] == ["moving", "resident", "resident"]


# ------------------------------------------------------------------ out of memory, handled once

def oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


@pytest.mark.own_pipelines  # its OOM hook stays on the UNet it hooks: not the session's shared one
def test_an_oom_on_the_first_composite_render_is_retried_once_in_the_whole_run(tmp_path, localora_home, demo_loras):
    """A card that holds one LoRA's UNet rows (2) but not two (4): the first Composite render runs
    out, and every later one starts from the split that fit."""
    from localora.runs import session
    from localora.search.config import ComposeConfig

    raised = []
    original = session.components

    def components(profile, ui=None, run=None, batch=0, compiled=False):
        parts = original(profile, ui, run, batch, compiled)
        unet = parts.renderer.pipeline().unet

        def too_many_rows(module, args):
            if args[0].shape[0] > 2:
                raised.append(args[0].shape[0])
                raise oom()

        unet.register_forward_pre_hook(too_many_rows)
        return parts

    prof = load_profile("tiny")
    cfg = ComposeConfig("a lighthouse keeper, composite on a small card", tuple(demo_loras["sdxl"][:2]),
                        iterations=2, candidates=2, fewshot=False, method="composite")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(session, "components", components)
        run = session.start(cfg, prof, tmp_path / "run")
        session.compose(cfg, prof, run, ui=None)
    composite_renders = sum(1 for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()
                            if json.loads(line).get("type") == "render" and json.loads(line).get("role") != "reference")
    assert composite_renders >= 5
    assert raised == [4]  # one out-of-memory error, and so one retry, in the whole run
    memory = json.loads((tmp_path / "run" / "run.json").read_text())["memory"]
    assert memory["composite_loras"] == 1 and memory["retries"] == 1


def test_a_single_render_that_runs_out_of_memory_falls_back_and_completes(tmp_path, localora_home, demo_loras):
    from localora.diffusion.render import Renderer, RenderJob
    from localora.diffusion.sampling import Sampling

    prof = load_profile("tiny")
    job = RenderJob("a lighthouse keeper, one render", tuple(demo_loras["sdxl"][:2]), (0.8, 0.6),
                    sampling=Sampling(steps=2))
    reference = Renderer(prof, cache_dir=tmp_path / "a").render(job).image
    devices = DeviceManager(device=torch.device("cpu"), placement="resident")
    devices.register("vlm", lambda device: torch.nn.Linear(2, 2), source="vlm")
    renderer = Renderer(prof, devices, cache_dir=tmp_path / "b")
    vae = renderer.pipeline().vae
    devices.acquire("vlm")
    decode = vae.decode
    tries = []

    def short_card_decode(*args, **kwargs):  # the decode fits once tiled, and beside no other model
        tries.append((vae.use_tiling, set(devices.resident())))
        if not vae.use_tiling or "vlm" in devices.resident():
            raise oom()
        return decode(*args, **kwargs)

    vae.decode = short_card_decode
    image = renderer.render(job).image
    assert tries == [(False, {"diffusion", "vlm"}), (True, {"diffusion", "vlm"}), (True, {"diffusion"})]
    assert renderer.memory.fallbacks == ["VAE tiling and slicing", "the other models moved off the card"]
    assert np.array_equal(np.asarray(image), np.asarray(reference))  # tiles of a 64x64 image: the same pixels
    assert devices.releases == 1  # memory really was short: one empty_cache()


@pytest.mark.own_pipelines  # the fallbacks (VAE tiling) change the pipeline: not the session's shared one
def test_an_oom_with_nothing_left_to_try_is_one_error_line(tmp_path, localora_home, demo_loras):
    from localora.diffusion.render import Renderer, RenderJob
    from localora.diffusion.sampling import Sampling
    from localora.errors import RuntimeFailure

    renderer = Renderer(load_profile("tiny"), DeviceManager(device=torch.device("cpu")), cache_dir=tmp_path)
    unet = renderer.pipeline().unet
    hook = unet.register_forward_pre_hook(lambda module, args: (_ for _ in ()).throw(oom()))
    try:
        with pytest.raises(RuntimeFailure, match="VAE tiling and slicing; lower --width/--height"):
            renderer.render(RenderJob("x", tuple(demo_loras["sdxl"][:1]), (1.0,), sampling=Sampling(steps=2)))
    finally:
        hook.remove()
    assert not any(Path(tmp_path).rglob("*.png"))  # nothing half-made entered the cache


@pytest.mark.own_pipelines  # the fallbacks (VAE tiling) change the pipeline: not the session's shared one
def test_a_merge_batch_that_runs_out_of_memory_is_split_once_for_the_run(tmp_path, localora_home, demo_loras):
    from localora.diffusion.render import Renderer, RenderJob
    from localora.diffusion.sampling import Sampling

    renderer = Renderer(load_profile("tiny"), DeviceManager(device=torch.device("cpu")), cache_dir=tmp_path, batch=4)
    raised = []

    def two_images_at_most(module, args):  # 2 rows per image: unconditional and conditional
        if args[0].shape[0] > 4:
            raised.append(args[0].shape[0])
            raise oom()

    hook = renderer.pipeline().unet.register_forward_pre_hook(two_images_at_most)
    job = RenderJob("a lighthouse keeper, merged in batches", tuple(demo_loras["sdxl"][:2]), (1.0, 1.0),
                    sampling=Sampling(steps=2))
    try:
        first = renderer.render_many(job, [(0.1 * i, 0.5) for i in range(1, 5)])
        second = renderer.render_many(job, [(0.5, 0.1 * i) for i in range(1, 5)])
    finally:
        hook.remove()
    assert raised == [8] and renderer.memory.merge_images == 2 and renderer.memory.retries == 1
    assert not any(r.cached for r in first + second) and renderer.stats.renders == 8


def test_the_batch_size_comes_from_the_measured_working_memory():
    from localora.diffusion.render import batch_size

    assert batch_size(free=10 * GIB, per_image=3 * GIB) == 3
    assert batch_size(free=GIB, per_image=3 * GIB) == 1  # never none
    assert batch_size(free=100 * GIB, per_image=GIB) == 8  # at most 8: beyond that a batch gains little


def test_what_fit_is_kept_in_run_json_and_read_back_on_resume(tmp_path):
    from localora.memory import OutOfMemory
    from localora.runs.folder import RunFolder

    run = RunFolder.create(tmp_path / "run", {"config": {}})
    policy = OutOfMemory(on_learn=lambda learned: run.set_setting("memory", learned))
    assert policy.shrink_composite(4, oom()) == 2
    with pytest.raises(ValueError):
        policy.shrink_composite(2, ValueError("not memory"))  # anything else is not swallowed
    run.close()
    again = RunFolder.open(tmp_path / "run")
    resumed = OutOfMemory()
    resumed.resume(again.settings["memory"])
    again.close()
    assert again.settings["memory"]["composite_loras"] == 2 and resumed.composite_per_pass(3) == 2


def test_any_profile_gets_a_plan_once_its_size_is_known(monkeypatch):
    """A transformer base (Flux.1, 4-bit) is planned as soon as estimates.PARAMS has its count."""
    from click.testing import CliRunner

    from localora.cli import main

    def plans():
        result = CliRunner().invoke(main, ["doctor", "--profile", "flux1-dev", "--vram", "16", "--json"])
        return json.loads(result.stdout)["plans"][0]

    source = "black-forest-labs/FLUX.1-dev"
    parts = estimates.COMPONENT_PARAMS[source]
    monkeypatch.delitem(estimates.COMPONENT_PARAMS, source)
    monkeypatch.delitem(estimates.PARAMS, source)
    assert plans()["verdict"] == "unknown"
    monkeypatch.setitem(estimates.COMPONENT_PARAMS, source, parts)  # transformer, T5, CLIP-L, VAE
    plan = plans()
    assert plan["verdict"] != "unknown"
    # the nf4 transformer and T5, CLIP-L and the VAE in bf16
    quantized = parts["transformer"] + parts["text_encoder_2"]
    expected = quantized * estimates.BYTES["nf4"] + (sum(parts.values()) - quantized) * 2
    assert plan["weights_gib"]["diffusion"] == round(expected / GIB, 2)


def test_merge_batches_are_sized_from_the_first_render_measured_at_that_size(tmp_path, monkeypatch, localora_home):
    """On a (simulated) GPU: the first batch of a size is one image, measured; the next batches are
    what the free memory holds at that working memory per image."""
    from localora.diffusion.render import Renderer
    from localora.diffusion.sampling import Sampling

    renderer = Renderer(load_profile("tiny"), DeviceManager(device=torch.device("cpu")), cache_dir=tmp_path)
    renderer.devices.device = torch.device("cuda")  # only its memory counters are asked below
    renderer.devices.free_memory = lambda: 10 * GIB
    allocated = {"now": 5 * GIB, "peak": 5 * GIB}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: allocated.update(peak=allocated["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["peak"])
    s = Sampling(width=1024, height=1024)
    assert renderer._auto_batch(s) == 1  # nothing measured at 1024x1024 yet: one image, to measure it
    with renderer._measuring(s, images=1):
        allocated["peak"] = 8 * GIB  # the render's working memory: 3 GiB above the weights
    assert renderer.memory.activations[(1024, 1024)] == 3 * GIB
    assert renderer._auto_batch(s) == 3  # 10 GiB free / 3 GiB per image
    assert renderer._auto_batch(Sampling(width=512, height=512)) == 1  # another size is measured anew
