"""Tiny Qwen-family VLMs (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), random but deterministic, saved
exactly as a real checkpoint is laid out.

    build(out, seed)              tiny:qwen2-vl     Qwen2VLForConditionalGeneration
    build_qwen2_5_vl(out, seed)   tiny:qwen2.5-vl   Qwen2_5_VLForConditionalGeneration
    build_qwen3_vl(out, seed)     tiny:qwen3-vl     Qwen3VLForConditionalGeneration (deepstack)

Shapes follow ../shared/notes/offline-models.md (~0.2 M parameters each). The tokenizer is a
real Qwen2-style byte-level BPE trained offline in milliseconds on a small built-in corpus, with
the family's special tokens and its published chat template, so the prompt, the image-token
expansion and constrained decoding all go through the code paths real weights take. Gemma 3,
whose tokenizer is of another kind, is built in tiny/gemma.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Qwen2's pre-tokenizer split (digits one by one, as in the real tokenizer).
_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# In the real vocabulary's order (151643.. there; right after the BPE vocabulary here).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)
# Qwen2-VL-Instruct's chat template, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Training text for the BPE merges: the kinds of strings localora sends and receives.
_CORPUS = (
    'Picture 1: the character. Picture 2: the clothing. Picture 3: the style and the background.',
    'Which picture has the better composition? Rate composition and image quality from 0 to 10.',
    'The style LoRA is too strong and hides the face; lower it and raise the character weight.',
    '{"weights": {"lora_1": 0.80, "lora_2": 1.25, "lora_3": 0.45}}',
    '{"image_1": {"composition": 7.5, "quality": 6.0}, "image_2": {"composition": 8.0, "quality": 9.5}}',
    '{"feedback": "the outfit is missing, the background looks right", "weights": {"character": 1.00}}',
    '[{"a": 0.10, "b": 0.95}, {"a": 1.50, "b": 0.00}] choice 1 2 3 4 5 6 7 8 9 10 -0.25',
)
_MIN_PIXELS, _MAX_PIXELS = 56 * 56, 112 * 112


def tokenizer(specials: tuple[str, ...] = SPECIAL_TOKENS, template: str = CHAT_TEMPLATE):
    """A Qwen2-style byte-level BPE with `specials` after its vocabulary and `template` as its chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(list(_CORPUS) * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for token in specials:  # ids right after the BPE vocabulary, in Qwen's order
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=[tuple(m) for m in model["merges"]],
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tok.chat_template = template
    return tok


def build(out_dir: Path, seed: int) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor, \
        Qwen2VLVideoProcessor

    tok = tokenizer()
    ids = _qwen_ids(tok)
    # Padded to a multiple of 64 as real checkpoints are (152064 > 151657 tokens), so code that
    # confuses len(tokenizer) with the model's vocabulary size fails here too (_text_config).
    config = Qwen2VLConfig(
        text_config=_text_config(tok, ids, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                            "rope_theta": 10000.0}),
        vision_config=dict(
            # embed_dim 64, not the notes' 32: bitsandbytes' CPU 4-bit kernels need input
            # widths of at least one 64-wide quantization block (real models are far wider).
            depth=2, embed_dim=64, mlp_ratio=2, hidden_size=64, num_heads=4, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2,
        ),
        **_token_ids(ids),
    )
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=_MIN_PIXELS, max_pixels=_MAX_PIXELS),
        video_processor=Qwen2VLVideoProcessor(),
        tokenizer=tok, chat_template=CHAT_TEMPLATE,
    )
    _save_qwen(Qwen2VLForConditionalGeneration, config, tok, ids, processor, out_dir, seed)


# ------------------------------------------------------------------ Qwen2.5-VL and Qwen3-VL

# The special tokens of the real Qwen2.5/Qwen3 vocabularies (151643..), in their order.
SPECIAL_TOKENS_2_5 = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Qwen2.5-VL-Instruct ships Qwen2-VL's template unchanged.
CHAT_TEMPLATE_2_5 = CHAT_TEMPLATE
# Qwen3-VL-Instruct's chat template, verbatim but for its tool-call branches (localora never
# passes tools): no default system message, "Picture N: " labels with add_vision_id.
CHAT_TEMPLATE_3 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].content is string %}{{- messages[0].content }}{%- else %}"
    "{%- for content in messages[0].content %}{%- if 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}"
    "{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}{%- if message.role == \"user\" %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content %}{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == \"assistant\" %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for content_item in message.content %}"
    "{%- if 'text' in content_item %}{{- content_item.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _qwen_ids(tok) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                                                       "<|vision_start|>", "<|vision_end|>")}


def _save_qwen(model_cls, config, tok, ids, processor, out_dir: Path, seed: int) -> None:
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"], do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


def _text_config(tok, ids, **extra) -> dict:
    return dict(
        vocab_size=-(-len(tok) // 64) * 64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], **extra,
    )


def _token_ids(ids) -> dict:
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def build_qwen2_5_vl(out_dir: Path, seed: int) -> None:
    """Qwen2.5-VL: window attention in the vision tower (full attention in the blocks of
    fullatt_block_indexes), a SwiGLU vision MLP, 14-pixel patches merged 2x2 (28 px a token)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tok = tokenizer(SPECIAL_TOKENS_2_5, CHAT_TEMPLATE_2_5)
    ids = _qwen_ids(tok)
    config = Qwen2_5_VLConfig(
        text_config=_text_config(tok, ids, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                            "rope_theta": 10000.0}),
        # widths of 64: bitsandbytes' CPU 4-bit kernels need one 64-wide quantization block.
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        **_token_ids(ids),
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=_MIN_PIXELS, max_pixels=_MAX_PIXELS),
        video_processor=Qwen2VLVideoProcessor(), tokenizer=tok, chat_template=CHAT_TEMPLATE_2_5,
    )
    _save_qwen(Qwen2_5_VLForConditionalGeneration, config, tok, ids, processor, out_dir, seed)


def build_qwen3_vl(out_dir: Path, seed: int) -> None:
    """Qwen3-VL: 16-pixel patches merged 2x2 (32 px a token), learned position embeddings
    interpolated to the grid, deepstack (features of vision layer 0 added into the text model's
    first layers), interleaved M-RoPE; images normalised to [-1, 1] as its processor does."""
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor, Qwen3VLVideoProcessor)

    tok = tokenizer(SPECIAL_TOKENS_2_5, CHAT_TEMPLATE_3)
    ids = _qwen_ids(tok)
    config = Qwen3VLConfig(
        text_config=_text_config(tok, ids, head_dim=16, rope_parameters={
            "rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True, "rope_theta": 10000.0}),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        **_token_ids(ids),
    )
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                                              min_pixels=64 * 64, max_pixels=128 * 128),
        video_processor=Qwen3VLVideoProcessor(), tokenizer=tok, chat_template=CHAT_TEMPLATE_3,
    )
    _save_qwen(Qwen3VLForConditionalGeneration, config, tok, ids, processor, out_dir, seed)
