"""Synchronous against background writing of render-cache PNGs, side by side in one process
(a benchmark, not a test).

    python scripts/bench_png_writer.py [--profile tiny] [--size 256] [--steps 2] [--candidates 4]
                                       [--rounds 3] [--repeats 2] [--method merge] [--out DIR]

A compose-like sequence: --rounds calls of render_many with --candidates weight vectors each,
every image then copied into a run folder (which waits for its cache file, as a run does), from
an empty render cache. Once with LOCALORA_SYNC_WRITES' path (each PNG encoded and written before
the next denoise), once with the background writer; the two alternate over --repeats, and the
median wall time of each is kept. Also: the time of one PNG encode + write alone, and whether the
two modes' files are byte for byte the same.

Prints the ratio (background / synchronous: below 1 is faster) and writes DIR/bench_png_writer.json.
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--size", type=int, default=256, help="width and height (PNG encoding grows with it)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--method", default="merge",
                        help="merge batches a round's candidates (their writes overlap the next round's batch); "
                             "composite renders one at a time (each write overlaps the next render)")
    parser.add_argument("--out", default=".", help="folder of bench_png_writer.json")
    args = parser.parse_args()
    os.environ.setdefault("LOCALORA_HOME", tempfile.mkdtemp(prefix="localora-bench-"))

    from localora import tiny
    from localora.diffusion import loras, render
    from localora.diffusion.render import Renderer, RenderJob
    from localora.diffusion.sampling import Sampling
    from localora.profiles import load_profile
    from localora.runs.folder import RunFolder

    profile = load_profile(args.profile)
    scratch = Path(tempfile.mkdtemp(prefix="bench-png-writer-"))
    base = Renderer(profile, cache_dir=scratch / "warm")
    demo = list(loras.read_catalog(tiny.ensure(f"loras-{profile.diffusion.arch}") / "catalog.toml").values())
    n = len(demo)

    def job(seed: int) -> RenderJob:
        return RenderJob("a portrait of a girl in a garden", tuple(demo), (1.0,) * n, args.method,
                         Sampling(seed=seed, steps=args.steps, width=args.size, height=args.size))

    vectors = [[0.3 + 0.2 * ((i + j) % 4) for j in range(n)] for i in range(args.candidates)]

    def sequence(sync: bool, where: Path) -> tuple[float, list[bytes]]:
        """Wall time of the whole sequence, and the run folder's files in order."""
        renderer = Renderer(profile, devices=base.devices, cache_dir=where / "cache", sync_writes=sync)
        run = RunFolder.create(where / "run", {"bench": "png_writer"})
        start = time.perf_counter()
        rels = []
        with renderer:
            for r in range(args.rounds):
                outs = renderer.render_many(job(100 + r), vectors)
                rels += [run.save_image(out) for out in outs]  # waits for each cache file, as a run does
        seconds = time.perf_counter() - start
        run.close()
        return seconds, [(where / "run" / rel).read_bytes() for rel in rels]

    sequence(True, scratch / "warm-up")  # model load and first-render costs out of the timings
    times: dict[str, list[float]] = {"sync": [], "background": []}
    files: dict[str, list[bytes]] = {}
    for repeat in range(args.repeats):
        order = ("sync", "background") if repeat % 2 == 0 else ("background", "sync")
        for mode in order:
            seconds, files[mode] = sequence(mode == "sync", scratch / f"{mode}-{repeat}")
            times[mode].append(seconds)

    # One encode + write alone: the share of a render the writer takes off the denoising path.
    one = base.render(job(999))
    info = base.info(base.resolve(job(999)))
    start = time.perf_counter()
    for _ in range(5):
        data = render.encode_png(one.image, info)
        (scratch / "one.png").write_bytes(data)
    encode = (time.perf_counter() - start) / 5
    base.close()

    renders = args.rounds * args.candidates
    sync, background = statistics.median(times["sync"]), statistics.median(times["background"])
    report = {
        "profile": profile.name, "size": args.size, "steps": args.steps, "method": args.method,
        "renders_per_sequence": renders, "repeats": args.repeats,
        "seconds_sync": times["sync"], "seconds_background": times["background"],
        "median_sync": round(sync, 4), "median_background": round(background, 4),
        "ratio_background_over_sync": round(background / sync, 4),
        "encode_write_seconds_per_image": round(encode, 4),
        "encode_share_of_sync": round(encode * renders / sync, 4),
        "png_bytes_per_image": len(data),
        "files_identical": files["sync"] == files["background"],
    }
    print(f"{renders} renders of {args.size}x{args.size} ({args.method}, {args.steps} steps), "
          f"median of {args.repeats}:")
    print(f"  synchronous writes   {sync:8.3f} s")
    print(f"  background writer    {background:8.3f} s   ratio {background / sync:.3f} (below 1 is faster)")
    print(f"  one PNG encode+write {encode * 1000:8.1f} ms   ({report['encode_share_of_sync']:.1%} of the "
          f"synchronous sequence)")
    print(f"  run-folder files byte-identical: {report['files_identical']}")
    out = Path(args.out) / "bench_png_writer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
