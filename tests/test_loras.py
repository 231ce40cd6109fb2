"""LoRA files: format, base, rank and trigger words from catalog, header and sidecar."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from localora.diffusion import loras
from localora.errors import LocaloraError


def test_inspect_reads_demo_files(demo_loras):
    by_name = {lo.name: lo for lo in demo_loras["sdxl"]}
    char = loras.inspect(by_name["demo-character"].path)
    assert (char.format, char.arch, char.rank, char.alpha) == ("diffusers", "sdxl", 4, None)
    assert char.triggers == "demo character, red hair"
    cloth = loras.inspect(by_name["demo-clothing"].path)
    assert (cloth.format, cloth.arch, cloth.alpha) == ("kohya", "sdxl", 2.0)
    assert set(cloth.targets) == {"to_q", "to_k", "to_v", "to_out.0"}
    assert cloth.triggers == "demo clothing, blue jacket"  # from ss_tag_frequency
    style = loras.inspect(by_name["demo-style"].path)
    assert style.triggers == "demo style, watercolor" and style.arch == "sdxl"  # from the A1111 sidecar
    assert loras.inspect(demo_loras["sd15"][0].path).arch == "sd15"


def _tiny_lora(path, metadata=None, te2=False):
    t = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
         "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)}
    if te2:
        t["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 8)
        t["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(8, 2)  # a down needs its up
    save_file(t, str(path), metadata=metadata or {})


def test_trigger_words_come_from_catalog_then_header_then_sidecar(tmp_path):
    f = tmp_path / "x.safetensors"
    _tiny_lora(f, {"modelspec.trigger_phrase": "from header"})
    f.with_suffix(".json").write_text(json.dumps({"activation text": "from sidecar"}))
    assert loras.lora_from_file(f).triggers == "from header"
    (tmp_path / "cat.toml").write_text('[loras.x]\nfile = "x.safetensors"\ncategory = "style"\ntriggers = "from catalog"\n')
    assert loras.read_catalog(tmp_path / "cat.toml")["x"].triggers == "from catalog"
    g = tmp_path / "y.safetensors"
    _tiny_lora(g)
    g.with_suffix(".json").write_text(json.dumps({"activation text": "from sidecar"}))
    assert loras.lora_from_file(g).triggers == "from sidecar"


def test_architecture_from_keys_when_metadata_is_silent(tmp_path):
    f = tmp_path / "xl.safetensors"
    _tiny_lora(f, te2=True)
    assert loras.inspect(f).arch == "sdxl"


def test_weights_parse_and_negative_is_legal(demo_loras):
    cat = {lo.name: lo for lo in demo_loras["sdxl"]}
    assert loras.parse_choice("demo-style:-0.5", cat).weight == -0.5
    assert loras.parse_choice("demo-style", cat).weight is None
    for bad in ("demo-style:abc", "demo-style:inf", "demo-style:nan"):
        with pytest.raises(LocaloraError):
            loras.parse_choice(bad, cat)


def test_switch_order_puts_character_first(demo_loras):
    mixed = [demo_loras["sdxl"][2], demo_loras["sdxl"][0], demo_loras["sdxl"][1]]
    assert [mixed[i].category for i in loras.switch_order(mixed)] == ["character", "clothing", "style"]


def test_trigger_words_are_appended_once():
    lo = [loras.Lora("a", None, triggers="red hair"), loras.Lora("b", None, triggers="blue coat")]
    assert loras.with_triggers("a girl, red hair", lo) == "a girl, red hair, blue coat"
