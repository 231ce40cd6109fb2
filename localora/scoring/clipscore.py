"""CLIPScore from a CLIP cosine, without torch (the report computes it from stored cosines).

    clipscore(0.34)   -> 85.0    100 * w * max(cos, 0), w = 2.5 (Hessel et al. 2021)

The multi-LoRA papers report raw cosines; CLIPScore rescales them (and clips negatives to 0) so
numbers from papers that print CLIPScore x 100 can be set beside ours.
"""

from __future__ import annotations

CLIPSCORE_W = 2.5  # CLIPScore's rescaling weight


def clipscore(cosine: float, w: float = CLIPSCORE_W) -> float:
    """CLIPScore x 100 of a cosine."""
    return 100.0 * w * max(float(cosine), 0.0)
