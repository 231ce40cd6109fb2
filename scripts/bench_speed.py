"""Where a compose run's time goes, measured side by side in one process (a benchmark, not a test).

    python scripts/bench_speed.py [--profile tiny] [--repeats 5] [--out bench_speed.json] [--no-run]

1. Composite: the batched loop (all LoRAs x [uncond, cond] in one UNet batch per step) against
   the paper's loop (one UNet pass per LoRA, set_adapters before each), interleaved, median time.
2. Merge candidates: M weight vectors in one batch (merge_many) against M single renders.
3. set_adapters calls per render of each.
4. Cached Composite (CMLoRA, --cache-interval 2 and 3) against Composite, interleaved, median time,
   with the single-LoRA passes each schedule runs.
5. One compose run (2 rounds x 3 candidates, few-shot on): renders denoised, renders recalled
   from the cache, and loads / moves per model, counted from its events.jsonl.

Prints ratios (batched time / one-at-a-time time: below 1 is faster) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def count_set_adapters(pipe, fn) -> int:
    calls = 0
    owners = [type(pipe), type(pipe.unet)]
    originals = [o.set_adapters for o in owners]

    def counting(original):
        def wrapper(self, *a, **k):
            nonlocal calls
            calls += 1
            return original(self, *a, **k)
        return wrapper

    for owner, original in zip(owners, originals):
        owner.set_adapters = counting(original)
    try:
        fn()
    finally:
        for owner, original in zip(owners, originals):
            owner.set_adapters = original
    return calls


def compose_run(profile: str) -> dict:
    from click.testing import CliRunner

    from localora.cli import main

    out = Path(tempfile.mkdtemp(prefix="localora-speed-")) / "run"
    result = CliRunner().invoke(main, ["compose", "a portrait of a girl in a garden", "-p", profile,
                                       "-l", "demo-character", "-l", "demo-clothing", "-l", "demo-style",
                                       "-n", "2", "-c", "3", "--plain", "--out", str(out)])
    if result.exit_code != 0:
        raise SystemExit(result.output)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    renders = [e for e in events if e["type"] == "render"]
    model = Counter(f"{e['model']} {e['action']}" for e in events if e["type"] == "model")
    return {"renders_denoised": sum(not e["cached"] for e in renders), "renders_recalled": sum(e["cached"] for e in renders),
            "fewshot_renders": sum(e["role"] == "grid" for e in renders), "model_actions": dict(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--out", default="bench_speed.json")
    parser.add_argument("--no-run", action="store_true", help="Skip the compose run (section 4).")
    args = parser.parse_args()
    os.environ.setdefault("LOCALORA_HOME", tempfile.mkdtemp(prefix="localora-bench-"))

    import torch

    from localora import tiny
    from localora.diffusion import loras, methods
    from localora.diffusion.render import Renderer
    from localora.diffusion.sampling import Sampling
    from localora.profiles import load_profile

    profile = load_profile(args.profile)
    renderer = Renderer(profile)
    demo = list(loras.read_catalog(tiny.ensure(f"loras-{profile.diffusion.arch}") / "catalog.toml").values())
    names = renderer.adapters_for(demo)
    pipe = renderer.pipeline()
    s = Sampling(seed=0).resolved(profile.diffusion)
    prompt, weights = "a portrait of a girl in a garden", [1.0, 0.7, 0.9]
    vectors = [[0.4 + 0.3 * ((i + j) % 3) for j in range(len(names))] for i in range(args.candidates)]

    with torch.no_grad():
        methods.composite(pipe, names, weights, prompt, s)  # warm-up of both paths
        methods.composite_per_lora(pipe, names, weights, prompt, s)
        from dataclasses import replace

        from localora.diffusion import cmlora

        cached = {c: replace(s, cache_interval=c) for c in (2, 3)}
        for c in cached.values():
            cmlora.cmlora(pipe, names, weights, prompt, c)  # warm-up, and the frequency order drawn once
        comp = {"batched": [], "per_lora": []}
        cm = {f"cache_{c}": [] for c in cached}
        merge = {"batched": [], "single": []}
        for _ in range(args.repeats):  # interleaved, so both sides see the same machine noise
            comp["batched"].append(timed(lambda: methods.composite(pipe, names, weights, prompt, s)))
            comp["per_lora"].append(timed(lambda: methods.composite_per_lora(pipe, names, weights, prompt, s)))
            merge["batched"].append(timed(lambda: methods.merge_many(pipe, names, vectors, prompt, s)))
            merge["single"].append(timed(lambda: [methods.merge(pipe, names, v, prompt, s) for v in vectors]))
            for c, sc in cached.items():
                cm[f"cache_{c}"].append(timed(lambda: cmlora.cmlora(pipe, names, weights, prompt, sc)))
        calls = {
            "composite_batched": count_set_adapters(pipe, lambda: methods.composite(pipe, names, weights, prompt, s)),
            "composite_per_lora": count_set_adapters(pipe, lambda: methods.composite_per_lora(pipe, names, weights, prompt, s)),
            "merge_batched_per_image": count_set_adapters(
                pipe, lambda: methods.merge_many(pipe, names, vectors, prompt, s)) / len(vectors),
            "merge_single_per_image": count_set_adapters(pipe, lambda: methods.merge(pipe, names, vectors[0], prompt, s)),
        }
    med = {k: {side: statistics.median(v) for side, v in d.items()}
           for k, d in (("composite", comp), ("merge", merge), ("cmlora", cm))}
    report = {
        "profile": args.profile, "device": str(renderer.devices.device), "loras": len(names), "steps": s.steps,
        "size": f"{s.width}x{s.height}", "repeats": args.repeats, "candidates": len(vectors),
        "seconds_median": med,
        "ratio_composite_batched_over_per_lora": med["composite"]["batched"] / med["composite"]["per_lora"],
        "ratio_merge_batched_over_single": med["merge"]["batched"] / med["merge"]["single"],
        "ratio_cmlora_over_composite": {f"cache_{c}": med["cmlora"][f"cache_{c}"] / med["composite"]["batched"]
                                        for c in cached},
        "cmlora_passes_over_composite": {f"cache_{c}": cmlora.passes(s.steps, len(names), c) / (s.steps * len(names))
                                         for c in cached},
        "set_adapters_calls_per_render": calls,
        "torch_threads": torch.get_num_threads(),
    }
    if not args.no_run:
        report["compose_run"] = compose_run(args.profile)
    print(json.dumps(report, indent=1))
    print(f"composite batched / per-LoRA: {report['ratio_composite_batched_over_per_lora']:.2f}x time; "
          f"merge of {len(vectors)} batched / single: {report['ratio_merge_batched_over_single']:.2f}x time; "
          + "; ".join(f"cached composite (interval {c}) / composite: {report['ratio_cmlora_over_composite'][f'cache_{c}']:.2f}x "
                      f"time, {report['cmlora_passes_over_composite'][f'cache_{c}']:.2f}x passes" for c in cached),
          file=sys.stderr)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
