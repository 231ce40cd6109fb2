"""The cached, resumable steps every search strategy is made of.

    steps = Steps(run, renderer, vlm, scorer, emit)
    path  = steps.render(events.candidate(2, 1), "candidate", job, names, iteration=2)   # image path in the run
    clip  = steps.score(events.round_step(2, "scores"), vectors, paths, text, names, iteration=2)
    value = steps.ask(events.round_step(2, "generate"), "generate", system, paths, text, schema, ...)

Each step has an id (localora.events) and, when done, is one event in the run folder. Asked
again for an id that is already done (a resumed run), a step returns the recorded result
without rendering, scoring or asking again. Renders go through the content-addressed render
cache, so the same weights are never denoised twice, in this run or any other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from localora import events
from localora.diffusion.render import Renderer, Rendered, RenderJob
from localora.vlm import ChatModel

if TYPE_CHECKING:
    from localora.scoring.clip import ClipScorer

Emit = Callable[[dict[str, Any]], None]
# A searched vector -> the render's (weights, per-LoRA block vectors): ComposeConfig.render_args.
Expand = Callable[[Sequence[float]], tuple[tuple[float, ...], tuple]]

# What black-box strategies maximize (search/blackbox.py), computed by Steps.objective.
CLIP_T_WEIGHT, CLIP_I_WEIGHT = 1.0, 1.0


def objective(clip_t: float, clip_i: float) -> float:
    """CLIP-T to the prompt plus mean CLIP-I to the LoRAs alone, weighted 1 and 1."""
    return CLIP_T_WEIGHT * clip_t + CLIP_I_WEIGHT * clip_i


class Record(Protocol):
    """Where a run keeps its steps: localora.runs.folder.RunFolder is one."""

    path: Path
    completed: dict[str, dict[str, Any]]  # step id -> its event

    def log(self, event: dict[str, Any]) -> None: ...
    def save_image(self, rendered: Rendered, rel: str | None = None) -> str: ...
    def image(self, rel: str) -> Image.Image: ...
    def copy(self, rel: str, name: str) -> None: ...
    def write_json(self, name: str, data: Any) -> None: ...


@dataclass
class Steps:
    run: Record
    renderer: Renderer
    vlm: ChatModel | None
    scorer: ClipScorer | None
    emit: Emit = lambda event: None

    def recall(self, step: str) -> dict[str, Any] | None:
        """The recorded event of a completed step, or None."""
        return self.run.completed.get(step)

    def event(self, event: dict[str, Any]) -> None:
        """Record an event in the run folder (on disk before the run goes on), then show it."""
        self.run.log(event)
        self.emit(event)

    def image(self, rel: str) -> Image.Image:
        return self.run.image(rel)

    def render(self, step: str, role: events.Role, job: RenderJob, names: Sequence[str],
               iteration: int | None = None) -> str:
        """Render (or recall) one image; returns its path in the run folder."""
        return self.render_many([step], role, job, [job.weights], names, iteration)[0]

    def render_many(self, steps: Sequence[str], role: events.Role, job: RenderJob,
                    vectors: Sequence[Sequence[float]], names: Sequence[str], iteration: int | None = None,
                    origins: Sequence[events.Origin] | None = None, expand: Expand | None = None) -> list[str]:
        """Render (or recall) `job` under each weight vector, one step each; the renderer batches
        the ones not done yet. Returns their paths in the run folder, in order. `expand`, when
        given, turns a searched vector into the render's (weights, per-LoRA lbw vectors) (compose
        --blocks); the events keep the searched vector under `names`.

        A done step whose image was deleted from the run folder is rendered again (usually a
        render-cache hit) and put back where its event says, so a resumed run never reads a
        missing file."""
        lost = [i for i, step in enumerate(steps)
                if self.recall(step) and not (self.run.path / self.recall(step)["image"]).is_file()]
        def draw(which: list[int]) -> list[Rendered]:
            stats = self.renderer.stats
            compiles, warmup = stats.compiles, stats.compile_seconds
            if expand is None:
                outs = self.renderer.render_many(job, [vectors[i] for i in which])
            else:
                args = [expand(vectors[i]) for i in which]
                outs = self.renderer.render_many(job, [w for w, _ in args], [b for _, b in args])
            if stats.compiles > compiles:  # --compile's warm-up: logged apart, not in the renders' seconds
                self.event(events.ModelEvent(
                    type="model", model="diffusion", action="compile", seconds=round(stats.compile_seconds - warmup, 3),
                    bytes=0, memory=0, resident=[], detail=f"torch.compile warm-up, {stats.compiles - compiles} "
                                                           f"compile(s), not in render times"))
            return outs

        for i, out in zip(lost, draw(lost)):
            self.run.save_image(out, rel=self.recall(steps[i])["image"])
        todo = [i for i, step in enumerate(steps) if not self.recall(step)]
        outs = draw(todo)
        for i, out in zip(todo, outs):
            rel = self.run.save_image(out)
            event = events.RenderEvent(
                type="render", id=steps[i], role=role, iteration=iteration,
                weights=dict(zip(names, (float(w) for w in vectors[i]))), key=out.key, cached=out.cached,
                image=rel, seconds=round(out.seconds, 3))
            if origins is not None:
                event["origin"] = origins[i]
            self.event(event)
        return [self.recall(step)["image"] for step in steps]

    def score(self, step: str, vectors: Sequence[Sequence[float]], images: list[str], text: str,
              names: Sequence[str], iteration: int) -> list[float]:
        """CLIP-T of each image against `text` (or the recorded scores)."""
        done = self.recall(step)
        if done:
            return done["clip_t"]
        scores = [float(s) for s in self.scorer.clip_t_batch([self.image(p) for p in images], text)]
        self.event(events.ScoresEvent(
            type="scores", id=step, iteration=iteration, candidates=[dict(zip(names, v)) for v in vectors],
            images=images, clip_t=scores))
        return scores

    def objective(self, step: str, vectors: Sequence[Sequence[float]], images: list[str], text: str,
                  references: list[str], names: Sequence[str], iteration: int | None) -> list[float]:
        """The black-box objective of each image (search/blackbox.py): CLIP-T to `text` plus mean CLIP-I
        to the `references`; or the recorded values."""
        done = self.recall(step)
        if done:
            return done["objective"]
        pictures = [self.image(p) for p in images]
        clip_t = [float(s) for s in self.scorer.clip_t_batch(pictures, text)]
        clip_i = [float(s) for s in self.scorer.clip_i_batch(pictures, [self.image(p) for p in references])]
        values = [objective(t, i) for t, i in zip(clip_t, clip_i)]
        self.event(events.ScoresEvent(
            type="scores", id=step, iteration=iteration, candidates=[dict(zip(names, v)) for v in vectors],
            images=images, clip_t=clip_t, clip_i=clip_i, objective=values))
        return values

    def ask(self, step: str, kind: str, system: str, images: list[str], text: str, schema: Any,
            temperature: float | None, seed: int) -> Any:
        """One constrained VLM call about images of the run (or its recorded answer); the parsed value."""
        done = self.recall(step)
        if done:
            return done["value"]
        answer = self.vlm.chat(system, [self.run.path / p for p in images], text, schema=schema,
                               temperature=temperature, seed=seed)
        self.event(events.VlmEvent(
            type="vlm", id=step, step=kind, system=system, prompt=text, images=images, raw=answer.text,
            value=answer.value, seconds=round(answer.seconds, 3), prompt_tokens=answer.prompt_tokens,
            new_tokens=answer.new_tokens))
        return answer.value
