"""The pairwise multimodal judge, debiased for position.

Two images of the same composition are scored 0-10 on composition quality and image quality
(the criteria of both multi-LoRA papers, in prompts/judge.txt; the system text is in
prompts/judge_system.txt, and `--prompts DIR` may override either). VLM judges favour one
position, so every pair is asked in both orders (A first, then B first), `repeats` times with
different seeds; each image's scores are averaged over all answers before the win / tie / loss per
dimension is decided. Win rate = wins / pairs.

The VLM call is one small protocol (`ChatModel`), constrained by `schemas.judge_scores()`; the
shape of its structured answer is read in one adapter (`read_scores`). Everything after that is
pure functions over score tables.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localora.vlm import ChatModel, prompts, schemas
from localora.errors import LocaloraError
from localora.files import open_image

DIMENSIONS = schemas.JUDGE_DIMENSIONS  # ("composition", "quality")
SCORE_MIN, SCORE_MAX = 0.0, 10.0
# Repeats only differ when sampled; 1.0 is what the reference code asked GPT-4V with.
REPEAT_TEMPERATURE = 1.0


# ------------------------------------------------------------------ the element list

@dataclass(frozen=True)
class Element:
    category: str
    name: str
    triggers: str  # "trigger, words"

    def line(self, index: int) -> str:
        return f"{index}. {self.category} ({self.name}): {self.triggers}"


_ELEMENT = re.compile(r"^\s*(?P<category>[^(:]+?)\s*\((?P<name>[^)]*)\)\s*:\s*(?P<triggers>.*?)\s*$")


def parse_element(text: str) -> Element:
    """'character (Name): trigger, words' -> Element; one clear error otherwise."""
    m = _ELEMENT.match(text)
    if not m or not m["triggers"]:
        raise LocaloraError(f"element {text!r}: expected 'category (Name): trigger, words'")
    return Element(m["category"], m["name"].strip(), m["triggers"])


def element_list(elements: Sequence[Element]) -> str:
    return "\n".join(e.line(i) for i, e in enumerate(elements, 1))


def check_templates(prompts_dir: Path | None = None) -> None:
    """The judge's two templates, checked before any work that ends in judging."""
    prompts.check("judge_system", prompts_dir, ())
    if "{elements}" not in prompts.check("judge", prompts_dir, ("elements", "answer_format")):
        raise LocaloraError(f"{prompts.template_path('judge', prompts_dir)}: the judge template must contain {{elements}}")


def system_text(prompts_dir: Path | None = None) -> str:
    """The judge's system text: prompts/judge_system.txt (or the override in `prompts_dir`)."""
    return prompts.render("judge_system", prompts_dir)


def judge_prompt(elements: Sequence[Element], prompts_dir: Path | None = None) -> str:
    """The judge's user text: prompts/judge.txt (or the override in `prompts_dir`) filled in."""
    if not elements:
        raise LocaloraError("the judge needs at least one element to check the images against")
    listing = element_list(elements)
    text = prompts.render("judge", prompts_dir, elements=listing, answer_format=judge_schema().describe())
    if listing not in text:
        raise LocaloraError(f"{prompts.template_path('judge', prompts_dir)}: the judge template must contain {{elements}}")
    return text


# ------------------------------------------------------------------ the VLM call

def judge_schema() -> Any:
    """The answer schema the VLM backend constrains decoding with (the shape read_scores reads):
    an explanation of each image, then the scores, as the reference evaluator answers."""
    return schemas.judge_answer()


def read_scores(value: Any) -> tuple[dict[str, float], dict[str, float]]:
    """Adapter: the VLM's answer -> (scores of the image shown first, of the image shown second).

    Expects {"image_1": {"composition": 7.5, "quality": 6.0}, "image_2": {...}}.
    """
    try:
        pair = tuple({d: float(value[key][d]) for d in DIMENSIONS} for key in ("image_1", "image_2"))
    except (KeyError, TypeError, ValueError):
        raise LocaloraError(f"the judge's answer {str(value)[:200]!r} lacks image_1/image_2 composition/quality scores") from None
    for scores in pair:
        for d, s in scores.items():
            if not SCORE_MIN <= s <= SCORE_MAX:
                raise LocaloraError(f"the judge scored {d} {s}, outside {SCORE_MIN:g}-{SCORE_MAX:g}")
    return pair  # type: ignore[return-value]


def read_explanations(value: Any) -> tuple[str, str]:
    """The explanations of the image shown first and second; empty for a scores-only answer
    (a template override or an answer logged before explanations were asked for)."""
    if not isinstance(value, dict):
        return "", ""
    return tuple(str(value.get(f"explanation_{i}", "")) for i in (1, 2))  # type: ignore[return-value]


# ------------------------------------------------------------------ pure aggregation

@dataclass(frozen=True)
class Asked:
    """One answer: which image was shown first ("a" or "b"), the seed, the scores and
    explanations by position, and the answer's text as decoded (explanations before scores)."""

    first: str
    seed: int
    position_1: dict[str, float]
    position_2: dict[str, float]
    explanation_1: str = ""
    explanation_2: str = ""
    text: str = ""


@dataclass(frozen=True)
class PairScores:
    """Each image's mean score per dimension over all orders and repeats."""

    a: dict[str, float]
    b: dict[str, float]


def debias(answers: Sequence[Asked]) -> PairScores:
    """Map each answer's positions back to images A and B and average per dimension.

    Needs as many A-first as B-first answers, so a constant position bias cancels exactly.
    """
    firsts = [x.first for x in answers]
    if not answers or firsts.count("a") != firsts.count("b") or set(firsts) - {"a", "b"}:
        raise ValueError(f"need both orders equally often, got {firsts}")
    a = {d: 0.0 for d in DIMENSIONS}
    b = {d: 0.0 for d in DIMENSIONS}
    for x in answers:
        sa, sb = (x.position_1, x.position_2) if x.first == "a" else (x.position_2, x.position_1)
        for d in DIMENSIONS:
            a[d] += sa[d]
            b[d] += sb[d]
    n = len(answers)
    return PairScores({d: v / n for d, v in a.items()}, {d: v / n for d, v in b.items()})


def verdict(scores: PairScores, margin: float = 0.0) -> dict[str, str]:
    """"win", "tie" or "loss" per dimension, from A's side; |A - B| <= margin is a tie."""
    out = {}
    for d in DIMENSIONS:
        diff = scores.a[d] - scores.b[d]
        out[d] = "tie" if abs(diff) <= margin else ("win" if diff > 0 else "loss")
    return out


@dataclass(frozen=True)
class Counts:
    wins: int
    ties: int
    losses: int
    mean_a: float
    mean_b: float

    @property
    def pairs(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float:
        """Wins / pairs (ties count as pairs, not as half wins), as the papers report it."""
        return self.wins / self.pairs if self.pairs else 0.0


def aggregate(pairs: Iterable[PairScores], margin: float = 0.0) -> dict[str, Counts]:
    """Win / tie / loss counts of A against B per dimension over a table of judged pairs."""
    pairs = list(pairs)
    out = {}
    for d in DIMENSIONS:
        outcomes = [verdict(p, margin)[d] for p in pairs]
        n = len(pairs) or 1
        out[d] = Counts(
            wins=outcomes.count("win"),
            ties=outcomes.count("tie"),
            losses=outcomes.count("loss"),
            mean_a=sum(p.a[d] for p in pairs) / n,
            mean_b=sum(p.b[d] for p in pairs) / n,
        )
    return out


# ------------------------------------------------------------------ judging one pair

@dataclass(frozen=True)
class Judgement:
    scores: PairScores
    verdict: dict[str, str]  # per dimension, from A's side
    answers: tuple[Asked, ...]


def judge_pair(
    model: ChatModel,
    image_a: Any,
    image_b: Any,
    elements: Sequence[Element],
    repeats: int = 1,
    seed: int = 0,
    temperature: float | None = None,
    margin: float = 0.0,
    prompts_dir: Path | None = None,
) -> Judgement:
    """Judge A against B: both orders, `repeats` times (seeds seed, seed+1, ...), averaged.

    `temperature` None means greedy for one repeat and REPEAT_TEMPERATURE for several (greedy
    repeats would all give the same answer). Images go to the VLM as PIL images.
    """
    if repeats < 1:
        raise LocaloraError(f"repeats must be >= 1, got {repeats}")
    if temperature is None and repeats > 1:
        temperature = REPEAT_TEMPERATURE
    sampling = {"temperature": temperature} if temperature else {}
    system = system_text(prompts_dir)
    text = judge_prompt(elements, prompts_dir)
    schema = judge_schema()
    # Opened once here rather than by the VLM on each of the 2 * repeats calls.
    a, b = open_image(image_a), open_image(image_b)
    answers = []
    for r in range(repeats):
        for first, images in (("a", [a, b]), ("b", [b, a])):
            answer = model.chat(system, images, text, schema=schema, seed=seed + r, **sampling)
            p1, p2 = read_scores(answer.value)
            answers.append(Asked(first, seed + r, p1, p2, *read_explanations(answer.value), str(answer.text)))
    scores = debias(answers)
    return Judgement(scores, verdict(scores, margin), tuple(answers))
