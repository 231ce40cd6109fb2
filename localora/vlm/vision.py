"""The vision tower's output per image, kept while the model is loaded and reused.

A compose run shows the same pictures again and again (each LoRA's reference and the few-shot
examples in every Generate, Feedback and Refine call; a candidate in Generate and Feedback), and
the judge shows both images of a pair in both orders. Each is encoded once:

    cache = VisionCache(family, processor settings)
    outputs = cache.encoder_outputs(model, images, inputs)   # {"image": what get_image_features returns}
    model.generate(**inputs without pixel_values, mm_encoder_outputs=outputs, ...)

Everything goes through public transformers APIs: `get_image_features(..., return_dict=True)`
is the function generate() itself calls before prefill, and `mm_encoder_outputs` is the forward
and generate argument that takes its output instead of pixels (transformers >= 5.2x). The cache
only splits that output per image and joins cached pieces back in the same layout, so the
language model sees what it would have computed; greedy answers are identical with and without
it (tests/test_vlm_families.py). Per-image pieces live in CPU memory (the device manager counts
only models against the accelerator) and are moved to the model's device when used.

The key is the image's pixels (mode, size, bytes) and the image processor's settings, so a
picture resized differently (another min/max_pixels) is encoded again.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from typing import Any

import torch
from PIL import Image

from localora.vlm.families import Family

DEFAULT_CAPACITY = 64  # images; a real Qwen2.5-VL-7B image at the default caps is ~3.6 MB


def image_key(image: Image.Image) -> str:
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def settings_key(image_processor: Any) -> str:
    """The image processor's settings (size caps, patch size, normalisation) as one hash."""
    return hashlib.sha256(json.dumps(image_processor.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


class VisionCache:
    """Per-image vision features of one loaded model, least recently used dropped first."""

    def __init__(self, family: Family, settings: str, capacity: int = DEFAULT_CAPACITY):
        self.family = family
        self.settings = settings
        self.capacity = capacity
        self.entries: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()
        self.hits = self.misses = 0
        self._output_type: type | None = None  # the class get_image_features returns, to rebuild it

    def clear(self) -> None:
        self.entries.clear()

    # ------------------------------------------------------------ the processor's per-image inputs

    def _pixels(self, inputs: Any, indices: list[int]) -> dict[str, torch.Tensor]:
        """get_image_features' arguments for the images at `indices` of a processed call."""
        pixels = inputs["pixel_values"]
        if self.family.features == "batch":
            return {"pixel_values": pixels[indices]}
        grid = inputs["image_grid_thw"]
        starts = torch.cat([grid.new_zeros(1), grid.prod(-1).cumsum(0)]).tolist()
        rows = torch.cat([pixels[starts[i]:starts[i + 1]] for i in indices])
        return {"pixel_values": rows, "image_grid_thw": grid[indices]}

    def _split(self, output: Any, n: int) -> list[tuple[torch.Tensor, ...]]:
        """get_image_features' output -> per image (features, *deepstack features), on the CPU."""
        if self.family.features == "batch":
            parts = [(output.pooler_output[i],) for i in range(n)]
        else:
            layers = list(output.deepstack_features) if self.family.deepstack else []
            parts = [(output.pooler_output[i], *(layer[i] for layer in layers)) for i in range(n)]
        return [tuple(t.detach().to("cpu") for t in p) for p in parts]

    def _join(self, parts: list[tuple[torch.Tensor, ...]], device: torch.device) -> Any:
        """Per-image pieces -> the output get_image_features would give for all of them at once."""
        assert self._output_type is not None
        moved = [tuple(t.to(device) for t in p) for p in parts]
        if self.family.features == "batch":
            return self._output_type(pooler_output=torch.stack([p[0] for p in moved]))
        output = self._output_type(pooler_output=tuple(p[0] for p in moved))
        if self.family.deepstack:
            output.deepstack_features = [tuple(p[1 + k] for p in moved) for k in range(len(moved[0]) - 1)]
        return output

    # ------------------------------------------------------------ the one entry point

    def encoder_outputs(self, model: Any, images: list[Image.Image], inputs: Any) -> dict[str, Any]:
        """{"image": features of `images`} for generate's mm_encoder_outputs, encoding only the
        images not cached yet (each distinct image once, in one call)."""
        keys = [f"{image_key(im)}:{self.settings}" for im in images]
        missing = list(dict.fromkeys(k for k in keys if k not in self.entries))
        self.hits += len(keys) - sum(keys.count(k) for k in missing)
        self.misses += len(missing)
        if missing:
            first = [keys.index(k) for k in missing]
            output = model.get_image_features(**self._pixels(inputs, first), return_dict=True)
            self._output_type = type(output)
            for key, part in zip(missing, self._split(output, len(first))):
                self.entries[key] = part
        for key in keys:
            self.entries.move_to_end(key)
        parts = [self.entries[k] for k in keys]
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return {"image": self._join(parts, inputs["input_ids"].device)}
