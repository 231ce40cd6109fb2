"""Per-block LoRA weights (LoRA Block Weight's lbw=): against the scalar render, the LoRA left out,
each layer's own output, one-at-a-time renders, the baked file, and the A1111 text read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from localora.cli import main
from localora.diffusion import blocks, methods
from localora.diffusion.render import RenderJob
from localora.diffusion.rows import row_weights
from localora.diffusion.sampling import Sampling
from localora.errors import LocaloraError
from localora.export import read_source
from support import one_error_line

PROMPT = "a portrait, demo character"
SMALL = ("--steps", "2", "--width", "32", "--height", "32")


def sampling(renderer, steps=3, seed=1):
    return Sampling(negative_prompt="", steps=steps, guidance=5.0, seed=seed, width=32,
                    height=32).resolved(renderer.profile.diffusion)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


# ------------------------------------------------------------------ layouts and presets

def test_presets_follow_the_extension_and_sdxl_keeps_all_ones():
    assert len(blocks.preset("ALL", "sd15")) == 17 and len(blocks.preset("ALL", "sdxl")) == 12
    assert blocks.preset("INS", "sd15") == (1, 1, 1, 1) + (0,) * 13
    assert blocks.preset("OUTD", "sd15") == (1,) + (0,) * 7 + (1, 1, 1, 1) + (0,) * 5
    assert blocks.preset("ALL", "sdxl") == (1.0,) * 12
    # SDXL OUT00-OUT02 sit at SD1.5's OUT03-OUT05 depth: OUTD covers them, OUTS the shallowest two.
    assert blocks.preset("OUTD", "sdxl") == (1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0)
    assert blocks.preset("OUTS", "sdxl") == (1,) + (0,) * 9 + (1, 1)
    assert blocks.parse("ins", "sdxl", "t") == blocks.preset("INS", "sdxl")
    assert blocks.parse("1,0,0.5,1,1,1,1,1,1,1,1,1", "sdxl", "t")[2] == 0.5
    assert blocks.text((1.0, 0.0, 0.25)) == "1,0,0.25"


def test_full_size_unet_maps_each_layout_entry_to_its_own_attention_block():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(  # SD1.5's block structure at a tiny width
        block_out_channels=(8, 8, 8, 8), layers_per_block=2, norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=2, sample_size=8)
    bmap = blocks.BlockMap.of(unet, "sd15")
    names = blocks.LAYOUTS["sd15"]
    assert names[bmap.slot("down_blocks.0.attentions.0.proj_in")] == "IN01"
    assert names[bmap.slot("down_blocks.0.resnets.1.conv1")] == "IN02"
    assert names[bmap.slot("down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q")] == "IN08"
    assert names[bmap.slot("mid_block.resnets.1.conv2")] == "M00"
    assert names[bmap.slot("up_blocks.1.attentions.0.proj_out")] == "OUT03"
    assert names[bmap.slot("up_blocks.3.attentions.2.proj_out")] == "OUT11"
    assert names[bmap.slot("up_blocks.2.upsamplers.0.conv")] == "OUT08"
    assert bmap.slot("down_blocks.0.downsamplers.0.conv") == bmap.unlisted  # IN03: not in the 17 layout
    assert bmap.slot("up_blocks.0.resnets.0.conv1") == bmap.unlisted  # OUT00: no attention, not listed
    assert bmap.slot("conv_in") == bmap.unlisted and bmap.slot("time_embedding.linear_1") == bmap.outside


def test_bad_block_input_is_one_line_each():
    with pytest.raises(LocaloraError, match="has 3 values but the SDXL layout has 12"):
        blocks.parse("1,0,1", "sdxl", "--lora x")
    with pytest.raises(LocaloraError, match="not a preset"):
        blocks.parse("SOMETIMES", "sd15", "--lora x")
    with pytest.raises(LocaloraError, match="Flux.1 base has no block layout"):
        blocks.parse("ALL", "flux", "--lora x")


def test_bad_block_input_on_the_command_line_exits_2(tmp_path):
    out = tmp_path / "x.png"
    for spec, words in (("demo-style:1:lbw=1,0,1", ("12",)), ("demo-style:1:lbw=NOPE", ("NOPE", "preset"))):
        result = run("generate", "a cat", "-l", spec, *SMALL, "-o", out)
        one_error_line(result, *words)
        assert result.exit_code == 2
    result = run("generate", "a cat <lora:demo-style:1:lbw=1,1>", *SMALL, "-o", out)
    one_error_line(result, "<lora:demo-style:1:lbw=1,1>")
    result = run("generate", "a cat", "-l", "demo-style:1:lbw=ALL", "-p", "tiny-flux", *SMALL, "-o", out)
    one_error_line(result, "no block layout")
    assert result.exit_code == 2 and not out.exists()
    # compose searches the weights itself: a fixed lbw= there is refused, not dropped.
    result = run("compose", "a cat", "-l", "demo-style", "-l", "demo-character:1:lbw=INS", "--out", tmp_path / "run")
    one_error_line(result, "demo-character", "lbw=")
    assert result.exit_code == 2 and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ renders

@pytest.mark.parametrize("method", ["merge", "composite"])
def test_lbw_all_equals_the_scalar_render_and_none_equals_the_lora_left_out(method, sdxl_renderer, demo_loras):
    pipe = sdxl_renderer.pipeline()
    names = sdxl_renderer.adapters_for(demo_loras["sdxl"][:2])
    s = sampling(sdxl_renderer)
    run_ = methods.get(method).run
    scalar = run_(pipe, names, [0.7, 0.5], PROMPT, s)
    assert torch.equal(scalar, run_(pipe, names, [0.7, 0.5], PROMPT, s, blocks=[blocks.preset("ALL", "sdxl"), None]))
    if method == "merge":  # Composite averages over its LoRAs, so one fewer changes the mean
        alone = run_(pipe, names[:1], [0.7], PROMPT, s)
        assert torch.equal(alone, run_(pipe, names, [0.7, 0.5], PROMPT, s, blocks=[None, blocks.preset("NONE", "sdxl")]))


def _layer_outputs(unet, inputs) -> dict[str, torch.Tensor]:
    return {name: layer(x) for name, (layer, x) in inputs.items()}


@pytest.mark.parametrize("path", ["set_adapters", "rows"])
def test_one_block_changed_changes_only_that_blocks_layers(path, sdxl_renderer, demo_loras):
    """Every LoRA layer of the UNet run on the input it saw once: after IN07's multiplier changes,
    only IN07's layers give another output, and their LoRA term scales by the multiplier ratio."""
    pipe = sdxl_renderer.pipeline()
    unet = pipe.unet
    names = sdxl_renderer.adapters_for(demo_loras["sdxl"][:2])
    bmap = blocks.BlockMap.of(unet, "sdxl")
    # the layers of this test's first LoRA (a shared pipeline keeps other tests' emptied LoRA layers)
    layers = {n: layer for n, layer in blocks.lora_modules(unet) if names[0] in layer.lora_A}
    inputs: dict[str, tuple] = {}
    def keep(name):
        def hook(module, args, output):
            inputs.setdefault(name, (module, args[0].detach()))  # returns None: the output stays
        return hook

    hooks = [layer.register_forward_hook(keep(n)) for n, layer in layers.items()]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    extra = {"text_embeds": torch.zeros(1, 32), "time_ids": torch.zeros(1, 6)}
    base = list(blocks.preset("ALL", "sdxl"))
    changed = list(base)
    where = blocks.LAYOUTS["sdxl"].index("IN07")
    changed[where] = 0.25
    with torch.no_grad():
        blocks.set_block_weights(unet, "sdxl", names, [0.8, 0.6], [base, None])
        unet(x, 10, encoder_hidden_states=cond, added_cond_kwargs=extra)
        for h in hooks:
            h.remove()

        def outputs(vector):
            if path == "set_adapters":
                blocks.set_block_weights(unet, "sdxl", names, [0.8, 0.6], [vector, None])
                return _layer_outputs(unet, {n: (layers[n], xi) for n, (_, xi) in inputs.items()}), None
            with row_weights(unet, names, bmap) as rows:
                rows.set(torch.tensor([[0.8, 0.6]], dtype=torch.float64),
                         torch.tensor([[blocks.multipliers(vector, "sdxl"), blocks.multipliers(None, "sdxl")]],
                                      dtype=torch.float64))
                return _layer_outputs(unet, {n: (layers[n], xi) for n, (_, xi) in inputs.items()}), None

        before, _ = outputs(base)
        after, _ = outputs(changed)
        plain = {n: layers[n].base_layer(xi) for n, (_, xi) in inputs.items()}
        unet.set_adapters(names[1:], weights=[0.6])
        other = {n: layers[n](xi) - plain[n] for n, (_, xi) in inputs.items()}  # the second LoRA's term alone
    assert inputs, "no LoRA layer ran"
    moved = {n for n in inputs if not torch.equal(before[n], after[n])}
    assert moved == {n for n in inputs if bmap.slot(n) == where} and moved
    for n in moved:  # (term of LoRA 1) x 0.25 where it was x 1
        first = before[n] - plain[n] - other[n]
        torch.testing.assert_close(after[n] - plain[n] - other[n], 0.25 * first, rtol=1e-4, atol=1e-6)


def test_batched_block_merge_equals_one_at_a_time(sdxl_renderer, demo_loras):
    pipe = sdxl_renderer.pipeline()
    names = sdxl_renderer.adapters_for(demo_loras["sdxl"])
    s = sampling(sdxl_renderer)
    rows = [[0.7, 0.5, 1.1], [0.3, 0.9, 0.6], [1.0, 1.0, 1.0]]
    per_image = [[blocks.preset("INS", "sdxl"), None, blocks.parse("0,1,1,1,1,0.5,1,1,1,0,0,2", "sdxl", "t")],
                 [None, blocks.preset("OUTD", "sdxl"), None], None]
    batched = methods.merge_many(pipe, names, rows, PROMPT, s, blocks=per_image)
    for m, (w, b) in enumerate(zip(rows, per_image)):
        one = methods.merge(pipe, names, w, PROMPT, s, blocks=b)
        relative = float((batched[m:m + 1] - one).abs().max() / one.abs().max())
        assert relative <= 1e-5, (m, relative)


def test_no_host_sync_inside_the_denoiser(sdxl_renderer, demo_loras, monkeypatch):
    """.nonzero() / .item() / .tolist() wait for the accelerator; none may run inside a denoiser
    pass of batched Merge or Composite (counted while the UNet runs)."""
    pipe = sdxl_renderer.pipeline()
    names = sdxl_renderer.adapters_for(demo_loras["sdxl"])
    s = sampling(sdxl_renderer)
    inside, calls = [False], []
    for attr in ("nonzero", "item", "tolist"):
        original = getattr(torch.Tensor, attr)

        def counted(self, *a, _original=original, _attr=attr, **k):
            if inside[0]:
                calls.append(_attr)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, attr, counted)
    pre = pipe.unet.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True))
    post = pipe.unet.register_forward_hook(lambda *a: inside.__setitem__(0, False))
    try:
        ins = blocks.preset("INS", "sdxl")
        methods.merge_many(pipe, names, [[0.7, 0.0, 1.1], [0.3, 0.9, 0.6]], PROMPT, s, blocks=[[ins, None, None], None])
        methods.composite(pipe, names, [0.7, 0.5, 1.1], PROMPT, s)
        methods.composite(pipe, names, [0.7, 0.5, 1.1], PROMPT, s, blocks=[None, ins, None])
    finally:
        pre.remove()
        post.remove()
    assert calls == []


def test_render_cache_key_and_metadata_carry_block_weights(sdxl_renderer, demo_loras):
    loras = tuple(demo_loras["sdxl"][:2])
    s = Sampling(negative_prompt="", steps=2, guidance=5.0, seed=1, width=32, height=32)
    plain = RenderJob(PROMPT, loras, (0.7, 0.5), sampling=s)
    ins = blocks.preset("INS", "sdxl")
    with_blocks = RenderJob(PROMPT, loras, (0.7, 0.5), sampling=s, blocks=(ins, None))
    assert sdxl_renderer.key(plain) != sdxl_renderer.key(with_blocks)
    # All-None block vectors are no block weights: the key of the plain job.
    assert sdxl_renderer.key(RenderJob(PROMPT, loras, (0.7, 0.5), sampling=s, blocks=(None, None))) == \
        sdxl_renderer.key(plain)
    rendered = sdxl_renderer.render(with_blocks)
    source = read_source(rendered.path)
    assert source.info.blocks == (ins, None)
    assert f"<lora:{loras[0].path.stem}:0.7:lbw={blocks.text(ins)}>" in source.infotext
    assert f"<lora:{loras[1].path.stem}:0.5>" in source.infotext
    assert "prompt" not in __import__("localora.export", fromlist=["x"]).png.text_chunks(rendered.path)  # no ComfyUI graph


def test_lbw_text_round_trips_through_generate_from_and_bakes(sdxl_renderer, demo_loras, tmp_path):
    from localora.diffusion import loras as loralib

    made = tmp_path / "made.png"
    result = run("generate", "a girl, garden <lora:demo-style:1.2:lbw=OUTD>", "-l", "demo-character:0.6:lbw=INS",
                 "--seed", "3", *SMALL, "-o", made)
    assert result.exit_code == 0, result.output
    info = read_source(made).info
    assert info.blocks == (blocks.preset("INS", "sdxl"), blocks.preset("OUTD", "sdxl"))
    again = tmp_path / "again.png"
    result = run("generate", "--from", made, "-o", again)
    assert result.exit_code == 0 and "cache" in result.output, result.output
    assert again.read_bytes() == made.read_bytes()
    # The A1111 text alone (no localora entry) renders the same image: its lbw= items are read back.
    text = run("export", made, "--to", "a1111")
    assert text.exit_code == 0 and ":lbw=1,1,0,0,0,0,0,0,0,0,0,0>" in text.output, text.output
    from PIL.PngImagePlugin import PngInfo

    stock, meta = tmp_path / "stock.png", PngInfo()
    meta.add_text("parameters", text.output.strip())
    Image.new("RGB", (8, 8)).save(stock, pnginfo=meta)
    replayed = tmp_path / "replayed.png"
    result = run("generate", "--from", stock, "-o", replayed)
    assert result.exit_code == 0, result.output
    assert read_source(replayed).info.blocks == info.blocks
    assert np.abs(pixels(replayed) - pixels(made)).max() <= 1
    # The baked LoRA alone at 1.0 renders the block-weighted Merge within one level.
    baked = tmp_path / "baked.safetensors"
    result = run("export", made, "--to", "lora", "-o", baked)
    assert result.exit_code == 0 and "lbw=" in result.output, result.output
    s = Sampling(seed=info.seed, negative_prompt=info.negative_prompt, steps=info.steps, guidance=info.guidance,
                 width=info.width, height=info.height)
    alone = sdxl_renderer.render(RenderJob(info.prompt, (loralib.lora_from_file(baked),), (1.0,), "merge", s))
    assert np.abs(np.asarray(alone.image, dtype=np.int16) - pixels(made)).max() <= 1
    # Not the plain Merge: the block weights changed the image.
    plain = sdxl_renderer.render(RenderJob(info.prompt, tuple(loralib.lora_from_file(p) for p in
                                                              [demo_loras["sdxl"][0].path, demo_loras["sdxl"][2].path]),
                                           info.weights, "merge", s))
    assert np.abs(np.asarray(plain.image, dtype=np.int16) - pixels(made)).max() > 1
