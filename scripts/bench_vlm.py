"""Constrained vs unconstrained decoding speed, and grammar compile time, on the tiny VLM.

    python scripts/bench_vlm.py [--runs 10]

For each schema: the grammar's compile time (a fresh compiler, no cache), then `runs` sampled
answers under the grammar interleaved with the same number of unconstrained answers given the
same token count, so both sides see the same machine noise. tokens/s = new tokens / generate
time (prefill included on both sides). Target: constrained >= 0.8x unconstrained.
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
    args = parser.parse_args()
    os.environ.setdefault("LOCALORA_HOME", tempfile.mkdtemp(prefix="localora-bench-"))

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


if __name__ == "__main__":
    main()
