"""The tensor names kohya's sd-scripts writes for a LoRA module, from its diffusers module path.

    kohya_name("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "sd15")
        -> "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    kohya_name("unet", same path, "sdxl")     (kohya trains SDXL on the original SGM UNet)
        -> "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    kohya_name("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", "sdxl")
        -> "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"     (SD1.5: lora_te_, SDXL TE 2: lora_te2_)

The SGM block numbering is kohya's `library/sdxl_model_util.py` conversion map, generalised from
SDXL's 2 layers per block to any count (diffusers' own kohya loader undoes it the same way, from
the UNet config's `layers_per_block`): every down block holds layers_per_block (resnet, attention)
pairs and then a downsampler, every up block layers_per_block + 1 pairs and then an upsampler.
Inside a transformer block the names are diffusers' (attn1.to_q, ff.net.0.proj, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

from localora.errors import LocaloraError
from localora.kohya import kohya_flux_module, kohya_transformer_tensors  # noqa: F401  (the transformer bases' names)

# SDXL base: the defaults, so that callers with the full-size UNet need not pass them.
SDXL_LAYERS_PER_BLOCK = 2
SDXL_UP_BLOCKS = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")

TEXT_ENCODER_PREFIXES = {
    "sd15": {"text_encoder": "lora_te_"},
    "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
    "flux": {"text_encoder": "lora_te1_"},  # kohya trains Flux's CLIP-L only, never T5
}

# diffusers resnet layer -> SGM ResBlock layer (kohya's unet_conversion_map_resnet)
_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
           "conv_shortcut": "skip_connection"}
# Layers outside the down/mid/up blocks
_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2"}


def kohya_name(component: str, module: str, arch: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK,
               up_block_types: Sequence[str] = SDXL_UP_BLOCKS) -> str:
    """kohya's name for the LoRA on `module` (a diffusers/transformers module path) of `component`."""
    if component == "unet":
        path = sgm_module(module, layers_per_block, up_block_types) if arch == "sdxl" else module
        return "lora_unet_" + path.replace(".", "_")
    prefix = TEXT_ENCODER_PREFIXES.get(arch, {}).get(component)
    if prefix is None:
        raise LocaloraError(f"no kohya name for a LoRA on {component} of an {arch} pipeline")
    # kohya names CLIP layers under text_model (transformers 4's CLIPTextModel wraps one);
    # transformers 5's CLIPTextModel is that transformer itself, so its paths lack the prefix.
    if not module.startswith("text_model."):
        module = "text_model." + module
    return prefix + module.replace(".", "_")


def sgm_module(module: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK,
               up_block_types: Sequence[str] = SDXL_UP_BLOCKS) -> str:
    """The SGM (original SDXL repository) path of a diffusers UNet module path."""
    if not isinstance(layers_per_block, int):
        raise LocaloraError(f"the UNet has a different number of layers per block ({layers_per_block}); "
                            f"SGM (kohya SDXL) names are defined for one count only")
    for diffusers_name, sgm in _TOP.items():
        if module == diffusers_name or module.startswith(diffusers_name + "."):
            return sgm + module[len(diffusers_name):]
    parts = module.split(".")
    per = layers_per_block + 1  # SGM slots per down block (pairs + downsampler) = pairs per up block
    try:
        if parts[0] == "down_blocks":
            block, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv -> input_blocks.N.0.op
                return ".".join([f"input_blocks.{per * (block + 1)}.0.op", *parts[5:]])
            head = f"input_blocks.{per * block + int(parts[3]) + 1}"
            return _inner(head, kind, parts[4:])
        if parts[0] == "mid_block":
            kind, index = parts[1], int(parts[2])
            head = "middle_block.1" if kind == "attentions" else f"middle_block.{2 * index}"
            return _inner(head, kind, parts[3:])
        if parts[0] == "up_blocks":
            block, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":  # after the block's last pair: slot 2 behind an attention, else 1
                slot = 2 if "CrossAttn" in up_block_types[block] else 1
                return ".".join([f"output_blocks.{per * block + layers_per_block}.{slot}", *parts[4:]])
            head = f"output_blocks.{per * block + int(parts[3])}"
            return _inner(head, kind, parts[4:])
    except (IndexError, ValueError):
        pass
    raise LocaloraError(f"UNet module {module}: no SGM (kohya SDXL) name is known for it")


def _inner(head: str, kind: str, rest: list[str]) -> str:
    if kind == "attentions":  # a transformer: diffusers' names inside it are SGM's too
        return ".".join([head if head.startswith("middle") else head + ".1", *rest])
    if kind == "resnets" and rest and rest[0] in _RESNET:
        return ".".join([head if head.startswith("middle") else head + ".0", _RESNET[rest[0]], *rest[1:]])
    raise LocaloraError(f"UNet {kind} layer {'.'.join(rest)}: no SGM (kohya SDXL) name is known for it")

