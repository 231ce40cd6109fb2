"""kohya's LoRA key names on the transformer bases (Flux.1, Z-Image), from diffusers module paths.

    kohya_flux_module("transformer_blocks.3.attn.to_k")  -> ("lora_unet_double_blocks_3_img_attn_qkv", 1, 3)
    kohya_transformer_tensors({module: (A, B)}, "flux")   -> kohya tensors, fused layers block-diagonal

Below diffusion/ and export/, so that the tiny builders write demo LoRAs with the same names the
bake writes (export/keys.py holds the UNet bases' names and re-exports these).
"""

from __future__ import annotations

from localora.errors import LocaloraError
# Flux: a diffusers module inside a block -> (BFL module, slot, slots). kohya's sd-scripts trains
# Flux on BFL's module tree, whose attention projections are fused: q, k, v (and, in single
# blocks, the MLP input) are slots of one `qkv` / `linear1` layer; diffusers' kohya converter
# splits them again (a block-diagonal up matrix is read back exactly).
FLUX_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0, 3), "attn.to_k": ("img_attn_qkv", 1, 3), "attn.to_v": ("img_attn_qkv", 2, 3),
    "attn.to_out.0": ("img_attn_proj", 0, 1),
    "attn.add_q_proj": ("txt_attn_qkv", 0, 3), "attn.add_k_proj": ("txt_attn_qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn_qkv", 2, 3), "attn.to_add_out": ("txt_attn_proj", 0, 1),
    "ff.net.0.proj": ("img_mlp_0", 0, 1), "ff.net.2": ("img_mlp_2", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp_0", 0, 1), "ff_context.net.2": ("txt_mlp_2", 0, 1),
    "norm1.linear": ("img_mod_lin", 0, 1), "norm1_context.linear": ("txt_mod_lin", 0, 1),
}
FLUX_SINGLE = {
    "attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", 0, 1), "norm.linear": ("modulation_lin", 0, 1),
}
FLUX_MLP_RATIO = 4  # single blocks' MLP width / hidden width (linear1's fourth slot)


def kohya_flux_module(module: str) -> tuple[str, int, int]:
    """(kohya name, slot, slots) of a diffusers FluxTransformer2DModel module path."""
    parts = module.split(".")
    table = {"transformer_blocks": (FLUX_DOUBLE, "double_blocks"),
             "single_transformer_blocks": (FLUX_SINGLE, "single_blocks")}.get(parts[0])
    inner = ".".join(parts[2:])
    if table is None or len(parts) < 3 or not parts[1].isdigit() or inner not in table[0]:
        raise LocaloraError(f"no kohya name for the Flux module {module}: kohya's Flux LoRAs cover the double and "
                            f"single blocks' attention, MLP and modulation layers only")
    name, slot, slots = table[0][inner]
    return f"lora_unet_{table[1]}_{parts[1]}_{name}", slot, slots


def kohya_transformer_tensors(layers: dict, arch: str, scale: float = 1.0) -> dict:
    """kohya-named tensors (lora_down / lora_up / alpha) of a transformer LoRA given per diffusers
    module as (A [r, in], B [out, r]) at effective scale `scale` (alpha / rank). Flux's fused layers
    get their slots' A stacked and their B block-diagonal, so each slot computes exactly B A."""
    import torch

    groups: dict[str, dict[int, tuple]] = {}
    slots_of: dict[str, int] = {}
    for module, (a, b) in layers.items():
        if arch == "flux":
            name, slot, slots = kohya_flux_module(module)
        else:
            name, slot, slots = "lora_unet_" + module.replace(".", "_"), 0, 1
        groups.setdefault(name, {})[slot] = (a, b)
        slots_of[name] = slots
    tensors = {}
    for name, parts in groups.items():
        hidden = next(iter(parts.values()))[0].shape[1]
        outs = [hidden * (FLUX_MLP_RATIO if slots_of[name] == 4 and i == 3 else 1) for i in range(slots_of[name])]
        if slots_of[name] == 1:
            a, b = parts[0]
            outs = [b.shape[0]]
        present = sorted(parts)
        rank = sum(parts[i][0].shape[0] for i in present)
        down = torch.cat([parts[i][0] for i in present])
        up = torch.zeros(sum(outs), rank, dtype=down.dtype)
        col = 0
        for i in present:
            a, b = parts[i]
            row = sum(outs[:i])
            up[row:row + b.shape[0], col:col + a.shape[0]] = b
            col += a.shape[0]
        tensors[f"{name}.lora_down.weight"] = down.contiguous()
        tensors[f"{name}.lora_up.weight"] = up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(scale * rank))
    return tensors
