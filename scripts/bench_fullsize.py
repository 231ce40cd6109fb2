"""`bench_gpu.py --random-fullsize`: one compose with Merge and one with Composite and one judged
pair on full-size models with random weights (scripts/fullsize_random.py), per stage.

    build      the models written as local folders (not part of any run's cost)
    merge      session.compose, method merge     } the models are loaded once (session.components)
    composite  session.compose, method composite } and shared, as `localora batch` shares them
    judge      scoring.judge.judge_pair on the two finals (both orders: two VLM calls)

Each stage: seconds, renders (new and cached), VLM calls, prompt and new tokens, every model load
or move (component, action, bytes, seconds), and the peak memory: on CUDA
torch.cuda.max_memory_allocated during the stage, on a CPU the process's peak RSS so far. Per
model: its bytes as placed (4-bit weights at 4 bits). JSON to --out, and a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ADVICE = ("does not fit in {gb} GB: try a smaller VLM (--vlm qwen2-vl-2b or a -small profile), "
          "8-bit or 4-bit weights for the VLM, or placement swap (models take turns on the card); "
          "`localora doctor --profile {profile} --vram {gb}` shows the plan")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_gpu.py --random-fullsize", description=__doc__.splitlines()[0])
    p.add_argument("--random-fullsize", action="store_true")
    p.add_argument("--profile", default="sdxl-realistic")
    p.add_argument("--vlm", default=None, help="A [vlm.NAME] of models.toml instead of the profile's.")
    p.add_argument("--smoke", action="store_true", help="64x64, 1 step, N=1, M=2, Qwen2-VL-2B (for a CPU).")
    p.add_argument("--quick", action="store_true", help="N=2, M=2, 10 steps.")
    p.add_argument("--vram", type=caps, default=[], help="Cap accelerator memory at this many GB (12, 16, 24); "
                   "several (24,12): one run per cap, each in its own process, on models built once.")
    p.add_argument("--models", default=None, help="Folder for the random models (default: a temporary one).")
    p.add_argument("--out", default="bench_gpu.json")
    return p.parse_args(argv)


def caps(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--vram {text}: GB as numbers, e.g. 24 or 24,12") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--vram {text}: GB as positive numbers, e.g. 24 or 24,12")
    return values


def commit() -> str | None:
    """The localora commit the numbers belong to (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def matrix(argv: list[str], args: argparse.Namespace) -> None:
    """--vram A,B,...: this script once per cap, in a process of its own (a cap is per process, and
    each run starts from an empty card), on the models the first one builds; one JSON of them all."""
    folder = Path(args.models or tempfile.mkdtemp(prefix="localora-fullsize-models-"))
    rest, skip = [], False
    for a in argv:  # the arguments without --vram/--models/--out, which each run gets its own of
        if skip:
            skip = False
        elif a in ("--vram", "--models", "--out"):
            skip = True
        elif not a.startswith(("--vram=", "--models=", "--out=")):
            rest.append(a)
    runs, code = [], 0
    for cap in args.vram:
        out = folder / f"bench-{cap:g}gb.json"
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "bench_gpu.py"), *rest,
                               "--vram", f"{cap:g}", "--models", str(folder), "--out", str(out)],
                              stdout=subprocess.DEVNULL)
        code = code or proc.returncode
        runs.append(json.loads(out.read_text()) if out.is_file() else {"vram_cap_gb": cap, "fits": False,
                                                                         "error": f"exit {proc.returncode}"})
    report = {"commit": commit(), "caps_gb": args.vram, "runs": runs,
              "total_seconds": round(sum(r.get("total_seconds", 0) for r in runs), 3)}
    text = json.dumps(report, indent=1)
    Path(args.out).write_text(text + "\n")
    print(text)
    sys.exit(code)


class Meter:
    """The UI of the runs: counts model moves; stages are cut by `stage()`."""

    def __init__(self, torch, vlm_counter: dict):
        self.torch, self.cuda = torch, torch.cuda.is_available()
        self.moves: list[dict] = []
        self.models: dict[str, int] = {}
        self.vlm = vlm_counter

    def event(self, event: dict) -> None:
        pass

    def step(self, i: int, total: int) -> None:
        pass

    def placement(self, p) -> None:
        if p.done:
            self.moves.append({"model": p.component, "action": p.action, "bytes": int(p.bytes),
                               "seconds": round(p.seconds, 3)})
            self.models[p.component] = max(self.models.get(p.component, 0), int(p.bytes))

    def peak(self) -> float:
        if self.cuda:
            return round(self.torch.cuda.max_memory_allocated() / 2**30, 3)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB on Linux

    def begin(self, renderer) -> dict:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        return {"t": time.perf_counter(), "moves": len(self.moves), "renders": renderer.stats.renders,
                "hits": renderer.stats.hits, "vlm": dict(self.vlm)}

    def end(self, name: str, mark: dict, renderer) -> dict:
        moves = self.moves[mark["moves"]:]
        return {"stage": name, "seconds": round(time.perf_counter() - mark["t"], 3),
                "renders": renderer.stats.renders - mark["renders"], "cached": renderer.stats.hits - mark["hits"],
                "vlm_calls": self.vlm["calls"] - mark["vlm"]["calls"],
                "prompt_tokens": self.vlm["prompt_tokens"] - mark["vlm"]["prompt_tokens"],
                "new_tokens": self.vlm["new_tokens"] - mark["vlm"]["new_tokens"],
                "loads": sum(m["action"] == "load" for m in moves),
                "moves": moves, "moved_bytes": sum(m["bytes"] for m in moves),
                "move_seconds": round(sum(m["seconds"] for m in moves), 3),
                "peak_gib": self.peak()}


def counted(chat, counter: dict):
    """The VLM's chat, counting calls and tokens (compose and judge alike)."""

    def chat_counted(*args, **kwargs):
        answer = chat(*args, **kwargs)
        counter["calls"] += 1
        counter["prompt_tokens"] += int(answer.prompt_tokens or 0)
        counter["new_tokens"] += int(answer.new_tokens or 0)
        return answer

    return chat_counted


def table(report: dict) -> str:
    rows = [f"{'stage':<10} {'s':>8} {'renders':>7} {'vlm':>4} {'tokens in/out':>15} {'loads':>5} {'moved GiB':>9} "
            f"{'peak GiB':>8}"]
    for s in report["stages"]:
        rows.append(f"{s['stage']:<10} {s['seconds']:>8.1f} {s['renders']:>7} {s['vlm_calls']:>4} "
                    f"{s['prompt_tokens']:>7}/{s['new_tokens']:<7} {s['loads']:>5} {s['moved_bytes'] / 2**30:>9.2f} "
                    f"{s['peak_gib']:>8.2f}")
    rows.append("models: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in report["model_bytes"].items()))
    rows.append(f"fits: {report['fits']}" + (f" ({report['advice']})" if report.get("advice") else ""))
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    args = parse(argv)
    if args.smoke and args.quick:
        sys.exit("bench_gpu.py: --smoke and --quick are exclusive")
    if len(args.vram) > 1:
        matrix(argv, args)
    args.vram = args.vram[0] if args.vram else None
    os.environ.setdefault("LOCALORA_HOME", tempfile.mkdtemp(prefix="localora-fullsize-home-"))
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        # bf16 on a CPU: the half-precision code a GPU user runs, at half fp32's memory.
        os.environ["LOCALORA_DTYPE"] = "bfloat16"
    if args.vram and cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.vram * 2**30 / total))
        os.environ["LOCALORA_VRAM_GB"] = str(args.vram)

    import fullsize_random
    from localora import package_version
    from localora.errors import LocaloraError
    from localora.memory import OutOfMemory
    from localora.runs import session
    from localora.scoring import judge
    from localora.search import final as final_judge
    from localora.search.config import ComposeConfig

    rounds, candidates = (1, 2) if args.smoke else (2, 2) if args.quick else (5, 3)
    folder = Path(args.models or tempfile.mkdtemp(prefix="localora-fullsize-models-"))
    start = time.perf_counter()
    dtype = torch.float16 if cuda else torch.bfloat16
    dtype_name = str(dtype).removeprefix("torch.")
    wanted = [args.profile, dtype_name, "1" if args.smoke else "0"] + ([args.vlm] if args.vlm else [])
    marker = folder / "built.json"
    if not marker.is_file() or json.loads(marker.read_text()) != wanted:
        # A child process builds them: its memory goes back to the system before the run.
        subprocess.run([sys.executable, str(Path(fullsize_random.__file__)), str(folder), *wanted], check=True)
    profile, loras = fullsize_random.write(folder, args.profile, dtype, smoke=args.smoke, vlm_name=args.vlm,
                                           build=False)
    if args.quick:
        from dataclasses import replace

        profile = replace(profile, diffusion=replace(profile.diffusion, steps=10))
    build_seconds = round(time.perf_counter() - start, 1)

    counter = {"calls": 0, "prompt_tokens": 0, "new_tokens": 0}
    meter = Meter(torch, counter)
    runs_dir = Path(tempfile.mkdtemp(prefix="localora-fullsize-runs-"))
    stages, finals, fits, advice, error = [], {}, True, None, None
    parts = None
    try:
        for method in ("merge", "composite"):
            cfg = ComposeConfig(prompt="a portrait of a girl in a garden", loras=tuple(loras), iterations=rounds,
                                candidates=candidates, method=method,
                                fewshot_threshold=profile.clip.fewshot_threshold)
            run = session.start(cfg, profile, runs_dir / method)
            if parts is None:
                parts = session.components(profile, meter, run)
                parts.vlm.chat = counted(parts.vlm.chat, counter)
            mark = meter.begin(parts.renderer)
            done = session.compose(cfg, profile, run, meter, parts=parts)
            stages.append(meter.end(method, mark, parts.renderer))
            finals[method] = run.path / done.image
        mark = meter.begin(parts.renderer)
        verdict = judge.judge_pair(parts.vlm, finals["merge"], finals["composite"], final_judge.elements(cfg))
        row = meter.end("judge", mark, parts.renderer)
        row["verdict"] = dict(verdict.verdict)
        stages.append(row)
    except (OutOfMemory, torch.OutOfMemoryError, LocaloraError) as e:
        fits, error = False, str(e).splitlines()[0]
        advice = ADVICE.format(gb=args.vram or "this card's", profile=args.profile) if (cuda or args.vram) else None
    report = {
        "commit": commit(),
        "profile": profile.name, "base_profile": args.profile, "vlm": profile.vlm.name,
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "vram_cap_gb": args.vram if cuda else None, "vram_cap_applied": bool(args.vram and cuda),
        "dtype": str(dtype).removeprefix("torch."), "placement": profile.placement,
        "rounds": rounds, "candidates": candidates, "loras": len(loras), "lora_rank": fullsize_random.LORA_RANK,
        "size": [profile.diffusion.width, profile.diffusion.height], "steps": profile.diffusion.steps,
        "vlm_quantization": getattr(parts.vlm, "quantization", None) if parts else None,
        "build_seconds": build_seconds, "stages": stages,
        "total_seconds": round(sum(s["seconds"] for s in stages), 3),
        "renders": sum(s["renders"] for s in stages), "vlm_calls": counter["calls"],
        "prompt_tokens": counter["prompt_tokens"], "new_tokens": counter["new_tokens"],
        "model_bytes": meter.models, "peak_gib": max((s["peak_gib"] for s in stages), default=meter.peak()),
        "peak_kind": "cuda max_memory_allocated" if cuda else "process peak RSS",
        "fits": fits, "error": error, "advice": advice,
        "versions": {p: package_version(p) for p in ("localora", "torch", "diffusers", "transformers", "peft",
                                                      "bitsandbytes")},
    }
    text = json.dumps(report, indent=1)
    Path(args.out).write_text(text + "\n")
    print(text)
    print(table(report), file=sys.stderr)
    if not fits and not cuda:
        sys.exit(1)
