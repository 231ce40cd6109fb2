"""How far two judges agree: raw agreement and Cohen's kappa over the same outcomes, with intervals.

    compare(a, b, key, dims)   -> {dimension: Agreement}, over the outcomes both raters have
    Agreement.n, .agreement, .kappa, .agreement_interval, .kappa_interval

A rater's outcome is a verdict per dimension ("win", "tie" or "loss", from A's side). Two judges
of a bench are compared over the same (pair, order, repeat) answers; a judge and a person over
the same pairs (`localora judge-agreement`, where the person's one label per pair meets every
answer of the judge about that pair).

Raw agreement is the share of outcomes with the same verdict. Cohen's kappa corrects it for the
agreement two raters with those verdict frequencies would reach by chance:
kappa = (p_o - p_e) / (1 - p_e); 1 is perfect, 0 chance level, below 0 worse than chance. It is
sklearn's `cohen_kappa_score` over the three verdicts. Undefined (None) when chance agreement is
already 1 (both raters always gave the same one verdict).

Intervals: a 95% percentile bootstrap that resamples whole pairs (clusters), not single outcomes,
because the answers about one pair (both orders, every repeat) are not independent; 2000
resamples with a fixed seed, so a report is reproducible. A resample whose kappa is undefined is
left out of the kappa interval.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

VERDICTS = ("win", "tie", "loss")
RESAMPLES = 2000
SEED = 0


def kappa(a: Sequence[str], b: Sequence[str]) -> float | None:
    """Cohen's kappa of two raters' verdicts (sklearn's), None where it is undefined."""
    from sklearn.metrics import cohen_kappa_score

    if not a:
        return None
    # Chance agreement 1: both raters used one and the same verdict throughout (0 / 0).
    if len(set(a)) == 1 and set(a) == set(b):
        return None
    value = float(cohen_kappa_score(list(a), list(b), labels=list(VERDICTS)))
    return None if math.isnan(value) else value


def agreement(a: Sequence[str], b: Sequence[str]) -> float | None:
    return sum(x == y for x, y in zip(a, b)) / len(a) if a else None


def bootstrap(clusters: Sequence[Sequence[tuple[str, str]]], stat: Callable[[Sequence[str], Sequence[str]], float | None],
              resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float] | None:
    """95% percentile interval of `stat` over resamples of whole clusters (pairs), each a list of
    (rater A's verdict, rater B's verdict); None when no resample gives a value."""
    if not clusters:
        return None
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        drawn = [pair for _ in clusters for pair in clusters[rng.randrange(len(clusters))]]
        v = stat([x for x, _ in drawn], [y for _, y in drawn])
        if v is not None:
            values.append(v)
    if not values:
        return None
    values.sort()
    return values[int(0.025 * (len(values) - 1))], values[int(math.ceil(0.975 * (len(values) - 1)))]


@dataclass(frozen=True)
class Agreement:
    n: int  # outcomes both raters have
    pairs: int  # clusters (judged pairs) they fall in
    agreement: float | None
    kappa: float | None
    agreement_interval: tuple[float, float] | None
    kappa_interval: tuple[float, float] | None


def compare(a: Iterable[dict[str, Any]], b: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Hashable],
            cluster: Callable[[dict[str, Any]], Hashable], dims: Sequence[str]) -> dict[str, Agreement]:
    """Per dimension, how rater A's outcomes agree with rater B's on the keys both have. `key`
    names an outcome (pair, order, repeat), `cluster` the pair it belongs to."""
    mine = {key(o): o for o in a}
    theirs = {key(o): o for o in b}
    shared = [k for k in mine if k in theirs]
    out = {}
    for d in dims:
        clusters: dict[Hashable, list[tuple[str, str]]] = {}
        for k in shared:
            clusters.setdefault(cluster(mine[k]), []).append((mine[k][d], theirs[k][d]))
        xs = [x for c in clusters.values() for x, _ in c]
        ys = [y for c in clusters.values() for _, y in c]
        groups = list(clusters.values())
        out[d] = Agreement(len(xs), len(groups), agreement(xs, ys), kappa(xs, ys),
                           bootstrap(groups, agreement), bootstrap(groups, kappa))
    return out
