"""Searching combination weights: the shared steps and the strategies built on them.

    config.py     ComposeConfig (what a run is asked to do), reference_job, Final
    steps.py      render / score / ask: cached, resumable, one event each; every strategy uses them
    gpt4lora.py   GPT4LoRA's Generate -> Feedback -> Refine loop with the local VLM
    blackbox.py   random search, CMA-ES and a VLM + CMA-ES hybrid at an equal render budget
    candidates.py distinct candidates: no render is spent twice on one weight vector
    fewshot.py    the CLIP-scored few-shot examples of that loop

STRATEGIES is the one registry of search strategies: `compose --search`, the bench and the docs
read it. To add one, write `run(cfg: ComposeConfig, steps: Steps) -> Final` in a module here and
register it; entries name their module so that listing them loads no model code. A strategy's
`check(cfg)` refuses what would fail later (its prompt templates) before the run folder exists.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str
    entry: str  # "module:function", a run(cfg, steps) -> Final
    checks: str | None = None  # "module:function", a check(cfg) -> None that raises LocaloraError
    budgeted: bool = False  # spends --budget renders (black-box strategies)
    asks_vlm: bool = False  # the VLM answers some of its steps (its weights must be here)

    def run(self, cfg, steps):
        return _load(self.entry)(cfg, steps)

    def check(self, cfg) -> None:
        if self.checks:
            _load(self.checks)(cfg)


def _load(entry: str):
    module, func = entry.split(":")
    return getattr(importlib.import_module(module), func)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("vlm", "GPT4LoRA's loop: the local VLM proposes, critiques and refines weights",
             "localora.search.gpt4lora:run", "localora.search.gpt4lora:check", asks_vlm=True),
    Strategy("random", "uniform random weights in the bounds, best by a CLIP objective, at the same render budget",
             "localora.search.blackbox:run_random", "localora.search.blackbox:check", budgeted=True),
    Strategy("cmaes", "CMA-ES (pycma) maximizing a CLIP objective, at the same render budget",
             "localora.search.blackbox:run_cmaes", "localora.search.blackbox:check", budgeted=True),
    Strategy("hybrid", "CMA-ES whose population each round is the VLM's candidates plus one sample of its own",
             "localora.search.blackbox:run_hybrid", "localora.search.blackbox:check", budgeted=True, asks_vlm=True),
)}
