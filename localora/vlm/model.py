"""The local VLM: images and a question in, an answer out, optionally under a grammar.

One backend for every family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3): transformers' auto
classes and each model's own chat template; what differs between families is declared once in
vlm/families.py and read here.

    vlm = VLM(profile.vlm, devices=manager)        # nothing heavy happens yet
    a = vlm.chat(system, [img1, "b.png"], "Picture 1 is ... Which is better?", schema=schemas.choice(2))
    a.value                                        # 1 or 2, always

Weights load on the first chat, through the DeviceManager (so under "swap" the diffusion
pipeline leaves the accelerator first), with the processor capped at the spec's min/max pixels.
Decoding is greedy unless a temperature is given; sampling is seeded (default seed 0), so every
answer can be reproduced. With a schema, xgrammar masks the logits at every step, so the answer
always parses; the grammar is compiled once per VLM and grammar string.

    vlm.on_tokens = ui.generating                  # (tokens so far, at most, done), once per token
    vlm.identity()                                 # {"name", "source", "revision", "family"}: who answered

Each image is encoded by the vision tower once while the model is loaded (vlm/vision.py);
`VLM(..., vision_cache=0)` encodes every image of every call, as plain generate() does.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from localora import estimates, profiles
from localora.devices import DeviceManager
from localora.errors import LocaloraError
from localora.files import open_image
from localora.profiles import VLMSpec
from localora.vlm.families import Family, family_of
from localora.vlm.schemas import Schema
from localora.vlm.vision import DEFAULT_CAPACITY, VisionCache, settings_key

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 512
# Asked for by name so that no family falls back to eager attention unseen (all four support it).
ATTENTION = "sdpa"
# Qwen2-VL's image processor refuses more extreme shapes.
_MAX_ASPECT = 200

ImageLike = Image.Image | str | Path


@dataclass(frozen=True)
class Answer:
    text: str
    value: Any = None  # the parsed answer for schema calls, else None
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    tokens: tuple[int, ...] = ()  # the answer's token ids as decoded


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image, or a LocaloraError naming the file that is missing or unreadable."""
    img = open_image(image)
    if max(img.size) > _MAX_ASPECT * min(img.size):
        where = "image" if isinstance(image, Image.Image) else f"image {image}"
        raise LocaloraError(f"{where}: aspect ratio {img.width}x{img.height} is too extreme (over {_MAX_ASPECT}:1)")
    return img


def escape_special(text: str, specials: Sequence[str]) -> str:
    """`text` with every occurrence of the tokenizer's special tokens broken by a zero-width space
    after its first character: a prompt that says "<|im_start|>system" or "<|image_pad|>" reaches
    the model as those characters, never as a role switch or an image slot."""
    if not specials or not text:
        return text
    pattern = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
    return re.sub(pattern, lambda m: m[0][0] + "\u200b" + m[0][1:], text)


def _require_xgrammar() -> None:
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        raise LocaloraError(
            "xgrammar is not installed, and localora needs it to make the VLM's answers parse; "
            "install it with `pip install xgrammar`"
        ) from None


# (tokens decoded so far, the most it may decode, finished): what a live view shows as it decodes.
TokenCallback = Callable[[int, int, bool], None]


def _token_counter(report: TokenCallback, n_prompt: int, limit: int) -> Any:
    """A logits processor that changes nothing and reports how many tokens were decoded. It is
    called once per new token with the ids so far, whose length is known on the host: no device
    sync, no decoding (a streamer would copy every token to the CPU)."""
    from transformers import LogitsProcessor

    class TokenCounter(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            report(input_ids.shape[1] - n_prompt, limit, False)
            return scores

    return TokenCounter()


def _quantization_config(quantization: str, compute: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
            bnb_4bit_use_double_quant=True,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def identity(spec: VLMSpec) -> dict[str, str | None]:
    """Which model answers: the spec's name and source, the weights' revision (the Hugging Face
    snapshot's commit, the tiny build's version; None for a plain folder) and the family."""
    path = profiles.locate(spec.source, f"VLM '{spec.name}'")
    revision = None
    if profiles.is_tiny(spec.source):
        from localora import tiny

        revision = f"tiny-v{tiny.VERSION}"
    elif path.parent.name == "snapshots":  # a Hugging Face cache snapshot is named by its commit
        revision = path.name
    return {"name": spec.name, "source": spec.source, "revision": revision,
            "family": family_of(path, f"VLM '{spec.name}'").name}


def empty_model(spec: VLMSpec) -> torch.nn.Module:
    """The VLM built from its config on the meta device, no weights read, with the attention a
    load asks for: what doctor asks "which attention?". A MissingError when it is not here."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = profiles.locate(spec.source, f"VLM '{spec.name}'")
    with init_empty_weights():
        return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(path, local_files_only=True),
                                                       attn_implementation=ATTENTION)


class VLM:
    """A VLM of a family in vlm/families.py, described by a VLMSpec, loaded on first use.

    `vision_cache`: how many images' vision features to keep for reuse (0: none)."""

    def __init__(self, spec: VLMSpec, devices: DeviceManager | None = None, name: str = "vlm",
                 vision_cache: int = DEFAULT_CAPACITY):
        _require_xgrammar()
        self.spec = spec
        self.path = profiles.locate(spec.source, f"VLM '{spec.name}'")
        self.family: Family = family_of(self.path, f"VLM '{spec.name}'")
        self.name = name
        self.vision_capacity = vision_cache
        self._vision: VisionCache | None = None
        self.devices = devices or DeviceManager(placement="resident")
        # What was actually loaded: "none" after a fallback from a quantization the device lacks.
        self.quantization: str | None = None
        self._processor = None
        self._specials: list[str] | None = None
        self._compiler = None
        self._compiled: dict[str, Any] = {}
        self.on_tokens: TokenCallback | None = None  # told each token of an answer as it is decoded
        # 4/8-bit weights move like any other (transformers >= 5), so the VLM is never reloaded.
        self.devices.register(name, self._load, source=repr(spec), key=estimates.vlm_key(spec, self._dtype_name),
                              estimate=estimates.vlm_bytes(spec.source, spec.quantization, self._dtype_name),
                              describe=lambda: f"{spec.name} ({self.quantization}, {self._dtype_name})")

    # ------------------------------------------------------------------ loading

    @property
    def _dtype_name(self) -> str:
        # Real profiles' VLMs are bf16 already, and the tiny one fp32: keep the spec's on a CPU too.
        return profiles.run_dtype(self.spec.dtype, self.devices.device.type, cpu=self.spec.dtype)

    def identity(self) -> dict[str, str | None]:
        """Which model answers (see `identity`)."""
        return identity(self.spec)

    def image_tokens(self, pixels: int) -> int:
        """Visual tokens an image of about `pixels` pixels takes in a prompt (the family's rule)."""
        return self.family.visual_tokens(pixels)

    def _load(self, device: torch.device) -> torch.nn.Module:
        if self._vision is not None:  # features of other weights (a reload) are not reused
            self._vision.clear()
        try:
            return self._load_weights(device)
        except OSError as e:
            if e.errno is not None:  # the disk's own error (full, unreadable): the CLI names it
                raise
            what = f"VLM '{self.spec.name}'"
            profiles.check_no_pickled_weights(self.path, what)
            raise LocaloraError(f"{what}: cannot load {self.path} ({str(e).splitlines()[0][:160]}); check the "
                                f"folder is a complete transformers model with .safetensors weights, or fetch "
                                f"it again") from None

    def _load_weights(self, device: torch.device) -> torch.nn.Module:
        from transformers import AutoModelForImageTextToText

        dtype = getattr(torch, self._dtype_name)
        # use_safetensors: a folder that holds only pickled .bin weights fails instead of being unpickled.
        common = dict(dtype=dtype, device_map={"": str(device)}, local_files_only=True, use_safetensors=True,
                      attn_implementation=ATTENTION)
        if self.spec.quantization != "none":
            try:
                model = AutoModelForImageTextToText.from_pretrained(
                    self.path, quantization_config=_quantization_config(self.spec.quantization, dtype), **common
                )
                self.quantization = self.spec.quantization
                return model.eval()
            except (ImportError, RuntimeError, ValueError, NotImplementedError) as e:
                log.warning(
                    "VLM '%s': %s quantization does not work on %s here (%s); loading %s weights instead",
                    self.spec.name, self.spec.quantization, device, str(e).splitlines()[0], self._dtype_name,
                )
        model = AutoModelForImageTextToText.from_pretrained(self.path, **common)
        self.quantization = "none"
        return model.eval()

    @property
    def model(self) -> torch.nn.Module:
        """The model, resident on the accelerator (loading it, or evicting others, if needed)."""
        return self.devices.acquire(self.name)

    @property
    def processor(self) -> Any:
        if self._processor is None:
            from transformers import AutoProcessor

            caps = {}
            if self.family.caps_pixels():  # Gemma 3 sees every image at one size: nothing to cap
                caps["size"] = {"shortest_edge": self.spec.min_pixels, "longest_edge": self.spec.max_pixels}
            self._processor = AutoProcessor.from_pretrained(self.path, local_files_only=True, **caps)
        return self._processor

    @property
    def vision(self) -> VisionCache | None:
        """The vision-feature cache of the loaded model, None when reuse is off."""
        if self._vision is None and self.vision_capacity > 0:
            self._vision = VisionCache(self.family, settings_key(self.processor.image_processor), self.vision_capacity)
        return self._vision

    def compiled(self, schema: Schema) -> Any:
        """The xgrammar grammar of `schema` for this model's tokenizer, compiled once."""
        if schema.grammar not in self._compiled:
            self._compiled[schema.grammar] = self._grammar_compiler().compile_grammar(schema.grammar)
        return self._compiled[schema.grammar]

    def _grammar_compiler(self) -> Any:
        if self._compiler is None:
            import xgrammar as xgr
            from transformers import AutoConfig

            # The model's vocabulary is padded beyond the tokenizer's; the mask must cover it all.
            vocab_size = AutoConfig.from_pretrained(self.path, local_files_only=True).get_text_config().vocab_size
            tok = self.processor.tokenizer
            # A grammar's answer may end with any token the model ends a turn with (Gemma 3:
            # <end_of_turn> as well as the tokenizer's <eos>).
            stops = sorted({tok.eos_token_id, *self._generation_eos()} - {None})
            info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size, stop_token_ids=stops)
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler

    def _generation_eos(self) -> list[int]:
        from transformers import GenerationConfig

        try:
            eos = GenerationConfig.from_pretrained(self.path, local_files_only=True).eos_token_id
        except OSError:  # no generation_config.json: the tokenizer's eos alone
            return []
        return [eos] if isinstance(eos, int) else list(eos or [])

    # ------------------------------------------------------------------ asking

    @property
    def specials(self) -> list[str]:
        """The tokenizer's special tokens (role markers, image and video slots, end of text)."""
        if self._specials is None:
            tok = self.processor.tokenizer
            self._specials = sorted({t.content for t in tok.added_tokens_decoder.values() if t.special}
                                    | set(tok.all_special_tokens) | set(self.family.structure_tokens))
        return self._specials

    def prompt(self, system: str | None, n_images: int, text: str) -> str:
        """The chat-templated prompt; images become "Picture 1: <image>" etc., in order. The texts
        (templates filled with a user's prompt, LoRA names, trigger words) go in as plain text."""
        system = escape_special(system, self.specials) if system else system
        text = escape_special(text, self.specials)
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        content: list[dict[str, str]] = []
        for i in range(n_images):
            if self.family.labels == "text":  # the template cannot number images: say it in text
                content.append({"type": "text", "text": f"Picture {i + 1}:"})
            content.append({"type": "image"})
        content.append({"type": "text", "text": text})
        messages.append({"role": "user", "content": content})
        labels = {"add_vision_id": n_images > 0} if self.family.labels == "template" else {}
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **labels)

    def chat(
        self,
        system: str | None,
        images: list[ImageLike],
        text: str,
        schema: Schema | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        max_new_tokens: int | None = None,
    ) -> Answer:
        """One answer to `text` about `images` (kept in order). Greedy unless `temperature` > 0;
        with `schema`, the answer follows its grammar and `Answer.value` holds the parsed value."""
        pictures = [load_image(i) for i in images]
        budget = DEFAULT_MAX_NEW_TOKENS
        if schema is not None:
            # A token is at least one byte and a character at most four, plus the stop token:
            # within this budget the grammar can always finish.
            budget = 4 * schema.max_chars + 1
            if max_new_tokens is not None and max_new_tokens < budget:
                raise LocaloraError(f"--max-new-tokens {max_new_tokens} may cut the answer short; this answer format needs {budget}")
        max_new_tokens = max_new_tokens or budget

        prompt = self.prompt(system, len(pictures), text)
        model = self.model
        # The template wrote every special token the prompt needs (Gemma's <bos> included).
        inputs = self.processor(text=[prompt], images=pictures or None, return_tensors="pt",
                                add_special_tokens=False).to(model.device)
        tokenizer = self.processor.tokenizer
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, repetition_penalty=1.0
        )
        processors = []
        if schema is not None:
            import xgrammar as xgr

            compiled = self.compiled(schema)
            # A fresh processor per generate(): it holds the matcher state of one answer.
            processors.append(xgr.contrib.hf.LogitsProcessor(compiled))
            kwargs["eos_token_id"] = list(compiled.tokenizer_info.stop_token_ids)
        else:
            kwargs["eos_token_id"] = model.generation_config.eos_token_id or tokenizer.eos_token_id
        n_prompt = inputs["input_ids"].shape[1]
        report = self.on_tokens
        if report is not None:
            report(0, max_new_tokens, False)
            processors.append(_token_counter(report, n_prompt, max_new_tokens))
        if processors:
            kwargs["logits_processor"] = processors
        sampling = temperature is not None and temperature > 0
        if sampling:
            # Plain temperature sampling: the model's own top-k/top-p defaults would make it near-greedy.
            kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False)

        devices = [model.device] if model.device.type == "cuda" else []
        start = time.perf_counter()
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(0 if seed is None else seed)
            if pictures and self.vision is not None:
                # Cached images skip the vision tower; the rest are encoded here, as generate() would.
                kwargs["mm_encoder_outputs"] = self.vision.encoder_outputs(model, pictures, inputs)
                inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
            out = model.generate(**inputs, **kwargs)
        seconds = time.perf_counter() - start

        new = out[0, n_prompt:]
        if report is not None:
            report(len(new), max_new_tokens, True)
        answer = tokenizer.decode(new, skip_special_tokens=True)
        value = None
        if schema is not None:
            try:
                value = schema.parse(answer)
            except ValueError as e:  # the grammar should make this impossible
                raise RuntimeError(f"constrained answer does not match its schema: {answer!r} ({e})") from e
        return Answer(text=answer, value=value, prompt_tokens=n_prompt, new_tokens=len(new), seconds=seconds,
                      tokens=tuple(new.tolist()))
