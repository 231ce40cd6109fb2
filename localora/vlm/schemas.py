"""Structured answers: a grammar the VLM decodes under, and the parser for what it produces.

Every schema is an xgrammar EBNF grammar (start symbol `root`) over compact JSON, so a decoded
answer always parses, whatever the weights of the model. Bounds live in the grammar itself:
a weight between -0.50 and 1.50 is a set of digit patterns that spells exactly the two-decimal
numbers of that range, so nothing is clipped after the fact. `parse` still validates everything
(json.loads, then shape, order and bounds), because text may also come from elsewhere.

    s = weights(["character", "style"], lo=0.0, hi=1.5)
    s.grammar      # EBNF for {"character":0.80,"style":1.25}
    s.parse(text)  # {"character": 0.8, "style": 1.25}, or ValueError
    s.max_chars    # longest possible answer, to size max_new_tokens
    s.describe()   # the shape, in a line a prompt can show
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from localora.errors import LocaloraError


@dataclass(frozen=True)
class Schema:
    expr: str  # EBNF expression of the whole answer
    rules: tuple[tuple[str, str], ...]  # named rules `expr` refers to; equal names mean equal rules
    max_chars: int  # longest answer the grammar allows, in characters
    shape: str  # the answer's form for a prompt, e.g. {"a": W}
    notes: tuple[str, ...]  # what the placeholders in `shape` stand for
    check: Callable[[Any], Any]  # decoded JSON -> python value; raises ValueError

    @property
    def grammar(self) -> str:
        return "\n".join([f"root ::= {self.expr}"] + [f"{n} ::= {body}" for n, body in self.rules])

    def parse(self, text: str) -> Any:
        """The python value of an answer; ValueError when it is not one this schema allows."""
        return self.check(json.loads(text))

    def describe(self) -> str:
        return self.shape + "".join(f"\n{n}" for n in self.notes)


# ------------------------------------------------------------------ grammar pieces

def _lit(text: str) -> str:
    """An EBNF string literal matching `text` exactly."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _key(name: str) -> str:
    return _lit(json.dumps(name) + ":")


def _same_length_range(a: str, b: str) -> list[list[str]]:
    """Digit patterns (one EBNF item per digit) that together match exactly the digit strings
    from a to b, both of the same length: the classic split into prefix + [x-y] + [0-9]*."""
    if a == b:
        return [list(a)]
    if len(a) == 1:
        return [[f"[{a}-{b}]"]]
    if a[0] == b[0]:
        return [[a[0]] + p for p in _same_length_range(a[1:], b[1:])]
    rest = len(a) - 1
    out = []
    first, last = a[0], b[0]
    if a[1:] != "0" * rest:  # a partial lower block: a[0] followed by a[1:]..99
        out += [[a[0]] + p for p in _same_length_range(a[1:], "9" * rest)]
        first = chr(ord(first) + 1)
    if b[1:] != "9" * rest:
        last = chr(ord(last) - 1)
    if first <= last:
        out.append([first if first == last else f"[{first}-{last}]"] + ["[0-9]"] * rest)
    if b[1:] != "9" * rest:
        out += [[b[0]] + p for p in _same_length_range("0" * rest, b[1:])]
    return out


def _hundredths(lo: int, hi: int) -> list[str]:
    """EBNF sequences matching the numbers lo/100 .. hi/100 (0 <= lo <= hi) written with two
    decimals and no superfluous leading zero: 0.05, 1.50, 12.00."""
    out = []
    for digits in range(3, max(3, len(str(hi))) + 1):  # 0.00-9.99 are the 3-digit strings 000-999
        a, b = max(lo, 10 ** (digits - 1) if digits > 3 else 0), min(hi, 10**digits - 1)
        if a > b:
            continue
        for p in _same_length_range(str(a).zfill(digits), str(b).zfill(digits)):
            items = p[:-2] + ["."] + p[-2:]
            out.append(" ".join(i if i.startswith("[") else _lit(i) for i in _merge_literals(items)))
    return out


def _merge_literals(items: list[str]) -> list[str]:
    # "1" "." "5" reads worse than "1.5"; join neighbouring fixed characters.
    out: list[str] = []
    for i in items:
        if out and not i.startswith("[") and not out[-1].startswith("["):
            out[-1] += i
        else:
            out.append(i)
    return out


def _fmt(hundredths: int) -> str:
    return f"{hundredths / 100:.2f}"


def _number(lo: float, hi: float) -> Schema:
    """W: a number with two decimals, lo <= W <= hi; negative bounds work."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise LocaloraError(f"weight bounds must be finite numbers with lo <= hi, got lo={lo}, hi={hi}")
    a, b = math.ceil(round(lo * 100, 6)), math.floor(round(hi * 100, 6))
    if a > b:
        raise LocaloraError(f"no number with two decimals lies between lo={lo} and hi={hi}")
    alts = [_lit("-") + " " + p for p in _hundredths(max(1, -b), -a)] if a < 0 else []
    alts += _hundredths(max(0, a), b) if b >= 0 else []
    name = f"num_{a}_{b}".replace("-", "m")

    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{v!r} is not a number")
        h = round(v * 100)
        if abs(v * 100 - h) > 1e-6 or not a <= h <= b:
            raise ValueError(f"{v!r} is not a two-decimal number from {_fmt(a)} to {_fmt(b)}")
        return h / 100

    return Schema(
        expr=name,
        rules=((name, " | ".join(f"({p})" for p in alts)),),
        max_chars=max(len(_fmt(a)), len(_fmt(b))),  # the longest spelling is at an end
        shape="W",
        notes=(f"W: a number with two decimals from {_fmt(a)} to {_fmt(b)}",),
        check=check,
    )


def _score() -> Schema:
    """S: 0.0 to 10.0 in steps of 0.5, always with one decimal."""
    steps = [i / 2 for i in range(21)]

    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v not in steps:
            raise ValueError(f"expected a score from 0 to 10 in steps of 0.5, got {v!r}")
        return float(v)

    return Schema(
        expr="score",
        rules=(("score", " | ".join(_lit(f"{s:.1f}") for s in steps)),),
        max_chars=4,
        shape="S",
        notes=("S: a score from 0.0 to 10.0 in steps of 0.5",),
        check=check,
    )


# ------------------------------------------------------------------ the schemas

def weights(names: Sequence[str], lo: float = 0.0, hi: float = 1.5) -> Schema:
    """{"name": W, ...}: one two-decimal weight per LoRA, in the given order, lo <= W <= hi."""
    names = list(names)
    if not names:
        raise LocaloraError("a weights answer needs at least one LoRA name; got none")
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise LocaloraError(f"LoRA names must be distinct, non-empty strings; got {names}")
    num = _number(lo, hi)
    return record({n: num for n in names})


def candidates(names: Sequence[str], m: int, lo: float = 0.0, hi: float = 1.5) -> Schema:
    """A list of exactly m weight objects (see `weights`)."""
    if not isinstance(m, int) or m < 1:
        raise LocaloraError(f"the number of candidates must be at least 1, got {m}")
    one = weights(names, lo, hi)

    def check(v: Any) -> list[dict]:
        if not isinstance(v, list) or len(v) != m:
            raise ValueError(f"expected a list of {m} weight objects, got {v!r}")
        return [one.check(x) for x in v]

    return Schema(
        expr=_lit("[") + " " + f" {_lit(',')} ".join(f"({one.expr})" for _ in range(m)) + " " + _lit("]"),
        rules=one.rules,
        max_chars=2 + m * one.max_chars + m - 1,
        shape=f"[{one.shape}, ... ({m} objects)]",
        notes=one.notes,
        check=check,
    )


def choice(n: int) -> Schema:
    """A bare integer from 1 to n: which of n pictures."""
    if not isinstance(n, int) or n < 1:
        raise LocaloraError(f"a choice needs at least 1 option, got {n}")

    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= n:
            raise ValueError(f"expected an integer from 1 to {n}, got {v!r}")
        return v

    return Schema(
        expr=" | ".join(_lit(str(i)) for i in range(1, n + 1)),
        rules=(),
        max_chars=len(str(n)),
        shape="N",
        notes=(f"N: the number of the picture, from 1 to {n}",),
        check=check,
    )


def pick(n: int, reason_chars: int) -> Schema:
    """{"reason": "...", "choice": N}: why, in at most reason_chars characters, then which of n
    pictures. The reason comes first so the number follows from it, as in `refine`."""
    return record({"reason": text(reason_chars), "choice": choice(n)})


JUDGE_DIMENSIONS = ("composition", "quality")


# Long enough for a few sentences per image; short enough that two of them and the scores fit a
# small model's answer budget (4 tokens per character, see VLM.chat).
JUDGE_EXPLANATION_CHARS = 300


def judge_scores() -> Schema:
    """{"image_1": {"composition": S, "quality": S}, "image_2": {...}}, S from 0 to 10 by 0.5."""
    per_image = record({d: _score() for d in JUDGE_DIMENSIONS})
    return record({"image_1": per_image, "image_2": per_image})


def judge_answer(explanation_chars: int = JUDGE_EXPLANATION_CHARS) -> Schema:
    """The reference evaluator's answer: an explanation of each image first, then the scores.

    {"explanation_1": "T", "explanation_2": "T", "image_1": {...}, "image_2": {...}}. The keys are
    decoded in this order, so the model has written what it sees in both images before the
    grammar lets it write a single score.
    """
    per_image = record({d: _score() for d in JUDGE_DIMENSIONS})
    explanation = text(explanation_chars)
    return record({"explanation_1": explanation, "explanation_2": explanation,
                   "image_1": per_image, "image_2": per_image})


def text(max_chars: int) -> Schema:
    """A JSON string of 1..max_chars characters. Quotes, backslashes and control characters are
    left out of the grammar, so no escape sequence can be cut in half and length is exact."""
    if not isinstance(max_chars, int) or max_chars < 1:
        raise LocaloraError(f"a free-text answer needs max_chars >= 1, got {max_chars}")
    name = f"text_{max_chars}"

    def check(v: Any) -> str:
        if not isinstance(v, str) or not 1 <= len(v) <= max_chars:
            raise ValueError(f"expected a string of 1 to {max_chars} characters, got {v!r}")
        return v

    return Schema(
        expr=_lit('"') + f" {name} " + _lit('"'),
        rules=((name, f'[^"\\\\\\x00-\\x1f]{{1,{max_chars}}}'),),
        max_chars=max_chars + 2,
        shape='"T"',
        notes=(f"T: text of at most {max_chars} characters, without double quotes or backslashes",),
        check=check,
    )


def _object(fields: Sequence[tuple[str, Callable[[Any], Any]]]) -> Callable[[Any], dict]:
    def check(v: Any) -> dict:
        names = [n for n, _ in fields]
        if not isinstance(v, dict) or list(v) != names:
            raise ValueError(f"expected an object with keys {names} in that order, got {v!r}")
        return {n: c(v[n]) for n, c in fields}

    return check


def record(fields: dict[str, Schema]) -> Schema:
    """An object with the given fields in order, each answered under its own schema."""
    if not fields:
        raise LocaloraError("a record answer needs at least one field")
    notes = tuple(dict.fromkeys(n for s in fields.values() for n in s.notes))
    members = f" {_lit(',')} ".join(f"{_key(k)} ({s.expr})" for k, s in fields.items())
    return Schema(
        expr=f"{_lit('{')} {members} {_lit('}')}",
        rules=tuple(dict(r for s in fields.values() for r in s.rules).items()),
        max_chars=2 + sum(len(json.dumps(k)) + 1 + s.max_chars for k, s in fields.items()) + len(fields) - 1,
        shape="{" + ", ".join(f"{json.dumps(k)}: {s.shape}" for k, s in fields.items()) + "}",
        notes=notes,
        check=_object([(k, s.check) for k, s in fields.items()]),
    )


def feedback(max_chars: int = 600) -> Schema:
    """{"feedback": "..."}: free text of bounded length."""
    return record({"feedback": text(max_chars)})


def refine(names: Sequence[str], lo: float = 0.0, hi: float = 1.5, max_chars: int = 600) -> Schema:
    """{"feedback": "...", "weights": {...}}: reasoning first, then the new weights."""
    return record({"feedback": text(max_chars), "weights": weights(names, lo, hi)})
