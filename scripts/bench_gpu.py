"""Seconds and peak accelerator memory of each stage of one compose round, as JSON for a bug report.

    python scripts/bench_gpu.py [--profile sdxl-realistic] [--lora A --lora B ...] [--out bench_gpu.json]
    python scripts/bench_gpu.py --random-fullsize [--quick | --smoke] [--vram 12|16|24] [--vlm NAME]

Runs one real compose round (references, few-shot, generate, candidates, scores, feedback,
refine, refined render) through the same code as `localora compose`, on a real profile when a
GPU is present (default `tiny` without one, or when no --lora is given). Every model load or move
and every step is a stage: its wall seconds, and on CUDA the peak memory allocated during it
(torch.cuda.max_memory_allocated, reset after each stage) and the memory held after it.

--random-fullsize needs no downloaded weights: the profile's full-size models are built from the
configs shipped in the repository with random weights (scripts/fullsize_random.py: SDXL fp16 on a
GPU, bf16 on a CPU; the VLM quantized nf4 at load where bitsandbytes can; CLIP-L), then one compose
with Merge and one with Composite (N rounds, M candidates, 3 LoRAs of rank 32) and one judged pair
of their finals. Per stage: seconds, renders, VLM calls and tokens, model loads and moves (bytes,
seconds), peak memory; per model its bytes; JSON (--out) and a short table.
    default   N=5, M=3, the profile's steps at its size (1024x1024)
    --quick   N=2, M=2, 10 steps
    --smoke   N=1, M=2, 1 step at 64x64 with Qwen2-VL-2B: the same code path, for a CPU
              (tests/test_bench_gpu.py, marker fullsize)
--vram GB caps the process's accelerator memory (set_per_process_memory_fraction, and
$LOCALORA_VRAM_GB for the placement): what `auto` does on that card; a run that does not fit ends
with "fits": false and what to change, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Recorder:
    """A UI for the run that times every event and model change and reads the memory peaks."""

    def __init__(self, torch):
        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.stages: list[dict] = []
        self.last = time.perf_counter()

    def _stage(self, name: str) -> None:
        now = time.perf_counter()
        row = {"stage": name, "seconds": round(now - self.last, 3)}
        if self.cuda:
            row["peak_gib"] = round(self.torch.cuda.max_memory_allocated() / 2**30, 3)
            row["held_gib"] = round(self.torch.cuda.memory_allocated() / 2**30, 3)
            self.torch.cuda.reset_peak_memory_stats()
        self.stages.append(row)
        self.last = now

    def event(self, event: dict) -> None:
        if "id" in event:
            self._stage(f"{event['type']} {event['id']}")

    def placement(self, p) -> None:
        if p.done:
            self._stage(f"model {p.component} {p.action}")

    def step(self, i: int, total: int) -> None:
        pass


def main() -> None:
    if "--random-fullsize" in sys.argv:
        import bench_fullsize

        return bench_fullsize.main(sys.argv[1:])
    main_profile()


def main_profile() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-fullsize", action="store_true",
                        help="Full-size models with random weights, no hub (see the docstring).")
    parser.add_argument("--profile", default=None, help="Default: sdxl-realistic with a GPU and --lora, else tiny.")
    parser.add_argument("--lora", action="append", default=[], help="A LoRA (name or path); at least two.")
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--out", default="bench_gpu.json")
    args = parser.parse_args()
    os.environ.setdefault("LOCALORA_HOME", tempfile.mkdtemp(prefix="localora-gpu-"))

    import torch

    from localora import package_version
    from localora.cli.options import resolve_loras
    from localora.profiles import load_profile
    from localora.runs import session
    from localora.search.config import ComposeConfig

    real = torch.cuda.is_available() and len(args.lora) >= 2
    profile = load_profile(args.profile or ("sdxl-realistic" if real else "tiny"))
    specs = args.lora if len(args.lora) >= 2 else ["demo-character", "demo-clothing", "demo-style"]
    loras = tuple(c.lora for c in resolve_loras(profile, tuple(specs), ()))
    cfg = ComposeConfig(prompt="a portrait of a girl in a garden", loras=loras, iterations=1,
                        candidates=args.candidates, fewshot_threshold=profile.clip.fewshot_threshold)
    run = session.start(cfg, profile, Path(tempfile.mkdtemp(prefix="localora-gpu-run-")) / "run")
    recorder = Recorder(torch)
    if recorder.cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    session.compose(cfg, profile, run, recorder)
    report = {
        "profile": profile.name, "device": torch.cuda.get_device_name() if recorder.cuda else platform.processor() or "cpu",
        "placement": profile.placement, "loras": [lo.name for lo in loras], "candidates": args.candidates,
        "total_seconds": round(time.perf_counter() - start, 3),
        "max_peak_gib": max((s.get("peak_gib", 0.0) for s in recorder.stages), default=0.0),
        "versions": {p: package_version(p) for p in ("localora", "torch", "diffusers", "transformers", "peft",
                                                      "bitsandbytes")},
        "stages": recorder.stages, "run_folder": str(run.path),
    }
    text = json.dumps(report, indent=1)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
