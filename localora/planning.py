"""What the device manager will do with a profile's models on a card of a given size, before any
model loads: the plan `doctor` prints, also for a card you do not have (`doctor --vram GB`).

    plan(profile, card_bytes, iterations=5) -> Plan     resident or moving, each model's loads and
                                                        moves in such a run, the estimated peak
    run_uses(iterations) -> ["diffusion", "clip", ...]  the order a compose run uses its models

The plan is the real DeviceManager (devices.py) replaying the order in which a compose run
(search/gpt4lora.py, Algorithm 1) uses its models, on a SimulatedCard whose models weigh what
estimates.weights says: measured at an earlier load here, else estimated. So any profile gets a
plan, whatever its models are, as soon as their sizes are known.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from localora import estimates
from localora.devices import DeviceManager, SimulatedCard, plan_for
from localora.estimates import GIB, reserve
from localora.profiles import Profile

COMPONENTS = ("diffusion", "vlm", "clip")
CARDS_GIB = (12, 16, 24)  # what doctor plans for where there is no GPU to ask
MOVES = ("to-device", "offload")


def run_uses(iterations: int, fewshot: bool = True, candidates: int = 3) -> list[str]:
    """The models a compose run uses, in order, one entry per stretch of use (what
    DeviceManager.uses records): the references and the few-shot grid are rendered, the grid is
    CLIP-scored, the start is rendered; each round asks the VLM (generate), renders the
    candidates, CLIP-scores them, asks the VLM twice (feedback, refine) and renders the refined
    weights; at the end the refined images are CLIP-scored and the VLM picks one."""
    uses = ["diffusion", "clip", "diffusion"] if fewshot else ["diffusion"]
    for _ in range(iterations):
        uses += ["vlm", "diffusion", "clip", "vlm", "diffusion"]
    uses += ["clip"] + (["vlm"] if iterations > 1 else [])
    return uses


@dataclass(frozen=True)
class Plan:
    profile: str
    placement: str
    card_gib: float
    iterations: int
    verdict: str  # "resident", "moving", "reload", "too large" (devices.plan_for), or "unknown" (a size is)
    weights_gib: dict[str, float | None]  # None: size unknown (counted as 0)
    on_card: tuple[str, ...]  # models that never leave the card once loaded
    on_cpu: tuple[str, ...]  # models that run on the CPU (small ones, when the card is short)
    loads: dict[str, int]
    moves: dict[str, int]  # moves to and from the card, per model, in the whole run
    moved_gib: float  # bytes carried over PCIe in the run
    releases: int  # empty_cache() calls
    peak_gib: float  # the most the card holds at once: context, resident weights, working memory
    uses: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["on_card"], d["on_cpu"], d["needs_gib"] = list(self.on_card), list(self.on_cpu), self.needs_gib
        d.pop("uses")
        return d

    @property
    def needs_gib(self) -> float:
        """The smallest card that runs the largest model alone with its working memory."""
        largest = max((g or 0.0) for g in self.weights_gib.values()) * GIB
        return round((largest + reserve(int(largest))) / GIB + estimates.CUDA_CONTEXT_GIB, 1)

    def lines(self) -> list[str]:
        """The plan in words, as doctor prints it."""
        head = {
            "resident": "every model it needs stays on the card",
            "moving": "not all models fit at once: some move between the card and CPU RAM",
            "reload": "one model at a time fits, but CPU RAM cannot hold the others: set placement = \"reload\"",
            "unknown": "the size of " + ", ".join(n for n, g in self.weights_gib.items() if g is None)
                       + " is not known (not here, and no published parameter count in localora/estimates.py)",
            "too large": f"even the largest model alone does not fit (it needs a {self.needs_gib:g} GiB card): "
                         f"use a smaller profile",
        }[self.verdict]
        title = f"{self.card_gib:g} GiB card ({self.placement}, a {self.iterations}-iteration run): {self.verdict}: {head}"
        if self.verdict in ("too large", "unknown"):
            return [title]
        parts = []
        for name in COMPONENTS:
            size = self.weights_gib.get(name)
            weight = "? GiB" if size is None else f"{size:.1f} GiB"
            if name in self.on_cpu:
                what = "runs on the CPU"
            elif name in self.on_card:
                what = "loads once, never leaves the card"
            else:
                what = f"loads {self.loads.get(name, 0)}x, moves {self.moves.get(name, 0)}x"
            parts.append(f"{name} {weight} {what}")
        return [title, "  " + "; ".join(parts),
                f"  estimated peak {self.peak_gib:.1f} GiB; {sum(self.moves.values())} moves "
                f"({self.moved_gib:.1f} GiB over PCIe); {self.releases} empty_cache() calls"]


def plan(profile: Profile, card_bytes: int, iterations: int = 5, free_ram: int | None = None,
         sizes: dict[str, int | None] | None = None, uses: list[str] | None = None) -> Plan:
    """What the device manager does with `profile`'s models in an `iterations`-round compose run
    on a card of `card_bytes` (its whole memory: the CUDA context is taken from it), every render
    new (a render-cache hit needs no model, so a real run may move less). `sizes`: each model's
    weights in bytes (default: estimates.weights); `uses`: another order (default: run_uses)."""
    known = estimates.weights(profile) if sizes is None else sizes
    weights = {n: int(known.get(n) or 0) for n in COMPONENTS}
    card = SimulatedCard(card_bytes, weights)
    # On the CPU device: the planner's stand-in models are moved by bookkeeping only.
    manager = DeviceManager(device=torch.device("cpu"), placement=profile.placement)
    for name in COMPONENTS:
        manager.register(name, lambda device: object(), source=name, estimate=weights[name], cpu_ok=name == "clip")
    card.attach(manager)
    peak = 0
    uses = run_uses(iterations) if uses is None else uses
    for name in uses:
        manager.acquire(name)
        working = reserve(weights[name]) if name in manager.resident() else 0
        peak = max(peak, card.context + sum(weights[n] for n in manager.resident()) + working)
    loads = Counter(p.component for p in manager.history if p.action == "load")
    moves = Counter(p.component for p in manager.history if p.action in MOVES)
    on_cpu = tuple(n for n in COMPONENTS if any(p.component == n and "on the CPU" in p.detail for p in manager.history))
    on_card = tuple(n for n in COMPONENTS if n not in on_cpu and loads[n] == 1 and not moves[n])
    verdict = plan_for(weights, card_bytes - card.context, free_ram)
    if any(known.get(n) is None for n in COMPONENTS):
        verdict = "unknown"
    if verdict == "moving" and not moves and not any(loads[n] > 1 for n in COMPONENTS):
        verdict = "resident"  # everything that runs on the card fits; a small model runs beside it on the CPU
    return Plan(
        profile=profile.name, placement=profile.placement, card_gib=round(card_bytes / GIB, 1), iterations=iterations,
        verdict=verdict, weights_gib={n: None if known.get(n) is None else round(known[n] / GIB, 2) for n in COMPONENTS},
        on_card=on_card, on_cpu=on_cpu, loads={n: loads[n] for n in COMPONENTS}, moves={n: moves[n] for n in COMPONENTS},
        moved_gib=round(sum(weights[p.component] for p in manager.history if p.action in MOVES) / GIB, 1),
        releases=card.releases, peak_gib=round(peak / GIB, 1), uses=uses)
