"""Black-box searches of the weights at a fixed render budget: random, CMA-ES, and VLM + CMA-ES.

    objective(w) = CLIP-T(image(w), prompt) + mean_k CLIP-I(image(w), R_k)   (steps.objective, weights 1 and 1)

    random   B vectors uniform in the bounds, from a generator seeded by the run's seed
    cmaes    CMA-ES (pycma) from the start weights, sigma0 = (hi - lo) / 4, bounded, seeded
    hybrid   CMA-ES whose population each round is the VLM's M candidates (injected, so they
             update the mean and covariance like any sample) plus one vector CMA-ES samples

Every strategy spends its budget B in rounds of M + 1 renders (M = --candidates), the size of a
GPT4LoRA round, so at the default B = N (M + 1) all of them render exactly as much as the VLM
loop does after its few-shot stage. The single-LoRA references R_k are rendered first and are not
counted. A vector is rendered at most once in a run: a repeat (after rounding to two decimals) is
replaced before rendering (search/candidates.py), so the budget is always B distinct renders.

The optimizers see only `evaluate(round, vectors, origins) -> objectives` (`search`), so a test
can hand them a known quadratic. Resuming replays: the recorded renders and scores come back from
the run's log, CMA-ES is told the same values in the same order and reaches the same state, and
each round's state (mean, step size, covariance, budget spent) is logged and checked against the
replay. CMA-ES draws from its own numpy state, never the process's global one.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from localora import events
from localora.diffusion.loras import with_triggers
from localora.errors import LocaloraError
from localora.search import final as final_judge
from localora.search.candidates import Taken, Vector, complete, round_rng
from localora.search.config import ComposeConfig, Final, reference_job
from localora.search.steps import Steps

Evaluate = Callable[[int, list[Vector], list[str]], list[float]]
Propose = Callable[[int, Vector], list[Vector]]  # (round, best so far) -> the VLM's vectors
OnState = Callable[[int, int, float, dict[str, Any]], None]  # (round, spent, best, state)

@dataclass
class Result:
    evaluated: list[tuple[int, Vector, float]]  # (round, vector, objective), in the order rendered

    @property
    def best(self) -> tuple[int, Vector, float]:
        """The best by objective; the first of equals."""
        return max(self.evaluated, key=lambda e: e[2])

    def top(self, n: int) -> list[tuple[int, Vector, float]]:
        return sorted(self.evaluated, key=lambda e: -e[2])[:n]


# ------------------------------------------------------------------ the optimizers (no models)

def random_search(evaluate: Evaluate, k: int, bounds: tuple[float, float], budget: int, round_size: int,
                  seed: int, taken: Taken, on_state: OnState | None = None) -> Result:
    lo, hi = bounds
    rng = round_rng(seed, 0, salt=1)
    result = Result([])
    r = 0
    while len(result.evaluated) < budget:
        r += 1
        n = min(round_size, budget - len(result.evaluated))
        draws = [tuple(v) for v in rng.uniform(lo, hi, (n, k))]
        vectors, _ = complete(taken, draws, None, n, draws[0], round_rng(seed, r, salt=1))
        values = evaluate(r, vectors, ["random"] * n)
        result.evaluated += [(r, v, f) for v, f in zip(vectors, values)]
        if on_state:
            on_state(r, len(result.evaluated), result.best[2], {})
    return result


@contextmanager
def _numpy_state(holder: list):
    """Run pycma's draws on a numpy state of its own: it samples from numpy's global generator."""
    outside = np.random.get_state()
    np.random.set_state(holder[0])
    try:
        yield
    finally:
        holder[0] = np.random.get_state()
        np.random.set_state(outside)


def cma_state(es: Any, holder: list) -> dict[str, Any]:
    """What a round leaves CMA-ES with; "rng" fingerprints its numpy state, which a replay must reach."""
    _, keys, pos, *_ = holder[0]
    rng = hashlib.sha256(np.asarray(keys).tobytes() + int(pos).to_bytes(4, "little")).hexdigest()[:16]
    return {"mean": [float(x) for x in es.mean], "sigma": float(es.sigma),
            "covariance": [[float(x) for x in row] for row in np.asarray(es.C)], "rng": rng}


def cmaes_search(evaluate: Evaluate, start: Sequence[float], bounds: tuple[float, float], budget: int,
                 round_size: int, seed: int, taken: Taken, propose: Propose | None = None,
                 on_state: OnState | None = None) -> Result:
    """CMA-ES maximizing the objective; with `propose`, each round's population is the proposed
    vectors plus what CMA-ES samples for the rest (the hybrid)."""
    import cma

    lo, hi = bounds
    holder = [np.random.RandomState(seed).get_state()]
    with _numpy_state(holder):
        es = cma.CMAEvolutionStrategy(list(start), (hi - lo) / 4, {
            "bounds": [lo, hi], "popsize": round_size, "seed": seed + 1,  # pycma reads 0 as "no seed"
            "verbose": -9, "tolfun": 0, "tolx": 0, "tolflatfitness": 10**9, "tolstagnation": 10**9})
    result = Result([])
    best: Vector = tuple(float(x) for x in start)
    r = 0
    while len(result.evaluated) < budget:
        r += 1
        n = min(round_size, budget - len(result.evaluated))
        proposed = propose(r, best)[:n] if propose else []
        with _numpy_state(holder):
            if proposed:
                es.inject([np.asarray(v, dtype=float) for v in proposed], force=True)
            asked = es.ask(n)
        sampled = [tuple(float(x) for x in v) for v in asked[len(proposed):]]
        if proposed:
            vectors, origins = complete(taken, proposed, sampled, n, best, round_rng(seed, r, salt=2))
            origins = ["cmaes" if o == "vlm-again" else o for o in origins]
        else:
            vectors, origins = complete(taken, sampled, None, n, asked[0], round_rng(seed, r, salt=2))
            origins = ["cmaes" if o == "vlm" else o for o in origins]
        values = evaluate(r, vectors, origins)
        result.evaluated += [(r, v, f) for v, f in zip(vectors, values)]
        if n == round_size:  # a last, partial round is only spent: pycma learns from whole populations
            with _numpy_state(holder), warnings.catch_warnings():
                # Told what was rendered: repeats' replacements, and the VLM's exact vectors rather than
                # pycma's round trip of them through its bound transform (which it warns about).
                warnings.simplefilter("ignore", cma.evolution_strategy.InjectionWarning)
                es.tell([np.asarray(v, dtype=float) for v in vectors], [-f for f in values])
        best = result.best[1]
        if on_state:
            on_state(r, len(result.evaluated), result.best[2], cma_state(es, holder))
    return result


# ------------------------------------------------------------------ on a run's steps

def budget_of(cfg: ComposeConfig) -> int:
    return cfg.budget if cfg.budget is not None else cfg.iterations * (cfg.candidates + 1)


def check(cfg: ComposeConfig) -> None:
    """The registry's check for random, cmaes and hybrid."""
    from localora.search.candidates import capacity

    budget, size = budget_of(cfg), cfg.candidates + 1
    if budget < size:
        raise LocaloraError(f"--budget {budget} is less than one round of {size} renders (--candidates "
                            f"{cfg.candidates} + 1); give at least {size}")
    room = capacity(len(cfg.dims), cfg.bounds)
    if room < budget + 1:
        lo, hi = cfg.bounds
        raise LocaloraError(f"--bounds {lo:g},{hi:g}: hold only {room:g} distinct weight vectors at two decimals, "
                            f"fewer than the budget of {budget} (+1 start); widen the bounds or lower --budget")
    if cfg.search == "hybrid":
        from localora.search.gpt4lora import check_templates

        check_templates(cfg.prompts_dir)
    if cfg.final_judge:
        from localora.scoring.judge import check_templates as check_judge

        check_judge(Path(cfg.prompts_dir) if cfg.prompts_dir else None)


@dataclass
class Blackbox:
    """One compose run of a black-box strategy on the run's steps."""

    cfg: ComposeConfig
    steps: Steps
    strategy: str

    def run(self) -> Final:
        from localora.search.gpt4lora import GPT4LoRA

        cfg, steps = self.cfg, self.steps
        loop = GPT4LoRA(cfg, steps)  # its job, its prompt (with trigger words), and for hybrid its questions
        budget, size = budget_of(cfg), cfg.candidates + 1
        steps.event(events.StartEvent(type="start", iterations=math.ceil(budget / size), candidates=size,
                                      loras=cfg.names, grid=0))
        refs = [steps.render(events.reference(k), "reference", reference_job(cfg.prompt, lo, cfg.sampling, cfg.method),
                             [lo.name]) for k, lo in enumerate(cfg.loras)]
        taken = Taken(cfg.bounds)
        images: dict[Vector, str] = {}

        def evaluate(r: int, vectors: list[Vector], origins: list[str]) -> list[float]:
            steps.event(events.IterationEvent(type="iteration", iteration=r))
            paths = loop.render_many([events.candidate(r, j) for j in range(1, len(vectors) + 1)], "candidate",
                                     vectors, r, origins)
            images.update(zip(vectors, paths))
            return steps.objective(events.round_step(r, "scores"), vectors, paths, loop.prompt, refs, cfg.dims, r)

        def on_state(r: int, spent: int, best: float, state: dict[str, Any]) -> None:
            step = events.round_step(r, "state")
            done = steps.recall(step)
            if done is not None:
                if done["state"].get("rng") != state.get("rng") or not np.allclose(
                        done["state"].get("mean", []), state.get("mean", []), rtol=1e-9, atol=1e-12):
                    raise LocaloraError(f"{steps.run.path}: replaying round {r} did not reach the state it logged "
                                        f"(another pycma or numpy?); resume with the versions in run.json")
                return
            steps.event(events.StateEvent(type="state", id=step, iteration=r, strategy=self.strategy, spent=spent,
                                          budget=budget, best=best, state=state))

        start = cfg.start_weights
        if self.strategy == "random":
            result = random_search(evaluate, len(cfg.dims), cfg.bounds, budget, size, cfg.seed, taken, on_state)
        else:
            propose = self._proposer(loop, refs, start, taken, images) if self.strategy == "hybrid" else None
            result = cmaes_search(evaluate, start, cfg.bounds, budget, size, cfg.seed, taken, propose, on_state)
        return self.finish(result, images)

    @staticmethod
    def _proposer(loop: Any, refs: list[str], start: Vector, taken: Taken, images: dict[Vector, str]) -> Propose:
        """The hybrid's VLM: each round it looks at the best image so far (first, the start weights'
        image, as in GPT4LoRA) and the references, and proposes M vectors; the new ones are kept."""
        def propose(r: int, best: Vector) -> list[Vector]:
            shown = images.get(best)
            if shown is None:
                shown = loop.render(events.START_RENDER, "start", start)
                taken.add([start])
            return taken.sort_out(loop.proposals(events.round_step(r, "generate"), best, shown, refs, []))
        return propose

    def finish(self, result: Result, images: dict[Vector, str]) -> Final:
        """The best by objective, or with --final-judge the judge's pick among the top 3."""
        cfg, run = self.cfg, self.steps.run
        top = result.top(final_judge.CONTENDERS)
        judged = final_judge.pick(self.steps, cfg, [images[v] for _, v, _ in top]) if cfg.final_judge else None
        r, vector, value = top[judged.index] if judged else result.best
        final = Final(dict(zip(cfg.dims, vector)), r, images[vector])
        run.copy(final.image, "final.png")
        run.write_json("final.json", {
            "weights": final.weights, "iteration": r, "seed": cfg.seed, "method": cfg.method, "search": self.strategy,
            "objective": value, "renders": len(result.evaluated), "prompt": with_triggers(cfg.prompt, list(cfg.loras)),
            "profile": self.steps.renderer.profile.name, "image": final.image,
            "top": [{"weights": dict(zip(cfg.dims, v)), "objective": f, "round": rr} for rr, v, f in top],
            "picked_by": "final judge" if judged else "objective",
            **({"judge_points": judged.points} if judged else {}),
        })
        self.steps.event(events.DoneEvent(type="done", weights=final.weights, iteration=r, image=final.image,
                                          renders=len(result.evaluated), objective=value))
        return final


def run_random(cfg: ComposeConfig, steps: Steps) -> Final:
    return Blackbox(cfg, steps, "random").run()


def run_cmaes(cfg: ComposeConfig, steps: Steps) -> Final:
    return Blackbox(cfg, steps, "cmaes").run()


def run_hybrid(cfg: ComposeConfig, steps: Steps) -> Final:
    return Blackbox(cfg, steps, "hybrid").run()
