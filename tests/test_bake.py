"""Baking: the baked LoRA alone at weight 1.0 renders what Merge renders of its sources.

The sources are the demo LoRAs (rank 4, UNet attention only; one kohya file with alpha 2) plus two
built here on the tiny pipeline's own modules: a peft LoRA saved by diffusers (rank 2, alpha 3) with
text-encoder layers, and a kohya-format one of rank 3, alpha 1.5 on other layers, a conv layer among them and
its own text-encoder layers. So layers touched by one, several or all sources, of different
ranks and scales, linear and conv, UNet and text encoders, are all in one bake.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from localora.diffusion import loras as loralib
from localora.diffusion import methods
from localora.diffusion.loras import Lora
from localora.diffusion.render import RenderJob
from localora.diffusion.sampling import Sampling
from localora.errors import LocaloraError
from localora.export.bake import bake_lora
from localora.files import file_hash

SMALL = dict(width=32, height=32)
PROMPT = "a portrait, demo character"
WEIGHTS = [0.8, -0.5, 1.2, 0.7, 1.1]  # demo character, clothing, style, extra-te, extra-conv
# Text-encoder LoRAs cover all four attention projections, as kohya's and diffusers' trainers do:
# diffusers 0.42 silently drops a kohya text-encoder LoRA's self-attention layers when out_proj is not among them.
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
ENCODERS = {"sd15": {"text_encoder": "lora_te_"}, "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}}


def renderer_for(arch, sdxl_renderer, sd15_renderer):
    return sdxl_renderer if arch == "sdxl" else sd15_renderer


def random_factors(model: torch.nn.Module, suffixes: tuple[str, ...], rank: int, seed: int, contains: str = ""):
    """module name -> (A, B) for every Linear/Conv2d of `model` whose name ends with a suffix
    (the base layer of a module that already carries peft adapters)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", module)
        if not name.endswith(suffixes) or contains not in name:
            continue
        if isinstance(base, torch.nn.Linear):
            a = torch.randn(rank, base.in_features, generator=g) / base.in_features**0.5
            b = torch.randn(base.out_features, rank, generator=g) / rank**0.5
        elif isinstance(base, torch.nn.Conv2d):
            fan_in = base.in_channels * base.kernel_size[0] * base.kernel_size[1]
            a = torch.randn(rank, base.in_channels, *base.kernel_size, generator=g) / fan_in**0.5
            b = torch.randn(base.out_channels, rank, 1, 1, generator=g) * 0.3 / rank**0.5
        else:
            continue
        out[name] = (a, b)
    return out


def peft_lora(arch: str, folder) -> Path:
    """A LoRA as diffusers' training scripts make one: peft adapters (rank 2, alpha 3: scale 1.5,
    random A and B) on fresh copies of the tiny UNet and text encoders, saved by the pipeline's
    save_lora_weights with its adapter metadata. Self-attention q/v in the UNet; attention and
    fc1 in every text encoder."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from localora import tiny

    root = tiny.ensure(arch)
    torch.manual_seed(21)
    parts = {"unet": (UNet2DConditionModel, r".*attn1\.(to_q|to_v)"),
             "text_encoder": (CLIPTextModel, r".*(self_attn\.(q|k|v|out)_proj|mlp\.fc1)")}
    if arch == "sdxl":
        parts["text_encoder_2"] = (CLIPTextModelWithProjection, parts["text_encoder"][1])
    layers, metadata = {}, {}
    for component, (cls, targets) in parts.items():
        config = LoraConfig(r=2, lora_alpha=3, target_modules=targets, init_lora_weights=False)
        model = inject_adapter_in_model(config, cls.from_pretrained(root / component))
        layers[f"{component}_lora_layers"] = get_peft_model_state_dict(model)
        metadata[f"{component}_lora_adapter_metadata"] = config.to_dict()
    pipeline = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    name = f"extra-te-{arch}.safetensors"
    pipeline.save_lora_weights(folder, weight_name=name, **layers, **metadata)
    return folder / name


@pytest.fixture(scope="module")
def sources(demo_loras, sdxl_renderer, sd15_renderer, tmp_path_factory):
    """arch -> the five source LoRAs."""
    folder = tmp_path_factory.mktemp("bake-sources")
    out = {}
    for arch in ("sdxl", "sd15"):
        pipe = renderer_for(arch, sdxl_renderer, sd15_renderer).pipeline()
        te_path = peft_lora(arch, folder)
        # kohya layout, rank 3 with alpha 1.5 (scale 0.5), on cross-attention, a resnet conv and the text encoders
        tensors = {}
        unet = random_factors(pipe.unet, ("attn2.to_k", "attn2.to_out.0", "resnets.0.conv1"), 3, seed=7)
        named = {"lora_unet_" + n.replace(".", "_"): f for n, f in unet.items()}
        for component, prefix in ENCODERS[arch].items():
            factors = random_factors(getattr(pipe, component), ATTENTION + ("mlp.fc2",), 3, seed=8)
            named |= {prefix + n.replace(".", "_"): f for n, f in factors.items()}
        for key, (a, b) in named.items():
            tensors |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(1.5)}
        conv_path = folder / f"extra-conv-{arch}.safetensors"
        save_file(tensors, str(conv_path), metadata={"ss_base_model_version": "sdxl_base_v1-0" if arch == "sdxl" else "sd_v1"})
        out[arch] = demo_loras[arch] + [Lora("extra-te", te_path, "object", "extra te"),
                                        Lora("extra-conv", conv_path, "background", "")]
    return out


@pytest.fixture(scope="module")
def baked(sources, sdxl_renderer, sd15_renderer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("baked")
    return {arch: bake_lora(renderer_for(arch, sdxl_renderer, sd15_renderer), sources[arch], WEIGHTS,
                            folder / f"baked-{arch}.safetensors")
            for arch in ("sdxl", "sd15")}


def sampling(steps=3):
    return Sampling(negative_prompt="", steps=steps, guidance=5.0, seed=4, **SMALL)


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_baked_lora_alone_renders_the_merge_of_its_sources(arch, sources, baked, sdxl_renderer, sd15_renderer):
    renderer = renderer_for(arch, sdxl_renderer, sd15_renderer)
    result = baked[arch]
    lora = Lora("baked", result.path)
    pipe = renderer.pipeline()
    merge = methods.get("merge")
    expected = merge.run(pipe, renderer.adapters_for(sources[arch]), WEIGHTS, PROMPT, sampling(), None)
    got = merge.run(pipe, renderer.adapters_for([lora]), [1.0], PROMPT, sampling(), None)
    base = merge.run(pipe, renderer.adapters_for(sources[arch]), [0.0] * 5, PROMPT, sampling(), None)
    relative = float((got - expected).abs().max() / expected.abs().max())
    print(f"{arch}: max relative latent difference {relative:.2e}")
    assert relative <= 1e-5
    assert float((base - expected).abs().max() / expected.abs().max()) > 1e-2  # the LoRAs do change the image

    images = [np.asarray(renderer.render(RenderJob(PROMPT, loras, weights, sampling=sampling())).image, dtype=np.int16)
              for loras, weights in ((tuple(sources[arch]), tuple(WEIGHTS)), ((lora,), (1.0,)))]
    pixels = int(np.abs(images[0] - images[1]).max())
    print(f"{arch}: max pixel difference {pixels}")
    assert pixels <= 1


def test_text_encoder_lora_without_out_proj_bakes_exactly(demo_loras, sd15_renderer, tmp_path):
    # A peft LoRA on q_proj/v_proj only: diffusers would drop these layers from a kohya file
    # unless it has an out_proj layer, so the bake adds a zero one.
    pipe = sd15_renderer.pipeline()
    tensors = {}
    for component, suffixes in (("unet", ("attn1.to_k",)), ("text_encoder", ("self_attn.q_proj", "self_attn.v_proj"))):
        for name, (a, b) in random_factors(getattr(pipe, component), suffixes, 2, seed=10).items():
            tensors |= {f"{component}.{name}.lora_A.weight": a, f"{component}.{name}.lora_B.weight": b}
    path = tmp_path / "te-qv.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1"})
    loras, weights = [demo_loras["sd15"][0], Lora("te-qv", path)], [0.9, 1.3]
    result = bake_lora(sd15_renderer, loras, weights, tmp_path / "baked.safetensors")
    assert result.ranks["lora_te_text_model_encoder_layers_0_self_attn_out_proj"] == 1
    merge = methods.get("merge")
    expected = merge.run(pipe, sd15_renderer.adapters_for(loras), weights, PROMPT, sampling(), None)
    got = merge.run(pipe, sd15_renderer.adapters_for([Lora("baked", result.path)]), [1.0], PROMPT, sampling(), None)
    without_te = merge.run(pipe, sd15_renderer.adapters_for(loras[:1]), weights[:1], PROMPT, sampling(), None)
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-5
    assert float((without_te - expected).abs().max() / expected.abs().max()) > 1e-3  # the text encoder layers count


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_ranks_add_up_where_loras_share_a_layer(arch, baked):
    ranks = baked[arch].ranks
    te = ENCODERS[arch]["text_encoder"]
    if arch == "sdxl":  # SGM names: down_blocks.0.attentions.0 is input_blocks.1.1 with one layer per block
        shared = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
        conv = "lora_unet_input_blocks_1_0_in_layers_2"
    else:
        shared = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert ranks[shared] == 3 * 4 + 2  # the three demo LoRAs and extra-te
    assert ranks[conv] == 3  # extra-conv alone
    assert ranks[f"{te}text_model_encoder_layers_0_self_attn_q_proj"] == 2 + 3
    assert ranks[f"{te}text_model_encoder_layers_1_mlp_fc1"] == 2
    assert baked[arch].max_rank == max(ranks.values()) == 3 * 4 + 3  # cross-attention: the demo LoRAs and extra-conv
    with safe_open(str(baked[arch].path), framework="pt") as f:
        assert f.get_tensor(f"{conv}.lora_down.weight").shape[2:] == (3, 3)
        assert f.get_tensor(f"{conv}.lora_up.weight").shape[1:] == (3, 1, 1)
        # One alpha for the whole file (the largest rank): see bake.concatenate for why.
        assert {f.get_tensor(k).item() for k in f.keys() if k.endswith(".alpha")} == {15.0}
        assert f.get_tensor(f"{shared}.lora_down.weight").dtype == torch.float32


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_header_tells_kohya_base_rank_and_triggers(arch, sources, baked):
    info = loralib.inspect(baked[arch].path)
    assert (info.format, info.arch, info.rank, info.alpha) == ("kohya", arch, 15, 15.0)
    assert info.triggers == "demo character, red hair, demo clothing, blue jacket, demo style, watercolor, extra te"
    md = info.metadata
    assert md["ss_network_module"] == "networks.lora"
    assert md["ss_network_dim"] == md["ss_network_alpha"] == "15"
    assert md["ss_base_model_version"] == {"sdxl": "sdxl_base_v1-0", "sd15": "sd_v1"}[arch]
    assert md["modelspec.architecture"] == {"sdxl": "stable-diffusion-xl-v1-base/lora", "sd15": "stable-diffusion-v1/lora"}[arch]
    assert md["modelspec.sai_model_spec"] == "1.0.0"
    assert md["ss_output_name"] == f"baked-{arch}"
    assert md["modelspec.title"] == "demo-character+demo-clothing+demo-style+extra-te+extra-conv"
    assert info.components == (("text_encoder", "text_encoder_2", "unet") if arch == "sdxl" else ("text_encoder", "unet"))
    record = json.loads(md["localora"])
    assert [s["sha256"] for s in record["sources"]] == [file_hash(lora.path) for lora in sources[arch]]
    assert [s["weight"] for s in record["sources"]] == WEIGHTS
    assert record["profile"] == {"sdxl": "tiny", "sd15": "tiny-sd15"}[arch]


def test_refusals(sources, sdxl_renderer, tmp_path):
    loras, out = sources["sdxl"], tmp_path / "x.safetensors"
    cases = [
        ([], [], "no LoRAs given"),
        (loras[:2], [1.0], "2 LoRAs but 1 weights"),
        (loras[:2], [1.0, float("nan")], "not finite"),
        ([loras[0], sources["sd15"][1]], [1.0, 1.0], "different base models"),
    ]
    for given, weights, message in cases:
        with pytest.raises(LocaloraError, match=message) as e:
            bake_lora(sdxl_renderer, given, weights, out)
        assert "\n" not in str(e.value)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(LocaloraError, match="a file is in the way|a part of the path is a file"):
        bake_lora(sdxl_renderer, loras[:1], [1.0], blocker / "baked.safetensors")
    with pytest.raises(LocaloraError, match=r"must be a \.safetensors file"):
        bake_lora(sdxl_renderer, loras[:1], [1.0], tmp_path / "baked.ckpt")
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [("lora_magnitude_vector", "DoRA"), ("lora_B.bias", "a LoRA bias")])
def test_lora_variants_are_refused(extra, message, sdxl_renderer, tmp_path):
    pipe = sdxl_renderer.pipeline()
    tensors = {}
    for name, (a, b) in random_factors(pipe.unet, ("attn1.to_q",), 2, seed=9).items():
        tensors |= {f"unet.{name}.lora_A.weight": a, f"unet.{name}.lora_B.weight": b,
                    f"unet.{name}.{extra}": torch.ones(b.shape[0])}
    path = tmp_path / f"{message.split()[-1].lower()}.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(LocaloraError, match=message) as e:
        bake_lora(sdxl_renderer, [Lora("variant", path)], [1.0], tmp_path / "baked.safetensors")
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert not (tmp_path / "baked.safetensors").exists()


# ------------------------------------------------------------------ kohya key names

SDXL_NAMES = {  # diffusers path -> the SGM path kohya's sd-scripts uses for full-size SDXL
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.2.attentions.1.proj_in": "input_blocks.8.1.proj_in",
    "down_blocks.0.resnets.1.time_emb_proj": "input_blocks.2.0.emb_layers.1",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "mid_block.attentions.0.transformer_blocks.3.attn2.to_out.0": "middle_block.1.transformer_blocks.3.attn2.to_out.0",
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2": "output_blocks.2.1.transformer_blocks.9.ff.net.2",
    "up_blocks.2.resnets.2.conv1": "output_blocks.8.0.in_layers.2",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
}


def test_sgm_names_are_kohyas():
    from localora.export.keys import kohya_name, sgm_module

    assert {d: sgm_module(d) for d in SDXL_NAMES} == SDXL_NAMES
    assert kohya_name("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "sdxl") == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert kohya_name("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "sd15") == \
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    # transformers 5's CLIPTextModel has no text_model wrapper; kohya's names keep it
    assert kohya_name("text_encoder", "encoder.layers.0.self_attn.q_proj", "sd15") == \
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_name("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1", "sdxl") == \
        "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    with pytest.raises(LocaloraError, match="no SGM"):
        sgm_module("down_blocks.0.resnets.0.norm1")


def test_sgm_names_round_trip_through_diffusers_on_full_sdxl():
    """Every linear and conv layer of the full-size SDXL UNet: its kohya name, read back by
    diffusers' own kohya loader (lora_state_dict), is the layer again."""

    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_unet_state_dict_to_peft

    from localora.export.keys import kohya_name

    config = json.loads((Path(__file__).parent.parent / "scripts" / "fullsize" / "sdxl_unet.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    layers = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    state = {}
    for name in layers:
        key = kohya_name("unet", name, "sdxl", unet.config.layers_per_block, unet.config.up_block_types)
        state |= {f"{key}.lora_down.weight": torch.zeros(1), f"{key}.lora_up.weight": torch.zeros(1),
                  f"{key}.alpha": torch.tensor(1.0)}
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet.config)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert len(layers) > 700
    assert {k.removesuffix(".lora_A.weight") for k in peft if k.endswith(".lora_A.weight")} == set(layers)
