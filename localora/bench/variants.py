"""Method variants: the ablations the papers run, as methods of their own in one bench folder.

    switch-every-3           LoRA Switch rotating every 3 steps (the reference's tau; plain
                             `switch` is tau = 5)
    reflect-nofewshot        the VLM loop without few-shot examples (GPT4LoRA's ablation)
    merge-drop-clothing      Merge with the clothing LoRA's trigger words left out of the prompt
                             (GPT4LoRA 4.4.1); any method, any category
    switch-every-3-drop-style   both

A variant's name is its base method and its changes, so it names its rows, images and run
folder like any method, and the report sets it beside its base. The bench options make them:
`--switch-every 1,3,5,10`, `--drop-triggers CATEGORY`, `--no-fewshot`; --methods takes the names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from localora.errors import LocaloraError

_NAME = re.compile(r"(?P<base>[a-z0-9]+?)(?:-every-(?P<every>\d+))?(?P<nofewshot>-nofewshot)?"
                   r"(?:-drop-(?P<drop>[a-z]+))?")


@dataclass(frozen=True)
class Variant:
    name: str
    base: str  # a method of bench.plan.METHODS
    switch_every: int | None = None  # Switch's interval; None: the default (5)
    fewshot: bool = True  # reflect: few-shot examples
    drop: str | None = None  # the category whose trigger words leave the prompt

    def applies(self, categories: Sequence[str]) -> bool:
        """Whether the variant differs from its base on a set of these categories (a set without
        the dropped category would only repeat the base)."""
        return self.drop is None or self.drop in categories

    def describe(self) -> str:
        parts = []
        if self.switch_every is not None:
            parts.append(f"rotating every {self.switch_every} step(s)")
        if not self.fewshot:
            parts.append("without few-shot examples")
        if self.drop:
            parts.append(f"without the {self.drop} LoRA's trigger words in the prompt")
        return f"{self.base} " + ", ".join(parts) if parts else self.base


def parse(name: str, methods: Sequence[str], searches: Sequence[str], categories: Sequence[str]) -> Variant:
    """The variant a --methods name stands for; one error line for a name that is none."""
    m = _NAME.fullmatch(name)
    if not m or m["base"] not in methods:
        raise LocaloraError(f"unknown method {name!r} in --methods; use one of {', '.join(methods)}, or a variant "
                            f"such as switch-every-3, reflect-nofewshot, merge-drop-style")
    base = m["base"]
    every = int(m["every"]) if m["every"] else None
    if every is not None and base != "switch":
        raise LocaloraError(f"--methods {name}: -every-N is Switch's interval; {base} has none")
    if m["nofewshot"] and base not in searches:
        raise LocaloraError(f"--methods {name}: -nofewshot applies to {', '.join(searches)}")
    if m["drop"] and m["drop"] not in categories:
        raise LocaloraError(unknown_category(m["drop"], categories))
    return Variant(name, base, every, not m["nofewshot"], m["drop"])


def base_of(name: str) -> str:
    """The base method of a stored method name (the name itself when it is no variant)."""
    m = _NAME.fullmatch(name)
    return m["base"] if m else name


def unknown_category(category: str, categories: Sequence[str]) -> str:
    return (f"--drop-triggers {category}: not a category of this testbed's LoRAs; use one of "
            f"{', '.join(categories)}")


def expand(methods: Sequence[str], switch_every: Sequence[int], drop: str | None, no_fewshot: bool) -> tuple[str, ...]:
    """--methods with the variants the ablation options ask for, each after its base method:
    Switch at each --switch-every interval, reflect without few-shot, and each method of
    --methods without the --drop-triggers category's trigger words (the ablations one at a time,
    not crossed)."""
    out: list[str] = []
    for m in methods:
        out.append(m)
        if drop is not None:
            out.append(f"{m}-drop-{drop}")
        if m == "switch":
            out += [f"switch-every-{n}" for n in switch_every]
        if m == "reflect" and no_fewshot:
            out.append("reflect-nofewshot")
    if switch_every and "switch" not in methods:  # the intervals were asked for: run them
        out += [f"switch-every-{n}" for n in switch_every]
    return tuple(dict.fromkeys(out))
