"""--compile against eager, side by side in one process (a benchmark, not a test).

    python scripts/bench_compile.py [--profile tiny] [--sizes 64,128] [--steps 4] [--repeats 3]
                                    [--out bench_compile.json]

For each size: one eager Renderer and one with compile=True (each its own pipeline), the same
Merge job rendered `repeats` + 1 times under other weights (the first is the warm-up: eager's
first call, compiled's trace and compile), then one Composite. Prints per size: warm-up seconds
(RenderStats.compile_seconds, and the first render's wall time), steady-state seconds per Merge
render (median of the rest), compiled / eager ratio (below 1: compile is faster), compiles
counted (the first and each recompile), and the largest pixel difference to eager; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--sizes", default="64,128")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench_compile.json")
    args = ap.parse_args()

    import numpy as np
    import torch

    from localora import tiny
    from localora.diffusion import loras
    from localora.diffusion.job import RenderJob
    from localora.diffusion.render import Renderer
    from localora.diffusion.sampling import Sampling
    from localora.profiles import load_profile

    profile = load_profile(args.profile)
    demo = tuple(loras.read_catalog(tiny.ensure(f"loras-{profile.diffusion.arch}") / "catalog.toml").values())
    vectors = [tuple(0.3 + 0.2 * ((i + j) % 4) for j in range(len(demo))) for i in range(args.repeats + 1)]
    rows = []
    for size in (int(x) for x in args.sizes.split(",")):
        s = Sampling(seed=0, steps=args.steps, width=size, height=size)
        row: dict = {"size": f"{size}x{size}", "steps": args.steps, "loras": len(demo)}
        images = {}
        for side in ("eager", "compiled"):
            r = Renderer(profile, cache_dir=Path(tempfile.mkdtemp()), compile=side == "compiled")
            r.adapters_for(demo)  # the load is not the warm-up
            times, pics = [], []
            for w in vectors:
                start = time.perf_counter()
                out = r.render(RenderJob(prompt="a girl in a garden", loras=demo, weights=w, method="merge", sampling=s))
                times.append((time.perf_counter() - start, out.seconds))
                pics.append(np.asarray(out.image, dtype=np.int16))
            start = time.perf_counter()
            comp = r.render(RenderJob(prompt="a girl in a garden", loras=demo, weights=vectors[0], method="composite",
                                      sampling=s))
            row[side] = {"first_render_wall_s": round(times[0][0], 3), "warmup_s": round(r.stats.compile_seconds, 3),
                         "compiles": r.stats.compiles,
                         "merge_steady_s": round(statistics.median(t for _, t in times[1:]), 4),
                         "composite_wall_s": round(time.perf_counter() - start, 3),
                         "composite_render_s": round(comp.seconds, 4)}
            images[side] = pics + [np.asarray(comp.image, dtype=np.int16)]
            del r
            torch._dynamo.reset()  # the next size starts cold, as a new process would (bar inductor's disk cache)
        row["ratio_merge_compiled_over_eager"] = round(row["compiled"]["merge_steady_s"] / row["eager"]["merge_steady_s"], 3)
        row["ratio_composite_compiled_over_eager"] = round(
            row["compiled"]["composite_render_s"] / row["eager"]["composite_render_s"], 3)
        row["max_pixel_diff"] = int(max(np.abs(a - b).max() for a, b in zip(images["eager"], images["compiled"])))
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"profile": args.profile, "device": "cpu" if not torch.cuda.is_available() else "cuda",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{'size':>9} {'warm-up s':>10} {'compiles':>8} {'eager s/render':>15} {'compiled s/render':>18} "
          f"{'ratio':>6} {'composite ratio':>16} {'max px diff':>11}")
    for row in rows:
        print(f"{row['size']:>9} {row['compiled']['warmup_s']:>10.1f} {row['compiled']['compiles']:>8} "
              f"{row['eager']['merge_steady_s']:>15.3f} {row['compiled']['merge_steady_s']:>18.3f} "
              f"{row['ratio_merge_compiled_over_eager']:>6.2f} {row['ratio_composite_compiled_over_eager']:>16.2f} "
              f"{row['max_pixel_diff']:>11}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
