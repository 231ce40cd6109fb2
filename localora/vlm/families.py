"""What differs between VLM families, declared once per family (as the diffusion side declares
its architectures). The backend (vlm/model.py) reads these facts and nothing else about a family.

    FAMILIES["qwen2_vl" | "qwen2_5_vl" | "qwen3_vl" | "gemma3"] -> Family
    family_of(model_dir)   the Family of a transformers model folder, by its config.json model_type

    Family                 Qwen2-VL       Qwen2.5-VL     Qwen3-VL              Gemma 3
    image placeholder      <|image_pad|>  <|image_pad|>  <|image_pad|>         <start_of_image>
    pixels per token side  28             28             32                    fixed: every image 896^2
    pixel caps             min/max_pixels min/max_pixels min/max_pixels        none (256 tokens an image)
    picture labels         template       template       template              text before each image
    system message         its own turn   its own turn   its own turn          prefixes the first user turn
    vision outputs         per image      per image      per image + deepstack one row of a batch
    stops at               <|im_end|>     <|im_end|>     <|im_end|>            <end_of_turn> or <eos>
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from localora.errors import LocaloraError


@dataclass(frozen=True)
class Family:
    name: str  # as people write it
    model_type: str  # config.json's model_type
    image_placeholder: str  # what the chat template writes per image; the processor expands it
    # The tokens that give a prompt structure (roles, turns, image slots). User text never
    # produces them: they are escaped, with every special token of the tokenizer besides.
    structure_tokens: tuple[str, ...]
    # Visual tokens: Qwen resizes an image to within min/max_pixels and gives one token per
    # (token_pixels)^2; Gemma resizes every image to one size and gives `fixed_tokens`.
    token_pixels: int | None
    fixed_tokens: int | None = None
    # "template": the chat template labels images ("Picture 1: ") with add_vision_id;
    # "text": the template cannot, so "Picture N:" goes in as text before each image.
    labels: str = "template"
    # How get_image_features' output holds several images: "split" (a tuple per image;
    # "deepstack" also a list per vision layer of tuples per image) or "batch" (one row each).
    features: str = "split"
    deepstack: bool = False

    def caps_pixels(self) -> bool:
        """Whether the spec's min/max_pixels reach this family's image processor."""
        return self.token_pixels is not None

    def visual_tokens(self, pixels: int) -> int:
        """Visual tokens of an image of about `pixels` pixels, once the processor has resized it."""
        if self.fixed_tokens is not None:
            return self.fixed_tokens
        return max(1, pixels // (self.token_pixels * self.token_pixels))


_QWEN_STRUCTURE = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                   "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>")

FAMILIES = {f.model_type: f for f in (
    Family("Qwen2-VL", "qwen2_vl", "<|image_pad|>", _QWEN_STRUCTURE, token_pixels=28),
    Family("Qwen2.5-VL", "qwen2_5_vl", "<|image_pad|>", _QWEN_STRUCTURE, token_pixels=28),
    Family("Qwen3-VL", "qwen3_vl", "<|image_pad|>", _QWEN_STRUCTURE, token_pixels=32, deepstack=True),
    Family("Gemma 3", "gemma3", "<start_of_image>",
           ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
            "<image_soft_token>"),
           token_pixels=None, fixed_tokens=256, labels="text", features="batch"),
)}


def family_of(model_dir: Path, what: str = "VLM") -> Family:
    """The family of the transformers model in `model_dir`, from its config.json; one error line
    naming the folder when it is not a VLM family localora knows."""
    config = Path(model_dir) / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as e:
        raise LocaloraError(f"{what}: cannot read {config} ({e}); fetch the model again") from None
    if model_type not in FAMILIES:
        known = ", ".join(f"{f.name} ({t})" for t, f in FAMILIES.items())
        raise LocaloraError(f"{what}: {model_dir} is a '{model_type}' model, not a VLM family localora knows; "
                            f"use one of {known}")
    return FAMILIES[model_type]
