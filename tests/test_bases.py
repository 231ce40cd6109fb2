"""The flow-matching transformer bases (issue 23): Flux.1 and Z-Image through the one denoiser seam.

Merge and Switch must be exactly what diffusers' stock pipeline computes with set_adapters; the
batched seam (Composite's k passes, several Merge images in one batch) must equal the one-at-a-time
computation within float rounding, and every render must be independent of what ran before it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from support import one_error_line

from localora import tiny
from localora.diffusion import denoisers, loras, methods
from localora.diffusion.pipeline import adapter_name, load_adapter, load_pipeline
from localora.diffusion.render import Renderer
from localora.diffusion.sampling import Sampling
from localora.export import keys
from localora.files import file_hash
from localora.profiles import load_profile

PROMPT = "a portrait, demo character"
WEIGHTS = [1.0, 0.6, 1.2]
ROWS = [[1.0, 0.6, 1.2], [0.2, 1.4, 0.5], [0.0, 0.0, 1.3]]
BASES = {"flux": "tiny-flux", "zimage": "tiny-zimage"}
CPU = torch.device("cpu")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def sampling(spec, steps=3, width=32, height=32, guidance=None, every=1):
    return Sampling(seed=7, steps=steps, width=width, height=height, guidance=guidance,
                    switch_every=every).resolved(spec)


def demo(arch: str) -> list[loras.Lora]:
    return list(loras.read_catalog(tiny.ensure(f"loras-{arch}") / "catalog.toml").values())


@pytest.fixture(scope="module", params=list(BASES))
def base(request, localora_home):
    renderer = Renderer(load_profile(BASES[request.param]))
    names = renderer.adapters_for(demo(request.param))
    return request.param, renderer, renderer.pipeline(), names


def stock(pipe, arch: str, s: Sampling, callback=None) -> torch.Tensor:
    """diffusers' own pipeline call, as a user of diffusers would write it."""
    kwargs = {"guidance_scale": s.guidance, "max_sequence_length": s.max_sequence_length}
    if arch == "zimage":
        kwargs.update(negative_prompt=None, cfg_normalization=False, cfg_truncation=1.0)
    denoisers.fresh_scheduler(pipe)
    out = pipe(prompt=PROMPT, num_inference_steps=s.steps, width=s.width, height=s.height,
               generator=torch.Generator("cpu").manual_seed(s.seed), output_type="latent",
               callback_on_step_end=callback, **kwargs).images
    return denoisers.unpack(out, pipe.vae_scale_factor, s.height, s.width) if arch == "flux" else out


@pytest.mark.parametrize("guidance", [None, 2.0])  # the profile's (Flux dev 3.5, Z-Image Turbo 0) and another
def test_merge_is_the_stock_pipeline_with_set_adapters(base, guidance):
    arch, renderer, pipe, names = base
    s = sampling(renderer.profile.diffusion, guidance=guidance)
    ours = methods.merge(pipe, names, WEIGHTS, PROMPT, s)
    pipe.set_adapters(names, adapter_weights=WEIGHTS)
    assert torch.equal(ours, stock(pipe, arch, s))


def test_switch_is_the_stock_pipeline_switching_adapters(base):
    arch, renderer, pipe, names = base
    s = sampling(renderer.profile.diffusion, steps=4, every=1)
    ours = methods.switch(pipe, names, WEIGHTS, PROMPT, s)

    def rotate(p, i, t, kw):  # the reference's timing: after step i, the LoRA of step i + 1
        nxt = methods.switch_active(i + 1, len(names), 1)
        pipe.transformer.set_adapters([names[nxt]], weights=[WEIGHTS[nxt]])
        return {}

    pipe.set_adapters([names[0]], adapter_weights=[WEIGHTS[0]])
    assert torch.equal(ours, stock(pipe, arch, s, rotate))


@pytest.mark.parametrize("guidance", [None, 2.0])
def test_batched_composite_equals_one_pass_per_lora(base, guidance):
    arch, renderer, pipe, names = base
    s = sampling(renderer.profile.diffusion, guidance=guidance)
    batched = methods.composite(pipe, names, WEIGHTS, PROMPT, s)
    reference = methods.composite_per_lora(pipe, names, WEIGHTS, PROMPT, s)
    assert relative(batched, reference) < 1e-5


def test_composite_is_the_mean_of_single_lora_predictions_without_an_unconditional_pass(base, monkeypatch):
    """Flux.1 [dev] has no unconditional pass: one transformer row per LoRA, the mean of their
    predictions is what the scheduler steps with."""
    arch, renderer, pipe, names = base
    if arch != "flux":
        pytest.skip("Flux.1's guidance embedding")
    s = sampling(renderer.profile.diffusion, steps=2)
    inputs, eps = [], []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: inputs.append({k: v for k, v in kwargs.items()}), with_kwargs=True)
    original = type(pipe.scheduler).step
    monkeypatch.setattr(type(pipe.scheduler), "step",
                        lambda self, out, *a, **k: (eps.append(out.clone()), original(self, out, *a, **k))[1])
    try:
        methods.composite(pipe, names, WEIGHTS, PROMPT, s)
    finally:
        hook.remove()
        monkeypatch.undo()
    assert len(inputs) == 2 and inputs[0]["hidden_states"].shape[0] == len(names)  # k rows, no uncond rows
    assert torch.equal(inputs[0]["guidance"], torch.full([len(names)], 3.5))
    kw = {k: v for k, v in inputs[1].items()}
    outs = []
    with torch.no_grad():
        for name, w in zip(names, WEIGHTS):
            pipe.transformer.set_adapters([name], weights=[w])
            one = {k: (v[:1] if isinstance(v, torch.Tensor) and v.dim() and k not in ("txt_ids", "img_ids") else v)
                   for k, v in kw.items()}
            outs.append(pipe.transformer(**one)[0])
    torch.testing.assert_close(eps[1], torch.stack(outs).mean(0), rtol=1e-5, atol=1e-6)


def test_batched_merge_equals_single_merges(base):
    arch, renderer, pipe, names = base
    s = sampling(renderer.profile.diffusion)
    batched = methods.merge_many(pipe, names, ROWS, PROMPT, s)
    single = torch.cat([methods.merge(pipe, names, w, PROMPT, s) for w in ROWS])
    assert batched.shape[0] == len(ROWS)
    assert relative(batched, single) < 1e-5


def test_composite_of_one_lora_is_merge_of_it(base):
    arch, renderer, pipe, names = base
    s = sampling(renderer.profile.diffusion)
    assert relative(methods.composite(pipe, names[:1], [0.9], PROMPT, s),
                    methods.merge(pipe, names[:1], [0.9], PROMPT, s)) < 1e-6


@pytest.mark.parametrize("method", ["merge", "switch", "composite"])
def test_every_method_is_independent_of_earlier_renders(arch_name, method):
    spec = load_profile(BASES[arch_name]).diffusion
    pipe = load_pipeline(spec, CPU)
    names = []
    for lora in demo(arch_name):
        names.append(adapter_name(file_hash(lora.path)))
        load_adapter(pipe, lora, names[-1], arch_name)
    run = methods.METHODS[method].run
    fresh = run(pipe, names, WEIGHTS, PROMPT, sampling(spec))
    methods.merge(pipe, names, WEIGHTS, PROMPT, sampling(spec, steps=7))
    after_steps = run(pipe, names, WEIGHTS, PROMPT, sampling(spec))
    methods.composite(pipe, names, WEIGHTS, PROMPT, sampling(spec, steps=2, width=48, height=64))
    after_size = run(pipe, names, WEIGHTS, PROMPT, sampling(spec))
    assert torch.equal(fresh, after_steps) and torch.equal(fresh, after_size)


@pytest.fixture(params=list(BASES))
def arch_name(request, localora_home):
    return request.param


@pytest.mark.parametrize("method", ["merge", "composite"])
def test_bfloat16_on_cpu_is_finite_and_close_to_float32(arch_name, method, monkeypatch, tmp_path):
    from localora.diffusion.render import RenderJob

    profile = load_profile(BASES[arch_name])
    job = RenderJob(PROMPT, tuple(demo(arch_name)), tuple(WEIGHTS), method,
                    Sampling(seed=3, steps=3, width=32, height=32))
    images = {}
    for dtype in ("float32", "bfloat16"):
        monkeypatch.setenv("LOCALORA_DTYPE", dtype)
        renderer = Renderer(profile, cache_dir=tmp_path / dtype)
        images[dtype] = np.asarray(renderer.render(job).image, dtype=np.float64)
    assert np.isfinite(images["bfloat16"]).all()
    assert np.abs(images["bfloat16"] - images["float32"]).mean() < 8  # of 255: bf16 keeps 8 bits of mantissa


# ------------------------------------------------------------------ LoRA files

def test_a_kohya_named_flux_lora_changes_every_layer_it_targets_and_equals_its_diffusers_twin(localora_home, tmp_path):
    """A kohya file written from the tiny transformer's own module names in kohya's (BFL's) naming,
    fused qkv included, renders equal to the same factors in diffusers format."""
    from localora.tiny.flow import FLUX_TARGETS, random_lora

    spec = load_profile("tiny-flux").diffusion
    pipe = load_pipeline(spec, CPU)
    layers = random_lora(pipe.transformer, FLUX_TARGETS + ("ff.net.0.proj", "ff.net.2", "ff_context.net.2"), rank=3,
                         seed=11, blocks=("transformer_blocks.", "single_transformer_blocks."))
    layers = {k: v for k, v in layers.items() if not (k.startswith("single_") and ".attn." in k)}
    kohya_file, diffusers_file = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
    save_file(keys.kohya_transformer_tensors(layers, "flux"), str(kohya_file), {"ss_base_model_version": "flux1"})
    save_file({f"transformer.{m}.lora_{ab}.weight": t.contiguous() for m, (a, b) in layers.items()
               for ab, t in (("A", a), ("B", b))}, str(diffusers_file))
    written = loras.read_header(kohya_file).shapes
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in written  # q, k, v fused, as kohya writes them
    assert not any(k.startswith("transformer.") for k in written)
    info = loras.inspect(kohya_file)
    assert (info.format, info.arch, info.components) == ("kohya", "flux", ("transformer",))
    s = sampling(spec)
    out = {}
    for path in (kohya_file, diffusers_file):
        name = adapter_name(file_hash(path))
        load_adapter(pipe, loras.Lora(path.stem, path), name, "flux")
        out[path.stem] = methods.merge(pipe, [name], [1.0], PROMPT, s)
    assert relative(out["kohya"], out["diffusers"]) < 1e-6
    # Every targeted layer carries the kohya adapter, and it changes that layer's output.
    name = adapter_name(file_hash(kohya_file))
    pipe.transformer.set_adapters([name], weights=[1.0])
    modules = dict(pipe.transformer.named_modules())
    for module in layers:
        layer = modules[module]
        assert name in layer.lora_A, module
        x = torch.randn(2, layer.base_layer.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert not torch.allclose(layer(x), layer.base_layer(x)), module


def test_kohya_flux_names_cover_the_full_size_blocks():
    assert keys.kohya_flux_module("transformer_blocks.18.attn.add_k_proj") == ("lora_unet_double_blocks_18_txt_attn_qkv", 1, 3)
    assert keys.kohya_flux_module("single_transformer_blocks.37.proj_mlp") == ("lora_unet_single_blocks_37_linear1", 3, 4)
    assert keys.kohya_flux_module("single_transformer_blocks.0.proj_out") == ("lora_unet_single_blocks_0_linear2", 0, 1)


def run_cli(*args, home=None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **({"LOCALORA_HOME": str(home)} if home else {})}
    return subprocess.run([sys.executable, "-m", "localora", *map(str, args)], env=env, text=True,
                          capture_output=True, timeout=600)


def test_a_lora_of_another_base_is_one_line_and_writes_nothing(localora_home, tmp_path):
    sdxl_lora = tiny.ensure("loras-sdxl") / "demo-character.safetensors"
    flux_lora = tiny.ensure("loras-flux") / "demo-character.safetensors"
    zimage_lora = tiny.ensure("loras-zimage") / "demo-style.safetensors"
    for profile, lora, theirs, ours in (("tiny", flux_lora, "Flux.1", "SDXL"), ("tiny-flux", sdxl_lora, "SDXL", "Flux.1"),
                                        ("tiny-flux", zimage_lora, "Z-Image", "Flux.1")):
        out = tmp_path / f"{profile}-{theirs}.png"
        # In process: the check reads the LoRA's header before any model loads, and a fresh
        # interpreter per case would cost more than the three checks together.
        result = invoke("generate", PROMPT, "--profile", profile, "--lora", lora, "-o", out)
        assert result.exit_code == 2, result.output
        one_error_line(result, theirs, f"base is {ours}", str(lora))
        assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("profile", list(BASES.values()))
def test_generate_every_method_and_the_demo_from_a_clean_home(profile, tmp_path):
    home = tmp_path / "home"
    for method in ("merge", "switch", "composite"):
        pngs = []
        for n in (1, 2):  # the second time in a home of its own: rendered again, not read from a cache
            out = tmp_path / f"{method}-{n}.png"
            proc = run_cli("generate", PROMPT, "--profile", profile, "--lora", "demo-character", "--lora",
                           "demo-clothing", "--method", method, "-o", out, home=home / str(n))
            assert proc.returncode == 0, proc.stderr
            pngs.append(out.read_bytes())
        assert pngs[0] == pngs[1]
    proc = run_cli("demo", "--profile", profile, "--out", tmp_path / "demo", home=home / "1")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "demo" / "final.png").is_file()


def test_flux_pngs_carry_forge_infotext_and_a_comfyui_graph_of_flux_nodes(base):
    from localora.diffusion.render import RenderJob
    from localora.export import png
    from localora.diffusion.metadata.a1111 import parse_infotext

    arch, renderer, pipe, names = base
    job = RenderJob(PROMPT, tuple(demo(arch)), tuple(WEIGHTS), "merge", Sampling(seed=2, steps=2, width=32, height=32))
    chunks = png.text_chunks(renderer.render(job).path)
    fields = parse_infotext(chunks["parameters"])["fields"]
    if arch == "flux":
        assert (fields["Sampler"], fields["Schedule type"], fields["CFG scale"], fields["Distilled CFG Scale"]) == \
            ("Euler", "Simple", "1.0", "3.5")
        graph = json.loads(chunks["prompt"])
        kinds = {n["class_type"] for n in graph.values()}
        assert {"UNETLoader", "DualCLIPLoader", "VAELoader", "FluxGuidance", "LoraLoaderModelOnly"} <= kinds
        assert "CheckpointLoaderSimple" not in kinds and "LoraLoader" not in kinds
        assert next(n for n in graph.values() if n["class_type"] == "DualCLIPLoader")["inputs"]["type"] == "flux"
    else:  # Z-Image: c + g (c - u) is classic CFG at 1 + g; no ComfyUI graph until its nodes are checked
        assert fields["CFG scale"] == "1.0" and "Distilled CFG Scale" not in fields
        assert "prompt" not in chunks


def test_flux_rejects_a_negative_prompt_and_sizes_off_its_grid(localora_home):
    from localora.errors import LocaloraError

    spec = load_profile("tiny-flux").diffusion
    with pytest.raises(LocaloraError, match="no unconditional pass"):
        Sampling(negative_prompt="blurry").resolved(spec)
    with pytest.raises(LocaloraError, match="multiples of 16"):
        Sampling(width=72).resolved(spec)
    assert replace(Sampling(), width=80).resolved(spec).width == 80


@pytest.fixture(scope="module")
def merged(base):
    from localora.diffusion.render import RenderJob

    arch, renderer, pipe, names = base
    loras_ = tuple(demo(arch))
    job = RenderJob(PROMPT, loras_, (0.8, 1.3, 0.5), "merge", Sampling(seed=5, steps=3, width=32, height=48))
    return arch, renderer, job, renderer.render(job)


def invoke(*args):
    from click.testing import CliRunner

    from localora.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_export_to_diffusers_redoes_a_transformer_merge(merged, tmp_path, monkeypatch):
    import shutil

    from PIL import Image

    arch, renderer, job, rendered = merged
    out = tmp_path / "redo.py"
    result = invoke("export", rendered.path, "--to", "diffusers", "-o", out)
    assert result.exit_code == 0, result.output
    script = out.read_text()
    assert {"flux": "FluxPipeline", "zimage": "ZImagePipeline"}[arch] in script and "max_sequence_length=32" in script
    assert ("negative_prompt" in script) == (arch == "zimage")
    for lora in job.loras:
        shutil.copyfile(lora.path, tmp_path / lora.path.name)
    script = script.replace(repr(f"tiny:{arch}"), repr(str(tiny.ensure(arch))))  # the tiny model's folder
    monkeypatch.chdir(tmp_path)
    exec(compile(script, str(out), "exec"), {"__name__": "__main__"})
    assert np.array_equal(np.asarray(Image.open(tmp_path / "render.png").convert("RGB")), np.asarray(rendered.image))


def test_the_baked_lora_alone_equals_the_merge(merged, tmp_path):
    from localora.diffusion.render import RenderJob
    from localora.export.bake import bake_lora

    arch, renderer, job, rendered = merged
    out = tmp_path / "baked.safetensors"
    bake_lora(renderer, job.loras, job.weights, out)
    info = loras.inspect(out)
    assert (info.format, info.arch) == ("kohya", arch)
    if arch == "flux":  # BFL's fused layers, as kohya names them
        assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in loras.read_header(out).shapes)
    alone = renderer.render(RenderJob(PROMPT, (loras.Lora("baked", out),), (1.0,), "merge", job.sampling))
    diff = np.abs(np.asarray(alone.image, dtype=np.int16) - np.asarray(rendered.image, dtype=np.int16))
    assert diff.max() <= 1


def test_generate_from_a_transformer_png_renders_it_again(merged, tmp_path):
    arch, renderer, job, rendered = merged
    out = tmp_path / "again.png"
    result = invoke("generate", "--from", rendered.path, "-o", out)
    assert result.exit_code == 0, result.output
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(rendered.image))


def test_loras_inspect_names_base_format_rank_and_blocks(localora_home):
    result = invoke("loras", "inspect", tiny.ensure("loras-flux") / "demo-clothing.safetensors")
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) for line in result.output.strip().splitlines())
    assert lines["format"] == "kohya-ss" and lines["base"].startswith("Flux.1")
    assert lines["rank"] == "12"  # q, k and v of rank 4, fused as kohya writes them
    assert lines["blocks"] == "single 0-1, double 0-1"


def test_kohya_flux_names_of_every_full_size_block_map_onto_the_full_size_transformer():
    """Built on the meta device from Flux.1-dev's published config: every kohya key name of its 19
    double and 38 single blocks (BFL's fused qkv and linear1 at 3072/12288) is read by diffusers'
    own converter into layers of the transformer, of their shapes, none left over."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import fullsize_flow

    mapping = fullsize_flow.kohya_mapping()
    assert mapping["all_mapped"] and mapping["kohya_modules"] == 19 * 10 + 38 * 3, mapping


def test_doctor_plans_flux_on_12_16_and_24_gb_and_names_pull(localora_home):
    result = invoke("doctor", "--profile", "flux1-dev")
    assert result.exit_code == 3
    assert "localora pull flux1-dev" in result.output and "PROFILE" not in result.output
    assert "  diffusion flux1-dev: missing (not downloaded)\n" in result.output  # the last line says how to fetch
    for card in (12, 16, 24):
        assert f"{card} GiB card (auto" in result.output


@pytest.mark.slow
def test_a_bench_runs_on_the_tiny_flux_base(localora_home, tmp_path):
    """The tiny testbed (written for SDXL: its negative prompt, tiny:loras-sdxl) on tiny-flux: its
    demo LoRAs of the same names, no negative prompt for a base without an unconditional pass."""
    out = tmp_path / "bench"
    result = invoke("bench", "--testbed", "tiny", "--profile", "tiny-flux", "--methods", "merge,composite",
                    "--elements", "2", "--seeds", "0", "--out", out)
    assert result.exit_code == 0, result.output
    import sqlite3

    with sqlite3.connect(out / "bench.sqlite") as db:
        assert db.execute("select count(*) from results").fetchone()[0] == 4  # 2 sets x (merge, composite)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_quantized_base_on_a_cpu_loads_unquantized_says_so_and_keys_its_renders_so(localora_home, tmp_path, caplog,
                                                                                       quantization):
    """flux1-dev and zimage-turbo ship in nf4 for 12 GB cards; diffusers' bitsandbytes quantizer
    needs a GPU (diffusers 0.42 quantizers/bitsandbytes/bnb_quantizer.py validate_environment:
    "No GPU found"), which on a CPU was a traceback. Now such a run loads the weights in its dtype,
    says so once, and its renders are the unquantized ones, under their cache key."""
    import logging

    from localora.diffusion.job import RenderJob

    plain = replace(load_profile("tiny-flux"), device="cpu")  # on a GPU host too
    quantized = replace(plain, diffusion=replace(plain.diffusion, quantization=quantization))
    job = RenderJob(PROMPT, tuple(demo("flux")[:2]), (1.0, 0.6), "merge", Sampling(seed=0, steps=2, width=32, height=32))
    want = Renderer(plain, cache_dir=tmp_path / "cache").render(job)
    with caplog.at_level(logging.WARNING):
        fresh = Renderer(quantized, cache_dir=tmp_path / "fresh")
        got = fresh.render(job)
    assert not got.cached and np.array_equal(np.asarray(got.image), np.asarray(want.image))
    notes = [m for m in caplog.messages if "tiny-flux" in m and "bitsandbytes quantizer does no" in m]
    assert len(notes) == 1 and f"no {quantization} on CPU; loading float32 weights instead" in notes[0]
    loads = [e.detail for e in fresh.devices.history if e.component == "diffusion" and e.action == "load"]
    assert loads == ["tiny-flux (float32)"]  # the load event names what was loaded
    shared = Renderer(quantized, cache_dir=tmp_path / "cache")
    assert shared.key(job) == want.key and shared.render(job).cached


def test_no_host_sync_inside_the_transformer_nor_per_step(base, monkeypatch):
    """.nonzero() / .item() / .tolist() wait for the accelerator. None may run inside the
    transformer's forward for batched Merge, Composite or Switch, and the few outside it (the
    scheduler's sigma range, Z-Image's prompt lengths) are per render, not per step: as many at
    4 steps as at 2."""
    arch, renderer, pipe, names = base
    inside, calls = [False], []
    # Each way a tensor's value reaches Python: the methods, and the conversions `if t:`,
    # float(t), int(t) and t used as an index go through.
    for attr in ("nonzero", "item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, attr)

        def counted(self, *a, _original=original, _attr=attr, **k):
            calls.append((_attr, inside[0]))
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, attr, counted)
    nonzero = torch.nonzero
    monkeypatch.setattr(torch, "nonzero", lambda *a, **k: (calls.append(("torch.nonzero", inside[0])), nonzero(*a, **k))[1])
    pre = pipe.transformer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    post = pipe.transformer.register_forward_hook(lambda *a: inside.__setitem__(0, False))
    runs = {"merge": lambda s: methods.merge_many(pipe, names, [[0.7, 0.0, 1.1], [0.3, 0.9, 0.6]], PROMPT, s),
            "composite": lambda s: methods.composite(pipe, names, WEIGHTS, PROMPT, s),
            "switch": lambda s: methods.switch(pipe, names, WEIGHTS, PROMPT, s)}
    counts = {}
    try:
        for method, render in runs.items():
            for steps in (2, 4):
                calls.clear()
                render(sampling(renderer.profile.diffusion, steps=steps))
                assert not [c for c in calls if c[1]], (method, steps, calls)
                counts[method, steps] = len(calls)
    finally:
        pre.remove()
        post.remove()
    assert all(counts[m, 2] == counts[m, 4] for m in runs), counts
