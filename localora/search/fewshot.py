"""Few-shot examples for the Generate step, chosen as GPT4LoRA chooses them.

Render a design of weight vectors, score each image's text alignment (CLIP) with the full prompt
and with each LoRA's trigger words, drop the unbalanced ones (lowest per-LoRA score under a
threshold: a LoRA that barely shows), and keep the best by full-prompt score. The result is
kept in a library keyed by everything that decides it, so the next run with the same LoRAs and
prompt reuses it instead of rendering the design again.

GPT4LoRA renders the full grid, levels^k images (27 of a 50-render run at 3 LoRAs, 243 at 5).
`design` keeps its size linear in k: by default 3 per LoRA, a Latin hypercube over the levels.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from localora import paths
from localora.files import atomic_write, stable_hash


@dataclass(frozen=True)
class Scored:
    weights: tuple[float, ...]
    prompt_score: float
    lora_scores: tuple[float, ...]
    image: str = ""  # where the image is, for the report

    @property
    def balance(self) -> float:
        return min(self.lora_scores)


PER_LORA = 3  # default design budget per LoRA
_TRIES = 64  # random Latin hypercubes compared for the widest spread


def grid(n_loras: int, levels: tuple[float, ...]) -> list[tuple[float, ...]]:
    """Every combination of the levels, one level per LoRA."""
    return [tuple(w) for w in itertools.product(levels, repeat=n_loras)]


def default_budget(n_loras: int) -> int:
    return PER_LORA * n_loras


def design(n_loras: int, levels: tuple[float, ...], budget: int | None = None) -> list[tuple[float, ...]]:
    """The weight vectors to score: the full grid when it fits the budget, else a Latin hypercube.

    In the hypercube each LoRA's column holds every level equally often (within one), so every
    level of every LoRA is rendered; rows are distinct. Of _TRIES seeded random hypercubes the one
    whose closest two rows are farthest apart is kept (maximin), so the examples spread over the
    grid. Seeded with a constant: the same LoRA count, levels and budget give the same design.
    """
    budget = default_budget(n_loras) if budget is None else budget
    full = len(levels) ** n_loras
    if budget >= full:
        return grid(n_loras, levels)
    if budget < len(levels):
        raise ValueError(f"a budget of {budget} cannot show each of {len(levels)} levels")
    rng = random.Random(0)
    column = [levels[i % len(levels)] for i in range(budget)]
    best, best_gap = None, -1.0
    for _ in range(_TRIES):
        cols = [rng.sample(column, len(column)) for _ in range(n_loras)]
        rows = list(zip(*cols))
        if len(set(rows)) < len(rows):
            continue
        gap = min(sum((a - b) ** 2 for a, b in zip(r, q)) for r, q in itertools.combinations(rows, 2))
        if gap > best_gap:
            best, best_gap = rows, gap
    if best is None:  # cannot happen with budget < levels^k in practice; keep a clear failure
        raise ValueError(f"no design of {budget} distinct rows found for {n_loras} LoRAs")
    return sorted(best, key=lambda r: [levels.index(w) for w in r])


def select(entries: list[Scored], threshold: float, keep: int = 5) -> list[Scored]:
    """Drop entries whose weakest LoRA scores under `threshold`; the best `keep` by prompt score.

    Ties keep grid order, so the choice is deterministic.
    """
    balanced = [e for e in entries if e.balance >= threshold]
    return sorted(balanced, key=lambda e: -e.prompt_score)[:keep]


def describe(example: Scored, names: list[str]) -> str:
    """The label of an example's picture in the Generate prompt: its weights and scores."""
    pairs = ", ".join(f"{n}={w:.2f}" for n, w in zip(names, example.weights))
    return f"weights {pairs} (prompt match {example.prompt_score:.3f}, weakest LoRA {example.balance:.3f})"


# ------------------------------------------------------------------ the library

def library_dir(key_data: dict) -> Path:
    return paths.home() / "fewshot" / stable_hash(key_data)[:24]


def load_library(key_data: dict) -> tuple[list[Scored], list[Scored]] | None:
    """(kept examples, all scored entries) stored for this key, or None."""
    folder = library_dir(key_data)
    try:
        lines = (folder / "examples.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    rows = [json.loads(line) for line in lines if line.strip()]
    scored = [_row(r) for r in rows]
    ranked = sorted((r["kept"], s) for s, r in zip(scored, rows) if r.get("kept") is not None)
    return [s for _, s in ranked], scored


def save_library(key_data: dict, kept: list[Scored], scored: list[Scored], images: dict[str, "object"]) -> Path:
    """Write examples.jsonl (every entry; kept ones carry their rank) and their images."""
    folder = library_dir(key_data)
    rank = {e.weights: i for i, e in enumerate(kept)}
    rows = []
    for entry in scored:
        name = f"images/{stable_hash(list(entry.weights))[:16]}.png"
        image = images.get(entry.image)
        if image is not None:
            atomic_write(folder / name, lambda p, im=image: im.save(p, format="PNG"))
        rows.append({**asdict(entry), "image": name, "kept": rank.get(entry.weights)})
    atomic_write(folder / "key.json", lambda p: p.write_text(json.dumps(key_data, indent=1)))
    atomic_write(folder / "examples.jsonl", lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))
    return folder


def _row(r: dict) -> Scored:
    return Scored(tuple(r["weights"]), r["prompt_score"], tuple(r["lora_scores"]), r.get("image", ""))
