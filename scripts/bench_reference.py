"""localora's Merge, Switch and Composite against the reference implementation (a benchmark, not a test).

    python scripts/bench_reference.py --reference DIR [--profile tiny-sd15] [--steps 20] [--size 64]
                                      [--repeats 3] [--switch-every 5] [--scale 0.8] [--out bench_reference.json]

The reference is the Multi-LoRA Composition repository (Zhong et al., 2024), which the user
fetches; it is never copied into this repository:

    git clone https://github.com/maszhongming/Multi-LoRA-Composition DIR

    DIR/callbacks.py                  make_callback(switch_step, loras): its LoRA Switch callback
    DIR/pipeline/pipeline_0.26.3.py   its StableDiffusionPipeline with `lora_composite=True` (Composite)

Both sides render the same SD1.5 model (the profile's folder; the reference loads it with its own
pipeline class and its own load_lora_weights calls, as its compose_lora.py does), the same demo
LoRAs, prompt (with their triggers), negative prompt, seed, steps, size, guidance and DPM++ 2M
scheduler. The reference has one LoRA scale for all LoRAs (`cross_attention_kwargs={"scale": s}`
on top of set_adapters' weight 1), so localora gets the weight s for every LoRA.

    Merge      localora: methods.merge        reference: set_adapters(all) + pipeline(...)
    Switch     localora: methods.switch       reference: set_adapters([first]) + its switch callback
    Composite  localora: methods.composite    reference: set_adapters(all) + pipeline(lora_composite=True)

After one warm-up of each, the six renders are repeated `--repeats` times, interleaved (the side
that goes first alternates), and the median seconds per image (denoising and VAE decode) are
compared: ratio = reference / localora, above 1 means localora is faster (also of the fastest
repeats, which other processes on a shared machine disturb less). The images of the last
repeat are compared pixel by pixel (max abs difference of 0-255 values). Prints a table and writes
JSON (--out). A missing or wrong reference folder is one error line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from localora.errors import LocaloraError  # noqa: E402  (torch-free)

REPO_URL = "https://github.com/maszhongming/Multi-LoRA-Composition"
ENV = "LOCALORA_REFERENCE"
# The reference's files this benchmark runs, relative to its checkout.
CALLBACKS = "callbacks.py"
PIPELINE = "pipeline/pipeline_0.26.3.py"
METHOD_NAMES = ("merge", "switch", "composite")
NEGATIVE = "worst quality, low quality, blurry"  # a short one, as the reference always passes one
PROMPT = "a portrait of a girl in a garden"
CLOSE = 2  # max abs difference (of 255) still called close: batched Composite rounds differently


def reference_dir(given: str | None) -> Path:
    """The reference checkout from --reference or $LOCALORA_REFERENCE, or one error line saying
    which path, what is missing and the command that fetches it."""
    fetch = f"git clone {REPO_URL} DIR"
    if not given:
        raise LocaloraError(f"no reference checkout: pass --reference DIR or set ${ENV}; fetch it with: {fetch}")
    path = Path(given).expanduser()
    if not path.is_dir():
        raise LocaloraError(f"reference {path}: no such folder; fetch it with: git clone {REPO_URL} {path}")
    missing = [f for f in (CALLBACKS, PIPELINE) if not (path / f).is_file()]
    if missing:
        raise LocaloraError(f"reference {path}: missing {' and '.join(missing)}, so it is not a Multi-LoRA "
                            f"Composition checkout; fetch it with: {fetch}")
    return path


def _import(name: str, path: Path):
    """Their file as a module of its own name, without putting their folder on sys.path."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_reference(path: Path):
    """(make_callback, their pipeline class), imported unchanged from the checkout."""
    import diffusers

    try:
        with warnings.catch_warnings():
            # Their pipeline imports diffusers' LoraLoaderMixin, a deprecated alias that still works.
            warnings.filterwarnings("ignore", category=FutureWarning)
            callbacks = _import("mlc_reference_callbacks", path / CALLBACKS)
            pipeline = _import("mlc_reference_pipeline", path / PIPELINE)
    except (ImportError, AttributeError) as e:
        raise LocaloraError(f"reference {path / PIPELINE}: does not import with diffusers {diffusers.__version__} "
                            f"({str(e).splitlines()[0]}); it was written for diffusers 0.26.3") from None
    return callbacks.make_callback, pipeline.StableDiffusionPipeline


def commit_of(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def table(report: dict) -> str:
    rows = [f"{'method':<10} {'localora s/img':>15} {'reference s/img':>16} {'ratio ref/loc':>14} {'best-of ratio':>14} {'max |diff|':>11}  images"]
    for name, m in report["methods"].items():
        same = "equal" if m["equal"] else "close" if m["close"] else "DIFFER"
        rows.append(f"{name:<10} {m['localora_seconds']:>15.4f} {m['reference_seconds']:>16.4f} "
                    f"{m['ratio_reference_over_localora']:>14.2f} {m['ratio_best_reference_over_localora']:>14.2f} "
                    f"{m['max_abs_diff']:>11d}  {same}")
    return "\n".join(rows)


def run(args) -> dict:
    ref_dir = reference_dir(args.reference or os.environ.get(ENV))
    os.environ.setdefault("LOCALORA_HOME", tempfile.mkdtemp(prefix="localora-bench-"))

    import numpy as np
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from localora import package_version, profiles, tiny
    from localora.diffusion import loras as loralib
    from localora.diffusion import methods
    from localora.diffusion.render import Renderer
    from localora.diffusion.sampling import Sampling

    profile = profiles.load_profile(args.profile)
    spec = profile.diffusion
    if spec.arch != "sd15":
        raise LocaloraError(f"--profile {args.profile}: its base is {spec.arch}, but the reference pipeline is "
                            f"Stable Diffusion 1.5 only; use an SD1.5 profile such as tiny-sd15")
    make_callback, RefPipeline = load_reference(ref_dir)

    # localora's side: the renderer's pipeline with the base's demo LoRAs loaded its way.
    renderer = Renderer(profile)
    demo = list(loralib.read_catalog(tiny.ensure(f"loras-{spec.arch}") / "catalog.toml").values())
    demo, _ = methods.arrange("switch", demo, [1.0] * len(demo))  # character first: both Switches' order
    names = renderer.adapters_for(demo)
    pipe = renderer.pipeline()
    pipe.set_progress_bar_config(disable=True)
    size = args.size or spec.width
    s = Sampling(seed=args.seed, negative_prompt=NEGATIVE, steps=args.steps, width=size, height=size,
                 switch_every=args.switch_every).resolved(spec)
    prompt = loralib.with_triggers(PROMPT, demo)
    weights = [args.scale] * len(names)

    # The reference's side, set up as its compose_lora.py does: its pipeline class from the same
    # folder, the scheduler it sets (DPM++ from the model's config), one load_lora_weights per file.
    folder = profiles.locate(spec.source, spec.name)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        ref = RefPipeline.from_pretrained(str(folder), safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False, torch_dtype=pipe.unet.dtype)
    ref = ref.to(pipe.unet.device)
    if spec.vae:  # a profile's own VAE, as the reference's example swaps in sd-vae-ft-mse
        ref.vae = pipe.vae
    config = dict(ref.scheduler.config)
    config["algorithm_type"] = "dpmsolver++"
    ref.scheduler = DPMSolverMultistepScheduler.from_config(config)
    ref.set_progress_bar_config(disable=True)
    ref_names = []
    for lora in demo:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Already found a `peft_config`")
            ref.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name, adapter_name=lora.path.stem)
        ref_names.append(lora.path.stem)

    def ours(method: str):
        with torch.no_grad():
            return methods.decode(pipe, methods.get(method).run(pipe, names, weights, prompt, s))

    def theirs(method: str):
        # Exactly the reference's call (compose_lora.py / example.py), with our sampling settings.
        if method == "switch":
            ref.set_adapters([ref_names[0]])
            callback = make_callback(switch_step=s.switch_every, loras=ref_names)
        else:
            ref.set_adapters(ref_names)
            callback = None
        return ref(prompt=prompt, negative_prompt=s.negative_prompt, height=s.height, width=s.width,
                   num_inference_steps=s.steps, guidance_scale=s.guidance, generator=torch.manual_seed(s.seed),
                   cross_attention_kwargs={"scale": args.scale}, callback_on_step_end=callback,
                   lora_composite=method == "composite").images[0]

    sides = {"localora": ours, "reference": theirs}
    for method in METHOD_NAMES:  # warm-up
        for fn in sides.values():
            fn(method)
    seconds = {m: {side: [] for side in sides} for m in METHOD_NAMES}
    images = {}
    for r in range(args.repeats):
        for method in METHOD_NAMES:
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]  # neither side always runs warm
            for side in order:
                took, images[method, side] = timed(lambda: sides[side](method))
                seconds[method][side].append(took)

    results = {}
    for method in METHOD_NAMES:
        a = np.asarray(images[method, "localora"], dtype=np.int16)
        b = np.asarray(images[method, "reference"], dtype=np.int16)
        diff = int(np.abs(a - b).max())
        loc, ref_s = (statistics.median(seconds[method][side]) for side in ("localora", "reference"))
        results[method] = {"localora_seconds": loc, "reference_seconds": ref_s,
                           "ratio_reference_over_localora": ref_s / loc,
                           # Fastest against fastest: less of other processes' load on a shared machine.
                           "ratio_best_reference_over_localora": min(seconds[method]["reference"])
                           / min(seconds[method]["localora"]),
                           "max_abs_diff": diff,
                           "equal": diff == 0, "close": diff <= CLOSE,
                           "localora_all": seconds[method]["localora"], "reference_all": seconds[method]["reference"]}
    # The methods' images differ from each other (on localora's side): the LoRAs act, and the
    # Switch switched, so equal images above say more than "both did nothing".
    between = {f"{a}-{b}": int(np.abs(np.asarray(images[a, "localora"], dtype=np.int16)
                                      - np.asarray(images[b, "localora"], dtype=np.int16)).max())
               for i, a in enumerate(METHOD_NAMES) for b in METHOD_NAMES[i + 1:]}
    return {
        "reference": {"dir": str(ref_dir), "commit": commit_of(ref_dir), "url": REPO_URL,
                      "files": [CALLBACKS, PIPELINE],
                      "adaptations": "none: its files are imported unchanged (its pipeline uses diffusers' "
                                     "deprecated LoraLoaderMixin alias, which still works)"},
        "profile": profile.name, "arch": spec.arch, "device": str(pipe.unet.device),
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "loras": [lora.name for lora in demo], "scale": args.scale, "prompt": prompt,
        "negative_prompt": s.negative_prompt, "seed": s.seed, "steps": s.steps, "size": [s.width, s.height],
        "guidance": s.guidance, "switch_every": s.switch_every, "scheduler": "DPMSolverMultistep dpmsolver++",
        "repeats": args.repeats, "close_tolerance": CLOSE, "methods": results,
        "max_abs_diff_between_methods": between,
        "torch_threads": torch.get_num_threads(),
        "versions": {p: package_version(p) for p in ("localora", "torch", "diffusers", "peft")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", metavar="DIR",
                        help=f"a checkout of {REPO_URL} (default: ${ENV})")
    parser.add_argument("--profile", default="tiny-sd15", help="an SD1.5 profile (the reference is SD1.5 only)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=None, help="image width and height (default: the profile's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--switch-every", type=int, default=5, help="Switch: steps per LoRA (the reference's default)")
    parser.add_argument("--scale", type=float, default=0.8, help="every LoRA's weight (the reference's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_reference.json")
    args = parser.parse_args()
    try:
        if args.steps < 1 or args.repeats < 1 or args.switch_every < 1:
            raise LocaloraError("--steps, --repeats and --switch-every must be 1 or more")
        report = run(args)
    except LocaloraError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.code)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
