"""`localora ask` (one question to the profile's VLM) and `localora doctor` (what this machine has)."""

from __future__ import annotations

import json
import platform
import struct
from pathlib import Path

import click

from localora import package_version, profiles
from localora.vlm import schemas
from localora.errors import LocaloraError

JSON_KINDS = ("weights", "candidates", "choice", "judge", "feedback", "refine")


def _lora_names(loras: str | None, kind: str) -> list[str]:
    if loras is None:
        raise LocaloraError(f"--json {kind} needs --loras: a count (3) or names separated by commas (a,b,c)")
    if loras.strip().isdigit():
        return [f"lora_{i}" for i in range(1, int(loras) + 1)]
    return [n.strip() for n in loras.split(",") if n.strip()]


def _schema(kind: str, loras: str | None, lo: float, hi: float, m: int, options: int, max_chars: int) -> schemas.Schema:
    if kind == "choice":
        return schemas.choice(options)
    if kind == "judge":
        return schemas.judge_scores()
    if kind == "feedback":
        return schemas.feedback(max_chars)
    names = _lora_names(loras, kind)
    if kind == "weights":
        return schemas.weights(names, lo, hi)
    if kind == "candidates":
        return schemas.candidates(names, m, lo, hi)
    return schemas.refine(names, lo, hi, max_chars)


def _quiet_transformers() -> None:
    # Loading bars from the tiny build and from_pretrained would bury a one-line answer.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@click.command()
@click.argument("question")
@click.option("--profile", "profile_name", default=None, help="Profile from models.toml.")
@click.option("--image", "images", multiple=True, help="An image to show, in order (repeatable).")
@click.option("--system", default=None, help="System message (default: the model's own).")
@click.option("--json", "kind", type=click.Choice(JSON_KINDS), default=None, help="Constrained JSON answer.")
@click.option("--loras", default=None, help="weights/candidates/refine: a LoRA count or comma-separated names.")
@click.option("--lo", type=float, default=0.0, show_default=True, help="Lowest allowed weight.")
@click.option("--hi", type=float, default=1.5, show_default=True, help="Highest allowed weight.")
@click.option("-m", "--candidates", "m", type=int, default=5, show_default=True, help="candidates: how many.")
@click.option("--options", type=int, default=None, help="choice: how many options (default: the number of images).")
@click.option("--max-chars", type=int, default=600, show_default=True, help="feedback/refine: longest free text.")
@click.option("--temperature", type=float, default=None, help="Sample at this temperature (default: greedy).")
@click.option("--seed", type=int, default=None, help="Seed for sampling (default 0).")
@click.option("--max-new-tokens", type=int, default=None, help="Cap on the answer's length in tokens.")
@click.option("--stats", is_flag=True, help="Also print token counts and time to stderr.")
def ask(question, profile_name, images, system, kind, loras, lo, hi, m, options, max_chars, temperature, seed,
        max_new_tokens, stats) -> None:
    """Ask the profile's VLM QUESTION about the --image files; Picture 1 is the first --image."""
    from localora.devices import DeviceManager
    from localora.vlm.model import VLM, load_image

    schema = None
    if kind:
        schema = _schema(kind, loras, lo, hi, m, options if options is not None else len(images), max_chars)
        question = f"{question}\n{schema.describe()}"
    pictures = [load_image(p) for p in images]  # bad files fail before any model loads
    profile = profiles.load_profile(profile_name)
    _quiet_transformers()
    vlm = VLM(profile.vlm, devices=DeviceManager.for_profile(profile))
    answer = vlm.chat(system, pictures, question, schema=schema, temperature=temperature, seed=seed,
                      max_new_tokens=max_new_tokens)
    click.echo(answer.text)
    if stats:
        click.echo(f"{answer.prompt_tokens} prompt tokens, {answer.new_tokens} new tokens, "
                   f"{answer.seconds:.2f} s ({answer.new_tokens / max(answer.seconds, 1e-9):.0f} tokens/s)", err=True)


# ------------------------------------------------------------------ doctor

GIB = 1024**3
# Published parameter counts (all sub-models together) for the hub sources models.toml names;
# anything else is counted from the safetensors headers of its local files.
PARAMS = {
    "stabilityai/stable-diffusion-xl-base-1.0": 3.47e9,  # UNet 2.57B + text encoders 0.82B + VAE 0.08B
    "cagliostrolab/animagine-xl-3.1": 3.47e9,
    "gsdf/Counterfeit-V2.5": 1.07e9,  # UNet 0.86B + text encoder 0.12B + VAE 0.08B
    "SG161222/Realistic_Vision_V5.1_noVAE": 1.07e9,
    "Qwen/Qwen2-VL-2B-Instruct": 2.21e9,
    "Qwen/Qwen2-VL-7B-Instruct": 8.29e9,
    "Qwen/Qwen2.5-VL-3B-Instruct": 3.75e9,
    "Qwen/Qwen2.5-VL-7B-Instruct": 8.29e9,
    "timm/vit_large_patch14_clip_224.openai": 0.43e9,
}
# Bytes per parameter on the GPU. nf4/int8 include quantization constants and the layers
# bitsandbytes leaves in 16 bits (embeddings, lm_head, norms).
BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.1, "nf4": 0.6}
ACTIVATIONS = 1.25  # working memory on top of the weights while a model runs
CUDA_CONTEXT_GIB = 0.5
BASIS = (f"parameters (published counts, or the local safetensors headers) x bytes per parameter "
         f"(fp32 4, fp16/bf16 2, int8 1.1, nf4 0.6; CLIP in fp32), x{ACTIVATIONS} for activations, "
         f"+{CUDA_CONTEXT_GIB} GiB CUDA context; swap: the largest model, resident: the sum")


def _safetensors_params(path: Path) -> int:
    """Parameters in a safetensors file or a folder of them, from the headers (no weights read);
    fp16 variants that duplicate a full-precision file are skipped."""
    total = 0
    for f in sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]:
        if ".fp16." in f.name and f.with_name(f.name.replace(".fp16.", ".")).exists():
            continue
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, t in header.items():
            if name != "__metadata__":
                n = 1
                for d in t["shape"]:
                    n *= d
                total += n
    return total


def _params(source: str) -> float | None:
    if source.removeprefix("hf-hub:") in PARAMS:
        return PARAMS[source.removeprefix("hf-hub:")]
    if profiles.availability(source) != "ok":
        return 0.0 if profiles.is_tiny(source) else None  # tiny models are a few MB at most
    path = profiles.locate(source, source)
    return float(_safetensors_params(path))


def estimate_gib(profile: profiles.Profile) -> dict[str, float | None]:
    """Rough peak GPU memory of each model of `profile` while it runs, in GiB (None: unknown)."""
    vlm = profile.vlm
    parts = {
        "diffusion": (profile.diffusion.source, BYTES[profile.diffusion.dtype]),
        "vlm": (vlm.source, BYTES[vlm.dtype if vlm.quantization == "none" else vlm.quantization]),
        "clip": (profile.clip.source, BYTES["float32"]),
    }
    out: dict[str, float | None] = {}
    for name, (source, per_param) in parts.items():
        n = _params(source)
        out[name] = None if n is None else n * per_param * ACTIVATIONS / GIB
    return out


def _gpu_line() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no GPU (torch.cuda.is_available() is False)"
    free, total = torch.cuda.mem_get_info()
    return f"{torch.cuda.get_device_name()}: {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB"


@click.command()
@click.option("--profile", "profile_name", default=None, help="Profile to check (default: the default one).")
def doctor(profile_name) -> None:
    """Versions, GPU, which weights of a profile are here, and its estimated peak GPU memory."""
    import torch

    profile = profiles.load_profile(profile_name)
    click.echo(f"python {platform.python_version()}")
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    click.echo(f"torch {torch.__version__} ({cuda}; CUDA available: {'yes' if torch.cuda.is_available() else 'no'})")
    for package in ("transformers", "diffusers", "bitsandbytes", "xgrammar", "open_clip_torch"):
        click.echo(f"{package} {package_version(package)}")
    click.echo(f"GPU: {_gpu_line()}")

    click.echo(f"profile {profile.name} (placement {profile.placement}, device {profile.device})")
    sources = [("diffusion", profile.diffusion.name, profile.diffusion.source)]
    if profile.diffusion.vae:
        sources.append(("vae", profile.diffusion.vae, profile.diffusion.vae))
    sources += [("vlm", profile.vlm.name, profile.vlm.source), ("clip", profile.clip.name, profile.clip.source)]
    for role, name, source in sources:
        click.echo(f"  {role:9} {name}: {profiles.availability(source)}")

    sizes = estimate_gib(profile)
    known = [s for s in sizes.values() if s is not None]
    peak = (max(known) if profile.placement == "swap" else sum(known)) + CUDA_CONTEXT_GIB
    unknown = [n for n, s in sizes.items() if s is None]
    click.echo(f"estimated peak GPU memory ({profile.placement}): {peak:.1f} GiB"
               + (f" (not counting {', '.join(unknown)}: size unknown)" if unknown else ""))
    click.echo("  " + ", ".join(f"{n} {'?' if s is None else f'{s:.1f}'} GiB" for n, s in sizes.items()))
    click.echo(f"  basis: {BASIS}")


COMMANDS = [ask, doctor]
