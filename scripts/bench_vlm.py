"""Constrained vs unconstrained decoding speed and grammar compile time on the tiny VLM; and the
vision reuse, with / without, per VLM family.

    python scripts/bench_vlm.py [--runs 10]
    python scripts/bench_vlm.py --reuse [--vlms tiny-qwen2-vl,tiny-qwen2.5-vl,tiny-qwen3-vl,tiny-gemma-3]
                                [--profile tiny] [--runs 5] [--out bench_vlm.json]

For each schema: the grammar's compile time (a fresh compiler, no cache), then `runs` sampled
answers under the grammar interleaved with the same number of unconstrained answers given the
same token count, so both sides see the same machine noise. tokens/s = new tokens / generate
time (prefill included on both sides). Target: constrained >= 0.8x unconstrained.

--reuse: per VLM, one compose round's calls (Generate: the current image and each LoRA's
reference; Feedback and Refine: the candidates and the references, as the loop shows them) and
one judged pair (both orders, the real judge), each run `runs` times with the vision features
reused (VLM's default) and with every image encoded anew (vision_cache=0), interleaved. Prints
seconds per workload side by side and their ratio (with / without; below 1.0 where images
repeat), the images shown and encoded, and the prompt / new tokens per call; writes the same
numbers as JSON to --out. The tiny models' vision towers are small, so their ratio is close to
1; on a real model (--profile sdxl-realistic --vlms qwen2.5-vl-7b) an image costs far more.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--reuse", action="store_true", help="measure the vision reuse per VLM family instead")
    parser.add_argument("--vlms", default="tiny-qwen2-vl,tiny-qwen2.5-vl,tiny-qwen3-vl,tiny-gemma-3")
    parser.add_argument("--out", default="bench_vlm.json")
    args = parser.parse_args()
    os.environ.setdefault("LOCALORA_HOME", tempfile.mkdtemp(prefix="localora-bench-"))
    if args.reuse:
        reuse(args)
        return

    import torch
    import xgrammar as xgr
    from PIL import Image
    from transformers.utils import logging as hf_logging

    from localora import profiles
    from localora.vlm import schemas
    from localora.vlm.model import VLM

    hf_logging.disable_progress_bar()
    vlm = VLM(profiles.load_profile(args.profile).vlm)
    images = [Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")]
    cases = {
        "weights(3)": schemas.weights(["character", "clothing", "style"]),
        "weights(5, -1..1)": schemas.weights([f"lora_{i}" for i in range(5)], -1.0, 1.0),
        "candidates(3x5)": schemas.candidates(["character", "clothing", "style"], 5),
        "choice(5)": schemas.choice(5),
        "judge_scores": schemas.judge_scores(),
        "feedback(200)": schemas.feedback(200),
        "refine(3, 200)": schemas.refine(["character", "clothing", "style"], max_chars=200),
    }
    vlm.chat(None, images, "warm up", schema=cases["weights(3)"], temperature=1.0)
    vlm.chat(None, images, "warm up", max_new_tokens=32)

    print(f"tiny VLM on {vlm.model.device} (torch {torch.__version__}, {torch.get_num_threads()} threads), "
          f"{args.runs} sampled answers per schema")
    print(f"{'schema':<20}{'compile ms':>11}{'tokens':>8}{'constrained tok/s':>19}{'free tok/s':>12}{'ratio':>7}")
    sums = [0, 0.0, 0, 0.0]  # constrained tokens, seconds; unconstrained tokens, seconds
    for name, schema in cases.items():
        info = vlm.compiled(schema).tokenizer_info  # the backend's cached copy, outside the timings
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        start = time.perf_counter()
        compiler.compile_grammar(schema.grammar)
        compile_ms = (time.perf_counter() - start) * 1000

        tokens = free_tokens = 0
        secs_c = secs_f = 0.0
        for seed in range(args.runs):
            a = vlm.chat(None, images, "Answer.", schema=schema, temperature=1.0, seed=seed)
            f = vlm.chat(None, images, "Answer.", temperature=1.0, seed=seed, max_new_tokens=a.new_tokens)
            tokens += a.new_tokens
            free_tokens += f.new_tokens
            secs_c += a.seconds
            secs_f += f.seconds
        rate_c, rate_f = tokens / secs_c, free_tokens / secs_f
        for i, x in enumerate((tokens, secs_c, free_tokens, secs_f)):
            sums[i] += x
        print(f"{name:<20}{compile_ms:>11.1f}{tokens:>8}{rate_c:>19.0f}{rate_f:>12.0f}{rate_c / rate_f:>7.2f}")
    rate_c, rate_f = sums[0] / sums[1], sums[2] / sums[3]
    print(f"{'all':<20}{'':>11}{sums[0]:>8}{rate_c:>19.0f}{rate_f:>12.0f}{rate_c / rate_f:>7.2f}   (target >= 0.80)")


def _pictures(n: int, size: tuple[int, int], seed: int) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _round_calls(current, references, candidates) -> list[tuple[str, list]]:
    """One GPT4LoRA round's VLM calls and the pictures each shows (search/gpt4lora.py's order)."""
    return [("generate", [current, *references]),
            ("feedback", [*candidates, *references]),
            ("refine", [*candidates, current, *references])]


def reuse(args) -> None:
    import json
    import time

    import torch
    from transformers.utils import logging as hf_logging

    from localora import profiles
    from localora.scoring import judge
    from localora.vlm import schemas
    from localora.vlm.model import VLM

    hf_logging.disable_progress_bar()
    catalog = profiles.load_catalog()
    profile = catalog.get(args.profile)
    size = (profile.diffusion.width, profile.diffusion.height)
    current, *references = _pictures(3, size, 0)  # the current image, two LoRAs' references
    candidates = _pictures(2, size, 1)
    pair = _pictures(2, size, 2)
    elements = [judge.parse_element("character (Hero): hero, red hair"), judge.parse_element("style (Ink): ink")]
    schema = schemas.weights(["character", "style"])
    report = {"profile": profile.name, "runs": args.runs, "torch_threads": torch.get_num_threads(), "vlms": {}}
    print(f"vision reuse: {args.runs} runs per side, interleaved; seconds per workload (median)")
    print(f"{'vlm':<18}{'family':<12}{'workload':<14}{'with s':>9}{'without s':>11}{'ratio':>7}"
          f"{'shown':>7}{'encoded':>9}{'prompt tok/call':>17}{'new tok/call':>14}")
    for name in args.vlms.split(","):
        spec = catalog.vlm(name)
        sides = {"with": VLM(spec), "without": VLM(spec, vision_cache=0)}

        def compose_round(vlm):
            return [vlm.chat(None, images, f"{step}: propose weights.\n{schema.describe()}", schema=schema)
                    for step, images in _round_calls(current, references, candidates)]

        def judged_pair(vlm):
            answers = []

            class Recorder:  # the judge's own calls, their token counts kept
                def chat(self, *a, **k):
                    answers.append(vlm.chat(*a, **k))
                    return answers[-1]

            judge.judge_pair(Recorder(), pair[0], pair[1], elements)
            return answers

        workloads = {"compose round": compose_round, "judged pair": judged_pair}
        for vlm in sides.values():  # load, compile the grammars: outside the timings
            for work in workloads.values():
                work(vlm)
        entry = {"family": sides["with"].family.name, "workloads": {}}
        for label, work in workloads.items():
            seconds = {"with": [], "without": []}
            cache = sides["with"].vision
            shown_before, encoded_before = cache.hits + cache.misses, cache.misses
            for _ in range(args.runs):
                cache.clear()  # each run starts cold: reuse counts only within the workload
                for side, vlm in sides.items():
                    start = time.perf_counter()
                    answers = work(vlm)
                    seconds[side].append(time.perf_counter() - start)
            shown = (cache.hits + cache.misses - shown_before) // args.runs
            encoded = (cache.misses - encoded_before) // args.runs
            med = {k: sorted(v)[len(v) // 2] for k, v in seconds.items()}
            ratio = med["with"] / med["without"]
            prompt_tokens = sum(a.prompt_tokens for a in answers) / len(answers)
            new_tokens = sum(a.new_tokens for a in answers) / len(answers)
            entry["workloads"][label] = {"seconds_with": med["with"], "seconds_without": med["without"],
                                         "ratio": ratio, "calls": len(answers), "images_shown": shown,
                                         "images_encoded": encoded, "prompt_tokens_per_call": prompt_tokens,
                                         "new_tokens_per_call": new_tokens}
            print(f"{name:<18}{entry['family']:<12}{label:<14}{med['with']:>9.3f}{med['without']:>11.3f}{ratio:>7.2f}"
                  f"{shown:>7}{encoded:>9}{prompt_tokens:>17.0f}{new_tokens:>14.1f}")
        report["vlms"][name] = entry
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
