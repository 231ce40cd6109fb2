"""A tiny Gemma 3 (Gemma3ForConditionalGeneration), random but deterministic, saved as a real
checkpoint is laid out.

    build(out, seed)    tiny:gemma-3    SigLIP tower -> pooled to mm_tokens_per_image -> Gemma 3 text

Gemma's tokenizer is not byte-level like Qwen's: a SentencePiece-style BPE where a space is "▁",
with byte fallback (<0x00>..<0xFF>) for what the vocabulary lacks. This one is trained offline in
milliseconds on the same small corpus as the tiny Qwens, wrapped as transformers' GemmaTokenizer,
with Gemma 3's special tokens (<bos>, <start_of_turn>, <end_of_turn>, <start_of_image>,
<end_of_image>, <image_soft_token>) and its published chat template, so xgrammar sees a byte-
fallback vocabulary as it does with the real one.

    image 56x56 -> SigLIP 14 px patches (4x4) -> avg-pooled 2x2 -> 4 <image_soft_token> embeddings,
    wrapped by the processor as "\\n\\n<start_of_image>" + 4 soft tokens + "<end_of_image>\\n\\n"
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from localora.tiny.vlm import _CORPUS

# Gemma 3's special tokens, in its vocabulary's order (pad 0, eos 1, bos 2, unk 3, mask 4, the
# turn markers 105/106, the image markers 255999/256000 and the soft token 262144 there).
HEAD = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
TURNS = ("<start_of_turn>", "<end_of_turn>")
IMAGE = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
SPECIAL_TOKENS = HEAD + TURNS + IMAGE
# google/gemma-3-4b-it's chat template, verbatim: no system role (the system text prefixes the
# first user turn), the assistant is "model", an image is "<start_of_image>", text is trimmed.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)
IMAGE_SIZE, PATCH, TOKENS_PER_IMAGE = 56, 14, 4


def tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, GemmaTokenizer

    # Trained with GemmaTokenizer's own normalizer and split, so the merges fit how it encodes.
    bpe = Tokenizer(models.BPE(byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False)
    bpe.train_from_iterator(list(_CORPUS) * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = {}
    for token in (*HEAD, *TURNS, *(f"<0x{b:02X}>" for b in range(256)), *model["vocab"], *IMAGE):
        vocab.setdefault(token, len(vocab))
    tok = GemmaTokenizer(
        vocab=vocab, merges=[tuple(m) for m in model["merges"]],
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build(out_dir: Path, seed: int) -> None:
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor,
                              GenerationConfig)

    tok = tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Gemma3Config(
        text_config=dict(
            vocab_size=-(-len(tok) // 64) * 64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
            sliding_window=64, layer_types=["sliding_attention", "full_attention"],
            bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"],
        ),
        # widths of 64: bitsandbytes' CPU 4-bit kernels need one 64-wide quantization block.
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False),
        mm_tokens_per_image=TOKENS_PER_IMAGE, boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    # As the real checkpoints: a turn ends with <end_of_turn> (an answer) or <eos>.
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]], pad_token_id=ids["<pad>"],
        do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tok, chat_template=CHAT_TEMPLATE, image_seq_length=TOKENS_PER_IMAGE,
    )
    processor.save_pretrained(out_dir)
