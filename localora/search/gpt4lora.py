"""The self-reflection loop (GPT4LoRA) with a local VLM: Generate -> Feedback -> Refine.

    references   each LoRA rendered alone with its trigger words: what it should look like
    few-shot     a CLIP-scored grid of weights; the balanced best become examples
    N rounds of  generate M candidate weight vectors from the current image and the references,
                 render them, get feedback on them, refine to one vector, render it
    select       the VLM picks the best of the N refined images

Every step has an id and is recorded in the run folder when done; `compose` replays a run from
its log, so a resumed run skips what it finished and ends exactly where a clean run would. All
renders share one seed, so images differ only by their weights.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


from localora.search import fewshot
from localora.vlm import prompts, schemas
from localora.errors import LocaloraError
from localora.files import file_hash
from localora.diffusion.loras import Lora, with_triggers
from localora.diffusion.render import Renderer, RenderJob
from localora.diffusion.sampling import Sampling
from localora.runs.folder import RunFolder

Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class ComposeConfig:
    prompt: str
    loras: tuple[Lora, ...]
    iterations: int = 5
    candidates: int = 5
    bounds: tuple[float, float] = (0.0, 1.5)
    sampling: Sampling = Sampling()  # every render of the run shares it (one seed: images differ by weights)
    start: tuple[float | None, ...] | None = None  # None (or a None entry): 1.0, inside the bounds
    method: str = "merge"
    fewshot: bool = True
    fewshot_levels: tuple[float, ...] = (0.4, 0.7, 1.0)
    fewshot_threshold: float = 0.0
    fewshot_keep: int = 5
    temperature: float | None = None  # None: greedy answers
    feedback_chars: int = 600
    prompts_dir: str | None = None

    def check(self) -> None:
        lo, hi = self.bounds
        if len(self.loras) < 2:
            raise LocaloraError(f"compose needs at least 2 LoRAs to combine, got {len(self.loras)}; "
                                f"for one LoRA use `localora generate`")
        if self.iterations < 1 or self.candidates < 1:
            raise LocaloraError("--iterations and --candidates must be at least 1")
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise LocaloraError(f"--bounds {lo:g},{hi:g}: need two finite numbers with min <= max")
        if self.start is not None:
            if len(self.start) != len(self.loras):
                raise LocaloraError(f"--start has {len(self.start)} weights for {len(self.loras)} LoRAs")
            if any(w is not None and not lo <= w <= hi for w in self.start):
                raise LocaloraError(f"--start weights must lie within the bounds {lo:g}..{hi:g}")
        if len({lo.name for lo in self.loras}) != len(self.loras):
            raise LocaloraError("the same LoRA name is given twice; each LoRA once")

    @property
    def seed(self) -> int:
        return self.sampling.seed

    @property
    def names(self) -> list[str]:
        return [lo.name for lo in self.loras]

    @property
    def start_weights(self) -> tuple[float, ...]:
        lo, hi = self.bounds
        default = min(max(1.0, lo), hi)
        return tuple(default if w is None else w for w in (self.start or [None] * len(self.loras)))

    def settings(self) -> dict[str, Any]:
        """What run.json stores: enough to resume, and to tell what ran."""
        d = asdict(self)
        d["loras"] = [{"name": lo.name, "path": str(lo.path), "category": lo.category, "triggers": lo.triggers,
                       "references": [str(r) for r in lo.references], "sha256": file_hash(lo.path)}
                      for lo in self.loras]
        return d

    @classmethod
    def from_settings(cls, d: dict[str, Any]) -> ComposeConfig:
        d = dict(d)
        d["loras"] = tuple(Lora(x["name"], Path(x["path"]), x["category"], x["triggers"],
                                tuple(Path(r) for r in x.get("references", []))) for x in d["loras"])
        for key in ("bounds", "start", "fewshot_levels"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        # run.json of localora 0.1 kept the sampling fields at the top level.
        d["sampling"] = Sampling.from_dict(d.get("sampling") or d)
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def reference_job(base_prompt: str, lora: Lora, sampling: Sampling, method: str = "merge") -> RenderJob:
    """A LoRA alone at weight 1.0, with only its own trigger words: what its element looks like.

    The loop shows these to the VLM and the bench scores CLIP-I against them; both build them
    here so the render cache serves one to the other.
    """
    return RenderJob(prompt=with_triggers(base_prompt, [lora]), loras=(lora,), weights=(1.0,), method=method,
                     sampling=sampling)


@dataclass(frozen=True)
class Final:
    weights: dict[str, float]
    iteration: int
    image: str  # relative to the run folder


@dataclass
class Loop:
    """One compose run: its settings, its components, and its run folder."""

    cfg: ComposeConfig
    run: RunFolder
    renderer: Renderer
    vlm: Any  # localora.vlm.VLM or anything with its chat()
    scorer: Any  # localora.clipscore.ClipScorer
    emit: Emit = lambda event: None
    _prompt: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self._prompt = with_triggers(self.cfg.prompt, list(self.cfg.loras))

    # ------------------------------------------------------------ the algorithm

    def compose(self) -> Final:
        cfg = self.cfg
        self._event({"type": "start", "iterations": cfg.iterations, "candidates": cfg.candidates,
                     "loras": cfg.names, "grid": len(fewshot.grid(len(cfg.loras), cfg.fewshot_levels)) if cfg.fewshot else 0})
        refs = [self.render(f"ref/{i}", "reference", self._alone(i),
                            job=reference_job(cfg.prompt, lo, cfg.sampling, cfg.method))
                for i, lo in enumerate(cfg.loras)]
        examples = self.examples() if cfg.fewshot else []
        weights = cfg.start_weights
        current = self.render("start", "start", weights)
        refined: list[tuple[tuple[float, ...], str]] = []
        for r in range(1, cfg.iterations + 1):
            self._event({"type": "iteration", "iteration": r})
            vectors = self.generate(r, weights, current, refs, examples)
            cands = [self.render(f"iter{r}/cand{j}", "candidate", w, iteration=r) for j, w in enumerate(vectors, 1)]
            self.score(f"iter{r}/scores", vectors, cands, iteration=r)
            notes = self.feedback(r, vectors, cands, refs)
            weights = self.refine(r, vectors, cands, notes)
            current = self.render(f"iter{r}/refined", "refined", weights, iteration=r)
            refined.append((weights, current))
        pick = self.select(refined)
        final_weights, final_image = refined[pick - 1]
        final = Final(dict(zip(cfg.names, final_weights)), pick, final_image)
        self.run.copy(final_image, "final.png")
        self.run.write_json("final.json", {
            "weights": final.weights, "iteration": pick, "seed": cfg.seed, "method": cfg.method,
            "prompt": self._prompt, "profile": self.renderer.profile.name, "image": final_image,
        })
        self._event({"type": "done", "weights": final.weights, "iteration": pick, "image": final_image})
        return final

    def _alone(self, i: int) -> tuple[float, ...]:
        return tuple(1.0 if j == i else 0.0 for j in range(len(self.cfg.loras)))

    # ------------------------------------------------------------ steps

    def examples(self) -> list[str]:
        """Few-shot example lines, from the library or by scoring a grid."""
        cfg = self.cfg
        key = self.library_key()
        done = self.run.completed.get("fewshot")
        if done is None:
            stored = fewshot.load_library(key)
            if stored is None:
                kept, scored, images = self._score_grid()
                fewshot.save_library(key, kept, scored, images)
                reused = False
            else:
                kept, scored = stored
                reused = True
            done = {"type": "fewshot", "id": "fewshot", "reused": reused, "library": str(fewshot.library_dir(key)),
                    "threshold": cfg.fewshot_threshold, "scored": [asdict(s) for s in scored],
                    "kept": [asdict(s) for s in kept]}
            self._event(done)
        kept = [fewshot.Scored(tuple(s["weights"]), s["prompt_score"], tuple(s["lora_scores"]), s["image"])
                for s in done["kept"]]
        return [fewshot.describe(e, self.cfg.names) for e in kept]

    def library_key(self) -> dict[str, Any]:
        """What decides the few-shot examples: the grid's render keys (model, LoRA bytes, every
        setting) and how the images are scored."""
        cfg = self.cfg
        return {"renders": [self.renderer.key(self.job(w)) for w in fewshot.grid(len(cfg.loras), cfg.fewshot_levels)],
                "texts": self._score_texts(), "clip": asdict(self.renderer.profile.clip),
                "threshold": cfg.fewshot_threshold, "keep": cfg.fewshot_keep}

    def _score_grid(self):
        cfg = self.cfg
        vectors = fewshot.grid(len(cfg.loras), cfg.fewshot_levels)
        paths = [self.render(f"grid/{i}", "grid", w) for i, w in enumerate(vectors)]
        images = {p: self.run.image(p) for p in paths}
        # Each image is embedded once and compared with the prompt and every LoRA's trigger words.
        cosines = (self.scorer.image_embeddings([images[p] for p in paths])
                   @ self.scorer.text_embeddings(self._score_texts()).T).tolist()
        scored = [fewshot.Scored(w, row[0], tuple(row[1:]), paths[i]) for i, (w, row) in enumerate(zip(vectors, cosines))]
        return fewshot.select(scored, cfg.fewshot_threshold, cfg.fewshot_keep), scored, images

    def _score_texts(self) -> list[str]:
        return [self._prompt, *(lo.triggers or lo.name for lo in self.cfg.loras)]

    def generate(self, r: int, weights, current: str, refs: list[str], examples: list[str]) -> list[tuple[float, ...]]:
        cfg = self.cfg
        lo, hi = cfg.bounds
        schema = schemas.candidates(cfg.names, cfg.candidates, lo, hi)
        text = self._template("generate", schema, current=self._fmt(weights), last_reference=str(1 + len(refs)),
                              examples="\n".join(examples) or "(none)", candidates=str(cfg.candidates))
        value = self.ask(f"iter{r}/generate", "generate", [current, *refs], text, schema)
        return [tuple(float(v[n]) for n in cfg.names) for v in value]

    def feedback(self, r: int, vectors, cands: list[str], refs: list[str]) -> str:
        m = len(cands)
        schema = schemas.feedback(self.cfg.feedback_chars)
        text = self._template("feedback", schema, candidates=str(m), candidate_list=self._list(vectors),
                              first_reference=str(m + 1), last_reference=str(m + len(refs)))
        value = self.ask(f"iter{r}/feedback", "feedback", [*cands, *refs], text, schema)
        return value["feedback"]

    def refine(self, r: int, vectors, cands: list[str], notes: str) -> tuple[float, ...]:
        lo, hi = self.cfg.bounds
        schema = schemas.refine(self.cfg.names, lo, hi, self.cfg.feedback_chars)
        text = self._template("refine", schema, candidates=str(len(cands)), candidate_list=self._list(vectors),
                              feedback=notes.strip() or "(none)")
        value = self.ask(f"iter{r}/refine", "refine", cands, text, schema)
        return tuple(float(value["weights"][n]) for n in self.cfg.names)

    def select(self, refined: list[tuple[tuple[float, ...], str]]) -> int:
        if len(refined) == 1:
            return 1  # one refined image: nothing to choose
        schema = schemas.choice(len(refined))
        text = self._template("select", schema, count=str(len(refined)),
                              image_list=self._list([w for w, _ in refined], label="round"))
        return int(self.ask("select", "select", [p for _, p in refined], text, schema))

    # ------------------------------------------------------------ memoized actions

    def render(self, step: str, role: str, weights, job: RenderJob | None = None, iteration: int | None = None) -> str:
        """Render (or recall) one image, by default the composition at `weights`; returns its
        path in the run folder."""
        done = self.run.completed.get(step)
        if done:
            return done["image"]
        cfg = self.cfg
        job = job or self.job(weights)
        out = self.renderer.render(job)
        rel = self.run.save_image(out)
        self._event({"type": "render", "id": step, "role": role, "iteration": iteration,
                     "weights": dict(zip(cfg.names, weights)), "key": out.key, "cached": out.cached,
                     "image": rel, "seconds": round(out.seconds, 3)})
        return rel

    def job(self, weights) -> RenderJob:
        cfg = self.cfg
        return RenderJob(prompt=self._prompt, loras=cfg.loras, weights=tuple(weights), method=cfg.method,
                         sampling=cfg.sampling)

    def score(self, step: str, vectors, images: list[str], iteration: int) -> list[float]:
        done = self.run.completed.get(step)
        if done:
            return done["clip_t"]
        scores = [float(s) for s in self.scorer.clip_t_batch([self.run.image(p) for p in images], self._prompt)]
        self._event({"type": "scores", "id": step, "iteration": iteration,
                     "candidates": [dict(zip(self.cfg.names, v)) for v in vectors], "images": images, "clip_t": scores})
        return scores

    def ask(self, step: str, kind: str, images: list[str], text: str, schema) -> Any:
        """One constrained VLM call (or its recorded answer); returns the parsed value."""
        done = self.run.completed.get(step)
        if done:
            return done["value"]
        system = self._template("system", None)
        seed = self.cfg.seed * 7919 + zlib.crc32(step.encode()) % 7919
        answer = self.vlm.chat(system, [self.run.path / p for p in images], text, schema=schema,
                               temperature=self.cfg.temperature, seed=seed)
        self._event({"type": "vlm", "id": step, "step": kind, "system": system, "prompt": text, "images": images,
                     "raw": answer.text, "value": answer.value, "seconds": round(answer.seconds, 3),
                     "prompt_tokens": answer.prompt_tokens, "new_tokens": answer.new_tokens})
        return answer.value

    # ------------------------------------------------------------ text

    def _template(self, name: str, schema, **fields: str) -> str:
        """prompts/NAME.txt filled in; {answer_format} shows the shape the grammar will enforce."""
        lo, hi = self.cfg.bounds
        base = {"prompt": self._prompt, "loras": self._loras_text(), "lo": f"{lo:.2f}", "hi": f"{hi:.2f}",
                "answer_format": schema.describe() if schema is not None else ""}
        override = Path(self.cfg.prompts_dir) if self.cfg.prompts_dir else None
        return prompts.render(name, override, **base, **fields)

    def _loras_text(self) -> str:
        return "\n".join(f"{i}. {lo.name} ({lo.category or 'unknown category'}): {lo.triggers or '-'}"
                         for i, lo in enumerate(self.cfg.loras, 1))

    def _fmt(self, weights) -> str:
        return ", ".join(f"{n}={w:.2f}" for n, w in zip(self.cfg.names, weights))

    def _list(self, vectors, label: str = "candidate") -> str:
        return "\n".join(f"Picture {i}: {label} {i}, weights {self._fmt(w)}" for i, w in enumerate(vectors, 1))

    def _event(self, event: dict[str, Any]) -> None:
        self.run.log(event)
        self.emit(event)
