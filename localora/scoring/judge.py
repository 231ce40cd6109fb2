"""The pairwise multimodal judge, debiased for position.

Two images of the same composition are scored 0-10 on composition quality and image quality
(the criteria of both multi-LoRA papers, in prompts/judge.txt; the system text is in
prompts/judge_system.txt, and `--prompts DIR` may override either). VLM judges favour one
position, so every pair is asked in both orders (A first, then B first), `repeats` times with
different seeds (sampled at temperature 1 when repeated, as the reference asks). Each answer
first explains what it sees in each image, then scores (schemas.judge_answer).

Two ways to count, both kept:
- outcomes (GPT4LoRA): every (repeat, order) answer is one outcome with its own win / tie / loss
  per dimension; win rate = wins / outcomes, ties counted separately, with a Wilson interval;
- averaged (MLC): each image's scores are averaged over all answers, then one verdict per pair.

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


# ------------------------------------------------------------------ outcomes (GPT4LoRA's count)

@dataclass(frozen=True)
class Outcome:
    """One answer seen from A's side: which repeat and order, each image's scores, the verdict per
    dimension (A's score above B's is a win, equal a tie) and each image's explanation."""

    repeat: int
    first: str  # "a" or "b": which image was shown first
    a: dict[str, float]
    b: dict[str, float]
    verdict: dict[str, str]
    explanation_a: str = ""
    explanation_b: str = ""


def outcomes(answers: Sequence[Asked], seed: int = 0) -> list[Outcome]:
    """Every answer as one outcome; repeat r is the one asked with seed `seed + r`."""
    out = []
    for x in answers:
        a_first = x.first == "a"
        sa, sb = (x.position_1, x.position_2) if a_first else (x.position_2, x.position_1)
        ea, eb = (x.explanation_1, x.explanation_2) if a_first else (x.explanation_2, x.explanation_1)
        out.append(Outcome(x.seed - seed, x.first, dict(sa), dict(sb), verdict(PairScores(sa, sb)), ea, eb))
    return out


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% for z = 1.96); (0, 1) when n is 0.

    Chosen over the normal approximation because it stays inside [0, 1] and is sensible for the
    small counts and the 0% / 100% rates a bench of a few sets gives.
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    """Win / tie / loss over outcomes; win rate = wins / outcomes, ties counted separately (in
    the denominator, never as half wins), as GPT4LoRA and the MLC protocol count."""

    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def share(self, key: str) -> float:
        return getattr(self, key) / self.n if self.n else 0.0

    @property
    def win_rate(self) -> float:
        return self.share("wins")

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson interval of the win rate (outcomes of one pair are not independent, so it
        is narrower than the truth when repeats are many and sets few)."""
        return wilson(self.wins, self.n)


@dataclass(frozen=True)
class Counts(Rate):
    """Win / tie / loss over averaged pairs (one verdict each), and each side's mean score."""

    mean_a: float = 0.0
    mean_b: float = 0.0

    @property
    def pairs(self) -> int:
        return self.n


def rates(verdicts: Iterable[dict[str, str]]) -> dict[str, Rate]:
    """Per dimension, the win / tie / loss count of a list of verdicts (outcomes or pairs)."""
    verdicts = list(verdicts)
    return {d: Rate(*(sum(v[d] == k for v in verdicts) for k in ("win", "tie", "loss"))) for d in DIMENSIONS}


# ------------------------------------------------------------------ judging one pair

@dataclass(frozen=True)
class Judgement:
    scores: PairScores  # averaged over every answer: the MLC view
    verdict: dict[str, str]  # per dimension, from A's side, of the averaged scores
    answers: tuple[Asked, ...]
    outcomes: tuple[Outcome, ...] = ()  # one per (repeat, order): GPT4LoRA's view

    def rates(self) -> dict[str, Rate]:
        return rates(o.verdict for o in self.outcomes)


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
        raise LocaloraError(f"--repeats {repeats}: the judge needs at least 1 repeat (each repeat asks both orders)")
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
    return Judgement(scores, verdict(scores, margin), tuple(answers), tuple(outcomes(answers, seed)))
