"""--final-judge: the VLM's pairwise judge picks the final image among a strategy's top 3.

    contenders = the top 3 by the black-box objective (the vlm loop: of its refined images), best first
    for each pair (i, j), both orders:  judge(i, j) -> composition and quality scores per image
    points[i] += 1 for each pair whose debiased total (composition + quality) i wins
    winner = the most points; a tie goes to the better-ranked contender

Each call is a step (events.final_judge), so a resumed run recalls the answers instead of asking
again. The judge is scoring/judge.py's: the same prompts, schema and position debiasing the
bench uses, greedy, against the run's LoRAs as the elements to find.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from itertools import combinations

from localora import events
from localora.scoring import judge
from localora.search.config import ComposeConfig
from localora.search.steps import Steps

CONTENDERS = 3


@dataclass(frozen=True)
class Pick:
    index: int  # into the contenders, from 0
    points: list[int]


def elements(cfg: ComposeConfig) -> list[judge.Element]:
    return [judge.Element(lo.category or "element", lo.name, lo.triggers or lo.name) for lo in cfg.loras]


def pick(steps: Steps, cfg: ComposeConfig, images: Sequence[str]) -> Pick:
    """The judge's choice among `images` (the run's paths of the contenders, best-ranked first)."""
    if len(images) < 2:
        return Pick(0, [0] * len(images))
    prompts_dir = Path(cfg.prompts_dir) if cfg.prompts_dir else None
    system = judge.system_text(prompts_dir)
    text = judge.judge_prompt(elements(cfg), prompts_dir)
    schema = judge.judge_schema()
    points = [0] * len(images)
    for i, j in combinations(range(len(images)), 2):
        answers = []
        for first, shown in (("a", [images[i], images[j]]), ("b", [images[j], images[i]])):
            value = steps.ask(events.final_judge(i + 1, j + 1, first), "final-judge", system, shown, text, schema,
                              None, cfg.seed)
            answers.append(judge.Asked(first, cfg.seed, *judge.read_scores(value)))
        scores = judge.debias(answers)
        a, b = sum(scores.a.values()), sum(scores.b.values())
        if a != b:
            points[i if a > b else j] += 1
    best = max(range(len(images)), key=lambda k: (points[k], -k))
    return Pick(best, points)
