"""GPT4LoRA's self-reflection loop with a local VLM in place of GPT-4o: Generate -> Feedback -> Refine.

    Algorithm 1, as `GPT4LoRA.compose` runs it:
        R_k  <- render LoRA k alone, k = 1..K               what each element should look like
        E    <- few-shot examples, CLIP-scored renders of a design of weights (fewshot.py; reused)
        x_0  <- render(w_0)                                  the start weights
        for r = 1..N:
            C_r <- generate(x_{r-1}, R, E)                  M new candidate weight vectors
            X_r <- render(C_r)                               and CLIP-T scores, for the record
            F_r <- feedback(X_r, R)
            w_r <- refine(X_r, C_r, F_r);  x_r <- render(w_r)
        S    <- CLIP-T, CLIP-I and the objective of x_1 .. x_N   for the report, and --final-judge
        return select(x_1 .. x_N)          the VLM's pick, with a short reason (--final-judge: the
                                           pairwise judge, among the top 3 by S; search/final.py)

Every line is a step of localora.search.steps (cached, resumable, one event each); this file
only decides what to render and what to ask. A round's M candidates are distinct and new to the
run: the VLM's repeats are asked for once more (sampling), then filled (search/candidates.py). All renders share one Sampling (one seed), so the
images differ only by their weights.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from localora import events
from localora.diffusion.loras import with_triggers
from localora.diffusion.render import RenderJob
from localora.search import fewshot
from localora.search import final as final_judge
from localora.search.candidates import Taken, complete, round_rng
from localora.search.config import ComposeConfig, Final, reference_job
from localora.search.steps import Steps
from localora.vlm import prompts, schemas

Weights = tuple[float, ...]

# The second ask for candidates samples, so that it can differ from the first (greedy) answer.
AGAIN_TEMPERATURE = 0.7
# Visual tokens the images of one Generate call may take, counted at the profile's per-image cap
# by the VLM family's rule (Qwen2/2.5-VL: one token per 28x28 pixels, Qwen3-VL per 32x32, Gemma 3
# a fixed 256): the current image and the references first, then as many few-shot examples as
# still fit. 8192 leaves a 32k-context Qwen2-VL room for the text and the answer.
GENERATE_VISUAL_TOKENS = 8192
# The final pick's reason: one short sentence for report.html, not an essay to decode.
SELECT_REASON_CHARS = 200

# The fields each prompt template may use: every template gets BASE_FIELDS, plus its own.
BASE_FIELDS = ("prompt", "loras", "lo", "hi", "answer_format")
TEMPLATES = {
    "system": (),
    "generate": ("current", "last_reference", "examples", "candidates"),
    "feedback": ("candidates", "candidate_list", "first_reference", "last_reference"),
    "refine": ("candidates", "candidate_list", "feedback"),
    "select": ("count", "image_list"),
}


def check_templates(prompts_dir: str | Path | None) -> None:
    """Every template the loop will fill, read and checked now: a bad field in a user's template is
    an error before the first render, not after the references and the few-shot grid."""
    for name, own in TEMPLATES.items():
        prompts.check(name, Path(prompts_dir) if prompts_dir else None, BASE_FIELDS + own)


@dataclass(frozen=True)
class Example:
    """A few-shot example as the Generate step shows it: its image (a path in the run folder, or
    an absolute one in the few-shot library) and the line that labels it with its weights."""

    image: str
    line: str


@dataclass
class GPT4LoRA:
    """One compose run of the loop: its settings and the steps it is made of."""

    cfg: ComposeConfig
    steps: Steps
    _prompt: str = field(init=False, default="")
    _taken: Taken = field(init=False)  # every vector rendered so far, replayed in order on resume

    def __post_init__(self) -> None:
        self._prompt = with_triggers(self.cfg.prompt, list(self.cfg.loras))
        self._taken = Taken(self.cfg.bounds)

    @property
    def prompt(self) -> str:
        """The prompt every render of the run uses: the user's, with each LoRA's trigger words."""
        return self._prompt

    # ------------------------------------------------------------ Algorithm 1

    def compose(self) -> Final:
        cfg = self.cfg
        check_templates(cfg.prompts_dir)
        self.steps.event(events.StartEvent(
            type="start", iterations=cfg.iterations, candidates=cfg.candidates, loras=cfg.names,
            grid=len(self._design()) if cfg.fewshot else 0))
        refs = [self.steps.render(events.reference(k), "reference",
                                  reference_job(cfg.prompt, lo, cfg.sampling, cfg.method), [lo.name])
                for k, lo in enumerate(cfg.loras)]
        examples = self.examples() if cfg.fewshot else []
        weights = cfg.start_weights
        current = self.render(events.START_RENDER, "start", weights)
        self._taken.add([weights])
        refined: list[tuple[Weights, str]] = []
        for r in range(1, cfg.iterations + 1):
            self.steps.event(events.IterationEvent(type="iteration", iteration=r))
            vectors, origins = self.generate(r, weights, current, refs, examples)
            cands = self.render_many([events.candidate(r, j) for j in range(1, len(vectors) + 1)], "candidate",
                                     vectors, r, origins)
            self.steps.score(events.round_step(r, "scores"), vectors, cands, self._prompt, cfg.dims, r)
            notes = self.feedback(r, vectors, cands, refs)
            weights = self.refine(r, vectors, cands, notes)
            current = self.render(events.round_step(r, "refined"), "refined", weights, r)
            self._taken.add([weights])
            refined.append((weights, current))
        # Every refined image's CLIP scores, for the report (and --final-judge's ranking, which
        # recalls them): cheap next to a render, CLIP being loaded for the rounds' scores anyway.
        self.steps.objective(events.FINAL_SCORES, [w for w, _ in refined], [p for _, p in refined],
                             self._prompt, refs, cfg.dims, None)
        pick = self.judge_final(refined, refs) if cfg.final_judge else self.select(refined)
        return self.finish(pick, *refined[pick - 1])

    def finish(self, pick: int, weights: Weights, image: str) -> Final:
        cfg, run = self.cfg, self.steps.run
        final = Final(dict(zip(cfg.dims, weights)), pick, image)
        run.copy(image, "final.png")
        run.write_json("final.json", {
            "weights": final.weights, "iteration": pick, "seed": cfg.seed, "method": cfg.method,
            "prompt": self._prompt, "profile": self.steps.renderer.profile.name, "image": image,
        })
        spent = sum(e["type"] == events.RENDER and e.get("role") in ("candidate", "refined")
                    for e in self.steps.run.completed.values())
        self.steps.event(events.DoneEvent(type="done", weights=final.weights, iteration=pick, image=image,
                                          renders=spent))
        return final

    # ------------------------------------------------------------ the VLM's three questions and the pick

    def proposals(self, step: str, weights: Weights, current: str, refs: list[str], examples: list[Example],
                  temperature: float | None = None) -> list[Weights]:
        """The VLM's M candidate vectors, as it answers them (maybe with repeats)."""
        cfg = self.cfg
        lo, hi = cfg.bounds
        schema = schemas.candidates(cfg.dims, cfg.candidates, lo, hi)
        shown = examples[: self.example_room(len(refs))]
        first = 2 + len(refs)  # pictures: 1 the current image, 2.. the references, then the examples
        lines = [f"Picture {first + i}: {e.line}" for i, e in enumerate(shown)]
        text = self._template("generate", schema, current=self._fmt(weights), last_reference=str(1 + len(refs)),
                              examples="\n".join(lines) or "(none)", candidates=str(cfg.candidates))
        kind = events.parse(step).kind
        value = self.ask(step, kind, [current, *refs, *(e.image for e in shown)], text, schema, temperature)
        return [tuple(float(v[n]) for n in cfg.dims) for v in value]

    def example_room(self, n_refs: int) -> int:
        """How many example images fit GENERATE_VISUAL_TOKENS beside the current image and the
        references, at the profile's visual tokens per image."""
        per_image = max(1, self.steps.vlm.image_tokens(self.steps.renderer.profile.vlm.max_pixels))
        return max(0, GENERATE_VISUAL_TOKENS // per_image - 1 - n_refs)

    def generate(self, r: int, weights: Weights, current: str, refs: list[str],
                 examples: list[Example]) -> tuple[list[Weights], list[str]]:
        """M candidates, distinct and new to the run, and who chose each: the VLM's answer; for its
        repeats a second, sampled answer; then perturbations of the current weights."""
        first = self.proposals(events.round_step(r, "generate"), weights, current, refs, examples)
        again = None
        if len(self._taken.sort_out(first)) < self.cfg.candidates:
            again = self.proposals(events.round_step(r, "regenerate"), weights, current, refs, examples,
                                   self.cfg.temperature or AGAIN_TEMPERATURE)
        return complete(self._taken, first, again, self.cfg.candidates, weights, round_rng(self.cfg.seed, r))

    def feedback(self, r: int, vectors: list[Weights], cands: list[str], refs: list[str]) -> str:
        m = len(cands)
        schema = schemas.feedback(self.cfg.feedback_chars)
        text = self._template("feedback", schema, candidates=str(m), candidate_list=self._list(vectors),
                              first_reference=str(m + 1), last_reference=str(m + len(refs)))
        return self.ask(events.round_step(r, "feedback"), "feedback", [*cands, *refs], text, schema)["feedback"]

    def refine(self, r: int, vectors: list[Weights], cands: list[str], notes: str) -> Weights:
        lo, hi = self.cfg.bounds
        schema = schemas.refine(self.cfg.dims, lo, hi, self.cfg.feedback_chars)
        text = self._template("refine", schema, candidates=str(len(cands)), candidate_list=self._list(vectors),
                              feedback=notes.strip() or "(none)")
        value = self.ask(events.round_step(r, "refine"), "refine", cands, text, schema)
        return tuple(float(value["weights"][n]) for n in self.cfg.dims)

    def select(self, refined: list[tuple[Weights, str]]) -> int:
        """The VLM's pick among the refined images, with a short reason (kept in its event)."""
        if len(refined) == 1:
            return 1  # one refined image: nothing to choose
        schema = schemas.pick(len(refined), SELECT_REASON_CHARS)
        text = self._template("select", schema, count=str(len(refined)),
                              image_list=self._list([w for w, _ in refined], label="round"))
        value = self.ask(events.SELECT, "select", [p for _, p in refined], text, schema)
        return int(value if isinstance(value, int) else value["choice"])  # a bare number: a run made before reasons

    def judge_final(self, refined: list[tuple[Weights, str]], refs: list[str]) -> int:
        """--final-judge: the pairwise judge's pick among the top 3 refined images by the objective."""
        values = self.steps.objective(events.FINAL_SCORES, [w for w, _ in refined], [p for _, p in refined],
                                      self._prompt, refs, self.cfg.dims, None)
        order = sorted(range(len(refined)), key=lambda i: -values[i])[: final_judge.CONTENDERS]
        return order[final_judge.pick(self.steps, self.cfg, [refined[i][1] for i in order]).index] + 1

    # ------------------------------------------------------------ few-shot examples

    def examples(self) -> list[Example]:
        """Few-shot examples, each its image and its line, from the library or by scoring a grid."""
        cfg = self.cfg
        done = self.steps.recall(events.FEWSHOT_STEP)
        if done is None:
            key = self.library_key()
            stored = fewshot.load_library(key)
            if stored is None:
                kept, scored, images = self._score_grid()
                fewshot.save_library(key, kept, scored, images)
            else:
                kept, scored = stored
            done = events.FewshotEvent(
                type="fewshot", id=events.FEWSHOT_STEP, reused=stored is not None,
                library=str(fewshot.library_dir(key)), threshold=cfg.fewshot_threshold,
                scored=[asdict(s) for s in scored], kept=[asdict(s) for s in kept])
            self.steps.event(done)
        self._taken.add(s["weights"] for s in done["scored"])  # the grid's images are known already
        if not done["reused"] and any(not (self.steps.run.path / s["image"]).is_file() for s in done["kept"]):
            # images/ was emptied since: render_many puts back what the grid's events name (cache hits)
            self.render_many([events.grid(i) for i in range(len(self._design()))], "grid", self._design())
        kept = [fewshot.Scored(tuple(s["weights"]), s["prompt_score"], tuple(s["lora_scores"]), s["image"])
                for s in done["kept"]]
        # A fresh grid's images are this run's renders; a reused library's are its own files.
        where = Path(done["library"]) if done["reused"] else None
        return [Example(str(where / e.image) if where else e.image, fewshot.describe(e, cfg.dims)) for e in kept]

    def library_key(self) -> dict[str, Any]:
        """What decides the few-shot examples: the grid's render keys (model, LoRA bytes, every
        setting) and how the images are scored."""
        cfg = self.cfg
        return {"renders": [self.steps.renderer.key(self.job(w)) for w in self._design()],
                "texts": self._score_texts(), "clip": asdict(self.steps.renderer.profile.clip),
                "threshold": cfg.fewshot_threshold, "keep": cfg.fewshot_keep}

    def _design(self) -> list[Weights]:
        # With --blocks the design spans every searched weight (k x groups columns), at the budget
        # of one weight per LoRA, so the examples cost what they do without blocks.
        cfg = self.cfg
        budget = cfg.fewshot_budget if cfg.fewshot_budget is not None else fewshot.default_budget(len(cfg.loras))
        return fewshot.design(len(cfg.dims), cfg.fewshot_levels, budget)

    def _score_grid(self):
        cfg = self.cfg
        vectors = self._design()
        paths = self.render_many([events.grid(i) for i in range(len(vectors))], "grid", vectors)
        images = {p: self.steps.image(p) for p in paths}
        scorer = self.steps.scorer
        # Each image is embedded once and compared with the prompt and every LoRA's trigger words.
        cosines = (scorer.image_embeddings([images[p] for p in paths])
                   @ scorer.text_embeddings(self._score_texts()).T).tolist()
        scored = [fewshot.Scored(w, row[0], tuple(row[1:]), paths[i]) for i, (w, row) in enumerate(zip(vectors, cosines))]
        return fewshot.select(scored, cfg.fewshot_threshold, cfg.fewshot_keep), scored, images

    def _score_texts(self) -> list[str]:
        return [self._prompt, *(lo.triggers or lo.name for lo in self.cfg.loras)]

    # ------------------------------------------------------------ the steps, with this run's settings

    def job(self, weights: Weights) -> RenderJob:
        """The render of a searched vector (with --blocks: each LoRA's group weights as its lbw vector)."""
        cfg = self.cfg
        rendered, blocks = self._expand(weights)
        return RenderJob(prompt=self._prompt, loras=cfg.loras, weights=rendered, method=cfg.method,
                         sampling=cfg.sampling, blocks=blocks)

    def _expand(self, weights):
        return self.cfg.render_args(weights, self.steps.renderer.profile.diffusion.arch)

    def render(self, step: str, role: events.Role, weights: Weights, iteration: int | None = None) -> str:
        return self.render_many([step], role, [weights], iteration)[0]

    def render_many(self, steps: list[str], role: events.Role, vectors: list[Weights],
                    iteration: int | None = None, origins: list[str] | None = None) -> list[str]:
        """Several weight vectors of this run's job, batched where the method allows."""
        return self.steps.render_many(steps, role, self.job(vectors[0]), vectors, self.cfg.dims, iteration, origins,
                                      self._expand if self.cfg.blocks else None)

    def ask(self, step: str, kind: str, images: list[str], text: str, schema: schemas.Schema,
            temperature: float | None = None) -> Any:
        # Each step samples with its own seed, so a resumed run asks exactly what the first asked.
        seed = self.cfg.seed * 7919 + zlib.crc32(step.encode()) % 7919
        return self.steps.ask(step, kind, self._template("system", None), images, text, schema,
                              temperature if temperature is not None else self.cfg.temperature, seed)

    # ------------------------------------------------------------ text

    def _template(self, name: str, schema: schemas.Schema | None, **fields: str) -> str:
        """prompts/NAME.txt filled in; {answer_format} shows the shape the grammar will enforce."""
        assert set(fields) == set(TEMPLATES[name]), f"{name}: fields {sorted(fields)} != TEMPLATES"
        lo, hi = self.cfg.bounds
        base = {"prompt": self._prompt, "loras": self._loras_text(), "lo": f"{lo:.2f}", "hi": f"{hi:.2f}",
                "answer_format": schema.describe() if schema is not None else ""}
        override = Path(self.cfg.prompts_dir) if self.cfg.prompts_dir else None
        return prompts.render(name, override, **base, **fields)

    def _loras_text(self) -> str:
        lines = [f"{i}. {lo.name} ({lo.category or 'unknown category'}): {lo.triggers or '-'}"
                 for i, lo in enumerate(self.cfg.loras, 1)]
        if self.cfg.blocks:
            from localora.diffusion.blocks import GROUP_HINTS

            # The {loras} field reaches every template, so Generate, Feedback and Refine all learn
            # what NAME.GROUP weighs, custom templates included.
            lines.append("Each LoRA has one weight per block group of the image model, written NAME.GROUP: "
                         + "; ".join(f"{g} ({GROUP_HINTS[g]})" for g in self.cfg.blocks) + ".")
        return "\n".join(lines)

    def _fmt(self, weights: Weights) -> str:
        return ", ".join(f"{n}={w:.2f}" for n, w in zip(self.cfg.dims, weights))

    def _list(self, vectors: list[Weights], label: str = "candidate") -> str:
        return "\n".join(f"Picture {i}: {label} {i}, weights {self._fmt(w)}" for i, w in enumerate(vectors, 1))


def check(cfg: ComposeConfig) -> None:
    """The registry's check (localora.search.STRATEGIES["vlm"]): run before the run folder is made."""
    check_templates(cfg.prompts_dir)
    if cfg.final_judge:
        from localora.scoring.judge import check_templates as check_judge

        check_judge(Path(cfg.prompts_dir) if cfg.prompts_dir else None)


def run(cfg: ComposeConfig, steps: Steps) -> Final:
    """The registry's entry point (localora.search.STRATEGIES["vlm"])."""
    return GPT4LoRA(cfg, steps).compose()
