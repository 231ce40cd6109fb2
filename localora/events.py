"""Run events and step ids: the one definition the search writes and the live view, the HTML
report, resume and the bench read.

    events.jsonl, one JSON object per line, in the order things happened:
      start       the run's shape (LoRAs, rounds, candidates, few-shot grid size)
      render      id=ref/0 | grid/4 | start | iter2/cand3 | iter2/refined    one image made or recalled,
                                                                              with its origin (vlm, filled, ...)
      fewshot     id=fewshot                                                  the examples kept
      iteration   a round begins
      scores      id=iter2/scores | final/scores                              CLIP-T (and the objective) of a round
      vlm         id=iter2/generate | iter2/regenerate | iter2/feedback |     one VLM call, prompt and answer
                     iter2/refine | select | final/1v3b                       (the last: --final-judge, contenders
                                                                              1 and 3, contender 3 shown first)
      state       id=iter2/state                                              an optimizer's state after round 2
      model       a model loaded, moved, evicted or dropped (the device manager's log)
      resume      a resumed run recalled its completed steps
      done        the final pick

An event with an "id" is a completed step: a resumed run takes it from the log instead of doing
it again. Step ids are made and read only through the functions here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict

START, ITERATION, RENDER, FEWSHOT, SCORES, VLM, STATE, MODEL, RESUME, DONE = (
    "start", "iteration", "render", "fewshot", "scores", "vlm", "state", "model", "resume", "done")

# What a render is for (its "role").
Role = Literal["reference", "grid", "start", "candidate", "refined"]
# Who chose a candidate's weights: the VLM, the VLM asked again for the duplicates of its first
# answer, a perturbation filling what was still missing (search/candidates.py), or an optimizer.
Origin = Literal["vlm", "vlm-again", "filled", "random", "cmaes"]


# ------------------------------------------------------------------ step ids

def reference(i: int) -> str:
    """The i-th LoRA (from 0) rendered alone."""
    return f"ref/{i}"


def grid(i: int) -> str:
    return f"grid/{i}"


START_RENDER = "start"
FEWSHOT_STEP = "fewshot"
SELECT = "select"
FINAL_SCORES = "final/scores"  # the vlm loop: the refined images' objective (report; --final-judge ranks by it)


def candidate(r: int, j: int) -> str:
    """Round r's j-th candidate render (both from 1)."""
    return f"iter{r}/cand{j}"


RoundKind = Literal["generate", "regenerate", "scores", "feedback", "refine", "refined", "state"]


def round_step(r: int, kind: RoundKind) -> str:
    return f"iter{r}/{kind}"


def final_judge(i: int, j: int, first: Literal["a", "b"]) -> str:
    """--final-judge's call on contenders i and j (from 1); "a": i is shown first, "b": j is."""
    return f"final/{i}v{j}{first}"


@dataclass(frozen=True)
class Step:
    kind: str  # reference, grid, start, fewshot, select, candidate, generate, regenerate, scores, feedback,
    #            refine, refined, state, final-judge (round, index: the two contenders)
    round: int | None = None
    index: int | None = None


_FINAL = re.compile(r"^final/(\d+)v(\d+)([ab])$")
_ROUND = re.compile(r"^iter(\d+)/(?:cand(\d+)|(generate|regenerate|scores|feedback|refine|refined|state))$")


def parse(step_id: str) -> Step:
    """The parts of a step id; ValueError for an id no version of localora writes."""
    if step_id in (START_RENDER, FEWSHOT_STEP, SELECT):
        return Step(step_id)
    if step_id == FINAL_SCORES:
        return Step("final-scores")
    head, _, tail = step_id.partition("/")
    if head in ("ref", "grid") and tail.isdigit():
        return Step("reference" if head == "ref" else "grid", index=int(tail))
    final = _FINAL.match(step_id)
    if final:
        return Step("final-judge", int(final[1]), int(final[2]))
    m = _ROUND.match(step_id)
    if m is None:
        raise ValueError(f"not a step id: {step_id!r}")
    if m[2] is not None:
        return Step("candidate", int(m[1]), int(m[2]))
    return Step(m[3], int(m[1]))


# ------------------------------------------------------------------ the events' fields

class StartEvent(TypedDict):
    type: Literal["start"]
    iterations: int
    candidates: int
    loras: list[str]
    grid: int  # few-shot grid renders planned (0: few-shot off)


class IterationEvent(TypedDict):
    type: Literal["iteration"]
    iteration: int


class RenderEvent(TypedDict):
    type: Literal["render"]
    id: str
    role: Role
    iteration: int | None
    weights: dict[str, float]
    key: str  # the render cache key
    cached: bool
    image: str  # relative to the run folder
    seconds: float
    origin: NotRequired[Origin]  # candidates only


class FewshotEvent(TypedDict):
    type: Literal["fewshot"]
    id: str
    reused: bool
    library: str
    threshold: float
    scored: list[dict[str, Any]]
    kept: list[dict[str, Any]]


class ScoresEvent(TypedDict):
    type: Literal["scores"]
    id: str
    iteration: int | None  # None: the final scores of --final-judge
    candidates: list[dict[str, float]]
    images: list[str]
    clip_t: list[float]
    clip_i: NotRequired[list[float]]  # mean CLIP-I to the LoRAs' references (black-box objectives)
    objective: NotRequired[list[float]]  # what a black-box strategy maximizes (search/blackbox.py)


class StateEvent(TypedDict):
    type: Literal["state"]
    id: str
    iteration: int
    strategy: str
    spent: int  # renders of the budget spent so far
    budget: int
    best: float  # the best objective so far
    state: dict[str, Any]  # e.g. CMA-ES's mean, step size and covariance


class VlmEvent(TypedDict):
    type: Literal["vlm"]
    id: str
    step: str  # generate, feedback, refine, select
    system: str
    prompt: str
    images: list[str]
    raw: str  # the model's answer as decoded
    value: Any  # the parsed answer
    seconds: float
    prompt_tokens: int
    new_tokens: int


class ModelEvent(TypedDict):
    type: Literal["model"]
    model: str  # diffusion, vlm, clip
    action: str  # load, to-device, offload, drop; compile: --compile's warm-up (seconds), in no render's seconds
    seconds: float
    bytes: int  # the model's own size (parameters and buffers, as stored: 4-bit weights count 4 bits)
    memory: int  # accelerator memory allocated after the action (0 on a CPU)
    resident: list[str]  # models on the accelerator after the action
    detail: str  # what was loaded, e.g. "tiny-qwen2-vl (nf4, float32)"


class ResumeEvent(TypedDict):
    type: Literal["resume"]
    completed: int
    renders: int
    calls: int
    iterations_done: int


class DoneEvent(TypedDict):
    type: Literal["done"]
    weights: dict[str, float]
    iteration: int
    image: str
    renders: NotRequired[int]  # candidate renders spent (black-box strategies: the budget)
    objective: NotRequired[float]


Event = (StartEvent | IterationEvent | RenderEvent | FewshotEvent | ScoresEvent | VlmEvent | StateEvent
         | ModelEvent | ResumeEvent | DoneEvent)


def resume_summary(completed: list[dict[str, Any]]) -> ResumeEvent:
    """What a resumed run recalls: counted once here for the log and the live view."""
    return ResumeEvent(type="resume", completed=len(completed),
                       renders=sum(e["type"] == RENDER for e in completed),
                       calls=sum(e["type"] == VLM for e in completed),
                       iterations_done=sum(e.get("role") == "refined" for e in completed))
