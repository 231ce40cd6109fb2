"""How fast the commands that need no model answer (a benchmark, not a test).

    python scripts/bench_startup.py [--repeats 5] [--lora FILE.safetensors] [--run RUN_DIR] [--out bench_startup.json]

Runs each command in a fresh interpreter, as a user's shell does, --repeats times, and prints the
median wall time; one more run under `python -X importtime` tells whether it imported torch,
diffusers or transformers (it should not: issue 16 asks for about a second, under 2 s). Without
--lora the tiny demo LoRA in $LOCALORA_HOME is used if built; without --run, `open` and
`export --to a1111` are skipped. Writes every time to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "diffusers", "transformers")


def commands(lora: Path | None, run: Path | None) -> dict[str, list[str]]:
    cmds = {"--help": ["--help"], "models": ["models"], "loras list": ["loras", "list"]}
    if lora is not None:
        cmds["loras inspect"] = ["loras", "inspect", str(lora)]
    if run is not None:
        cmds["open"] = ["open", str(run)]
        cmds["export --to a1111"] = ["export", str(run), "--to", "a1111"]
    return cmds


def env() -> dict[str, str]:
    # This checkout's localora, whatever is installed.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def wall(args: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "localora", *args], capture_output=True, text=True, env=env())
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"localora {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    return seconds


def heavy_imports(args: list[str]) -> list[str]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "localora", *args], capture_output=True,
                          text=True, env=env())
    loaded = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return [m for m in HEAVY if m in loaded]


def default_lora() -> Path | None:
    home = Path(os.environ.get("LOCALORA_HOME", Path.home() / ".cache" / "localora")).expanduser()
    path = home / "tiny" / "v1" / "loras-sdxl" / "demo-character.safetensors"
    return path if path.is_file() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lora", type=Path, default=None, help="a .safetensors LoRA for `loras inspect`")
    ap.add_argument("--run", type=Path, default=None, help="a finished run folder for `open` and `export`")
    ap.add_argument("--out", type=Path, default=Path("bench_startup.json"))
    args = ap.parse_args()

    lora = args.lora or default_lora()
    results = {}
    print(f"{'command':<20} {'median s':>9} {'min s':>7} {'max s':>7}  heavy imports")
    for name, cmd in commands(lora, args.run).items():
        times = [wall(cmd) for _ in range(args.repeats)]
        heavy = heavy_imports(cmd)
        results[name] = {"args": cmd, "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
                         "max_s": round(max(times), 3), "runs": [round(t, 3) for t in times], "heavy": heavy}
        print(f"{name:<20} {results[name]['median_s']:>9.2f} {min(times):>7.2f} {max(times):>7.2f}  "
              f"{', '.join(heavy) or 'none'}")
    skipped = [n for n, given in (("loras inspect", lora), ("open, export", args.run)) if given is None]
    if skipped:
        print(f"skipped {', '.join(skipped)}: give --lora FILE / --run DIR")
    args.out.write_text(json.dumps({"python": sys.version.split()[0], "repeats": args.repeats,
                                    "commands": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
