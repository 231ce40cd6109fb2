"""Distinct candidates: a round never spends a render on a vector it or an earlier round rendered.

    taken = Taken(bounds)                      every vector the run rendered, at two decimals
    new, dupes = taken.sort_out(proposals)     the proposals not rendered yet (first of each), and
                                               how many slots are still open
    taken.fill(center, rng)                    a new vector near `center`, for a slot still open

Weights are compared after rounding to two decimals, as the VLM's grammar writes them and the
render cache keys them. A filled vector is `center` plus a Gaussian step of FILL_SCALE x (hi - lo)
per weight, clipped to the bounds and rounded; a step that lands on a taken vector is drawn again,
wider by half every FILL_TRIES_PER_WIDTH tries. The draws come from a generator seeded per
(run seed, round), so a resumed run fills exactly as the first did.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from localora.errors import LocaloraError

Vector = tuple[float, ...]

FILL_SCALE = 0.1
FILL_TRIES_PER_WIDTH = 20
FILL_TRIES = 200


def rounded(vector: Iterable[float], bounds: tuple[float, float]) -> Vector:
    lo, hi = bounds
    return tuple(round(min(max(float(w), lo), hi), 2) for w in vector)


def capacity(k: int, bounds: tuple[float, float]) -> float:
    """How many distinct vectors of k weights the bounds hold at two decimals."""
    lo, hi = bounds
    return float(math.floor(round((hi - lo) * 100, 6)) + 1) ** k


def round_rng(seed: int, r: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, r, salt])


@dataclass
class Taken:
    bounds: tuple[float, float]
    vectors: set[Vector] = field(default_factory=set)

    def add(self, vectors: Iterable[Sequence[float]]) -> None:
        self.vectors.update(rounded(v, self.bounds) for v in vectors)

    def sort_out(self, proposals: Iterable[Sequence[float]]) -> list[Vector]:
        """The proposals, rounded, that are new: neither taken nor equal to an earlier proposal."""
        new: list[Vector] = []
        for v in proposals:
            v = rounded(v, self.bounds)
            if v not in self.vectors and v not in new:
                new.append(v)
        return new

    def fill(self, center: Sequence[float], rng: np.random.Generator, also: Iterable[Vector] = ()) -> Vector:
        """A vector near `center` that is neither taken nor in `also`."""
        lo, hi = self.bounds
        blocked = self.vectors | set(also)
        scale = FILL_SCALE * (hi - lo)
        for attempt in range(FILL_TRIES):
            if attempt and attempt % FILL_TRIES_PER_WIDTH == 0:
                scale *= 1.5
            v = rounded(np.asarray(center, dtype=float) + rng.normal(0.0, scale, len(center)), self.bounds)
            if v not in blocked:
                return v
        raise LocaloraError(f"--bounds {lo:g},{hi:g}: too narrow to find a weight vector not tried yet "
                            f"({len(blocked)} tried); widen the bounds or lower the budget")


def complete(taken: Taken, first: Sequence[Sequence[float]], again: Sequence[Sequence[float]] | None, want: int,
             center: Sequence[float], rng: np.random.Generator) -> tuple[list[Vector], list[str]]:
    """`want` new vectors: the new ones of `first`, then of `again` (a second answer, or None), then
    filled near `center`; with their origins ("vlm", "vlm-again", "filled"). Marks them taken."""
    vectors = taken.sort_out(first)[:want]
    origins = ["vlm"] * len(vectors)
    if again is not None and len(vectors) < want:
        more = [v for v in taken.sort_out(again) if v not in vectors][: want - len(vectors)]
        vectors += more
        origins += ["vlm-again"] * len(more)
    while len(vectors) < want:
        vectors.append(taken.fill(center, rng, also=vectors))
        origins.append("filled")
    taken.add(vectors)
    return vectors, origins
