"""Tiny flow-matching transformer pipelines (Flux.1, Z-Image) and their demo LoRAs, random but
deterministic, saved exactly as the real repositories are laid out.

Shapes follow diffusers' own fast tests of these pipelines: two double- and two single-stream
blocks for Flux, two main and one refiner layer for Z-Image, hidden widths of 16-32. Every
tokenizer is built offline: Flux's CLIP tokenizer is the real CLIP BPE (as for the tiny SDXL),
its T5 tokenizer a SentencePiece-style Unigram trained in milliseconds, Z-Image's Qwen3 tokenizer
the byte-level BPE of the tiny Qwen2-VL with Qwen3's chat template.
"""

from __future__ import annotations

from pathlib import Path

import torch

from localora.tiny.diffusion import _TEXT, clip_tokenizer

# Flux.1-dev's scheduler config (shift 3, resolution-dependent shift on).
FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, shift=3.0,
                      use_dynamic_shifting=True, num_train_timesteps=1000)
# Z-Image-Turbo's scheduler config.
ZIMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
# The layers the demo LoRAs train, by each base's diffusers module names (what ai-toolkit and
# kohya target by default: every attention projection).
# Flux's single-block attention (kohya's fused `linear1`) is left out: diffusers reads kohya's
# linear1 at Flux.1's own widths (3072/12288) only, so a tiny kohya file could not carry it.
FLUX_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "proj_out")
ZIMAGE_TARGETS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")

# Text the tokenizers are trained on: prompts as localora writes them.
_CORPUS = (
    "a portrait of a demo character with red hair, wearing a blue jacket, watercolor style",
    "masterpiece, best quality, a photo of a woman in a city street at night, cinematic lighting",
    "an anime girl with long hair in a school uniform, cherry blossoms, detailed background",
    "low quality, blurry, deformed hands, extra fingers, watermark, text, jpeg artifacts",
    "a knight in shining armor, a red dragon, a castle on a hill, oil painting, 1024x1024",
)


def t5_tokenizer():
    """A T5-style tokenizer (Unigram over Metaspace pieces, </s> appended), as T5TokenizerFast loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(list(_CORPUS) * 8, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                           model_max_length=512)


# Qwen3's chat template, reduced to what a text-to-image prompt uses (one user turn, a generation
# prompt, the empty thinking block Z-Image's pipeline asks for with enable_thinking=True).
QWEN3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def qwen3_tokenizer():
    from localora.tiny.vlm import tokenizer

    tok = tokenizer()
    tok.chat_template = QWEN3_TEMPLATE
    return tok


def _vae(latent_channels: int, **kwargs):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=64,
        layers_per_block=1, **kwargs,
    )


def build_flux(out: Path, seed: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    t5 = t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=[4, 4, 8],
    )
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=-(-len(t5) // 64) * 64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=_vae(4, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                 use_post_quant_conv=False),
        text_encoder=CLIPTextModel(CLIPTextConfig(**_TEXT)), tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=t5, transformer=transformer,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def build_zimage(out: Path, seed: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tok = qwen3_tokenizer()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # created with torch.empty: fixed so that a build is deterministic
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    text_encoder = Qwen3Model(Qwen3Config(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, vocab_size=-(-len(tok) // 64) * 64, max_position_embeddings=512,
    ))
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER),
        vae=_vae(16, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder, tokenizer=tok, transformer=transformer,
    )
    pipe.save_pretrained(out, safe_serialization=True)


# ------------------------------------------------------------------ demo LoRAs

def random_lora(transformer: torch.nn.Module, targets: tuple[str, ...], rank: int, seed: int,
                blocks: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (A [rank, in], B [out, rank]) for every target layer inside `blocks`."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in transformer.named_modules():
        linear = getattr(module, "base_layer", module)
        if isinstance(linear, torch.nn.Linear) and name.startswith(blocks) and name.endswith(targets):
            a = torch.randn(rank, linear.in_features, generator=g) / linear.in_features**0.5
            b = torch.randn(linear.out_features, rank, generator=g) / rank**0.5
            layers[name] = (a, b)
    return layers


def _build_demo_loras(out: Path, seed: int, arch: str) -> None:
    import json

    from localora import archs, tiny
    from localora.kohya import kohya_transformer_tensors
    from localora.tiny.diffusion import DEMO_LORAS, save_diffusers_lora, save_safetensors

    base = archs.arch(arch)
    if arch == "flux":
        from diffusers import FluxTransformer2DModel as cls

        targets, blocks = FLUX_TARGETS, ("transformer_blocks.", "single_transformer_blocks.")
    else:
        from diffusers import ZImageTransformer2DModel as cls

        targets, blocks = ZIMAGE_TARGETS, ("layers.",)
    transformer = cls.from_pretrained(tiny.ensure(arch) / "transformer", use_safetensors=True)
    catalog = [f"# The demo LoRAs of the tiny {base.label} profile: random weights, real file formats.\n"]
    for i, (name, (category, triggers)) in enumerate(DEMO_LORAS.items()):
        layers = random_lora(transformer, targets, rank=4, seed=seed + 101 * (i + 1), blocks=blocks)
        if arch == "flux":
            layers = {k: v for k, v in layers.items() if not k.startswith("single_transformer_blocks.")
                      or k.endswith("proj_out")}
        path = out / f"{name}.safetensors"
        if name == "demo-clothing":
            # kohya-ss names (Flux: BFL's fused qkv blocks), scale alpha / rank = 0.5.
            tensors = kohya_transformer_tensors(layers, arch, scale=0.5)
            freq = {f"10_{name}": {t.strip(): 10 for t in triggers.split(",")}}
            save_safetensors(tensors, path, {
                "ss_output_name": name, "ss_base_model_version": base.kohya_base, "ss_network_dim": "4",
                "ss_network_alpha": "2.0", "ss_tag_frequency": json.dumps(freq)})
        else:
            meta = {"modelspec.architecture": base.modelspec, "modelspec.title": name,
                    "modelspec.trigger_phrase": triggers} if name == "demo-character" else None
            save_diffusers_lora(path, layers, meta, component="transformer")
            if meta is None:
                (out / f"{name}.json").write_text(json.dumps({"activation text": triggers, "sd version": base.label}))
        catalog.append(f'[loras.{name}]\nfile = "{name}.safetensors"\ncategory = "{category}"\n'
                       f'triggers = "{triggers}"\n')
    (out / "catalog.toml").write_text("\n".join(catalog))


def build_demo_loras_flux(out: Path, seed: int) -> None:
    _build_demo_loras(out, seed, "flux")


def build_demo_loras_zimage(out: Path, seed: int) -> None:
    _build_demo_loras(out, seed, "zimage")
