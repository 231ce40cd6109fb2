"""`localora ask` (one question to the profile's VLM) and `localora doctor` (what this machine has)."""

from __future__ import annotations

import platform
from typing import Any

import click

from localora import estimates, package_version, profiles, verbosity
from localora.estimates import BASIS, CUDA_CONTEXT_GIB, GIB, estimate_gib
from localora.vlm import schemas
from localora.cli.options import complete_profiles, emit, json_option, vlm_option
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


@click.command()
@click.argument("question")
@click.option("--profile", "-p", "profile_name", default=None, shell_complete=complete_profiles, help="Profile from models.toml.")
@vlm_option
@click.option("--image", "images", multiple=True, help="An image to show, in order (repeatable).")
@click.option("--system", default=None, help="System message (default: the model's own).")
@click.option("--json", "kind", type=click.Choice(JSON_KINDS), default=None, help="Constrained JSON answer.")
@click.option("--loras", default=None, help="weights/candidates/refine: a LoRA count or comma-separated names.")
@click.option("--lo", type=float, default=0.0, show_default=True, help="Lowest allowed weight.")
@click.option("--hi", type=float, default=1.5, show_default=True, help="Highest allowed weight.")
@click.option("-m", "--candidates", "m", type=int, default=5, show_default=True, help="candidates: how many.")
@click.option("--options", type=int, default=None, help="choice: how many options (default: the number of images).")
@click.option("--max-chars", type=int, default=600, show_default=True, help="feedback/refine: longest free text.")
@click.option("--temperature", type=click.FloatRange(min=0), default=None, help="Sample at this temperature (default: greedy).")
@click.option("--seed", type=int, default=None, help="Seed for sampling (default 0).")
@click.option("--max-new-tokens", type=int, default=None, help="Cap on the answer's length in tokens.")
@click.option("--stats", is_flag=True, help="Also print token counts and time to stderr.")
def ask(question, profile_name, vlm, images, system, kind, loras, lo, hi, m, options, max_chars, temperature, seed,
        max_new_tokens, stats) -> None:
    """Ask the profile's VLM (or --vlm NAME) QUESTION about the --image files; Picture 1 is the first --image."""
    from localora.devices import DeviceManager
    from localora.vlm.model import VLM, load_image

    schema = None
    if kind:
        schema = _schema(kind, loras, lo, hi, m, options if options is not None else len(images), max_chars)
        question = f"{question}\n{schema.describe()}"
    pictures = [load_image(p) for p in images]  # bad files fail before any model loads
    profile = profiles.load_profile(profile_name, vlm=vlm)
    verbosity.quiet_libraries(diffusers=False)  # loading bars would bury a one-line answer
    model = VLM(profile.vlm, devices=DeviceManager.for_profile(profile))
    answer = model.chat(system, pictures, question, schema=schema, temperature=temperature, seed=seed,
                      max_new_tokens=max_new_tokens)
    click.echo(answer.text)
    if stats:
        click.echo(f"{answer.prompt_tokens} prompt tokens, {answer.new_tokens} new tokens, "
                   f"{answer.seconds:.2f} s ({answer.new_tokens / max(answer.seconds, 1e-9):.0f} tokens/s)", err=True)


# ------------------------------------------------------------------ doctor

def _gpu() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"name": None, "free_gib": None, "total_gib": None, "free_bytes": None}
    free, total = torch.cuda.mem_get_info()
    return {"name": torch.cuda.get_device_name(), "free_gib": round(free / GIB, 1), "total_gib": round(total / GIB, 1),
            "free_bytes": free}


def _gpu_line(gpu: dict[str, Any]) -> str:
    if gpu["name"] is None:
        return "no GPU (torch.cuda.is_available() is False)"
    return f"{gpu['name']}: {gpu['free_gib']:.1f} GiB free of {gpu['total_gib']:.1f} GiB"


def _doctor_data(profile: profiles.Profile, vram: float | None = None) -> dict[str, Any]:
    """What doctor reports, as values: the human lines and --json are both made from it."""
    import torch

    states = [(role, name, profiles.availability(source)) for role, name, source in profiles.model_sources(profile)]
    found = [{"role": role, "name": name, "availability": profiles.listed(state)}  # the last line says how to fetch them
             for role, name, state in states]
    sizes = estimate_gib(profile)
    known = {n: s for n, s in sizes.items() if s is not None}
    weights = [b for b in estimates.weights(profile).values() if b is not None]
    gpu = _gpu()
    plans = [p.as_dict() for p in _plans(profile, gpu, vram)]
    return {
        "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "packages": {p: package_version(p) for p in ("transformers", "diffusers", "bitsandbytes", "xgrammar",
                                                     "open_clip_torch")},
        "gpu": gpu,
        "profile": profile.name, "placement": profile.placement, "device": profile.device,
        "models": found,
        "missing": [m["name"] for m in found if m["availability"].startswith("missing")],
        "estimate_gib": {
            # Resident: every model's weights, and the working memory of the one running.
            "resident": round((sum(weights) + estimates.reserve(max(weights, default=0))) / GIB + CUDA_CONTEXT_GIB, 1),
            "one_at_a_time": round(max(known.values(), default=0.0) + CUDA_CONTEXT_GIB, 1),
            "per_model": {n: None if s is None else round(s, 1) for n, s in sizes.items()},
            "basis": BASIS,
        },
        "plans": plans,
        "plan": _placement_line(plans[0]) if len(plans) == 1 else f"see the plans for {_cards(plans)}",
        "attention": _attention(profile),
    }


def _attention(profile: profiles.Profile) -> dict[str, dict[str, Any]]:
    """_find_attention's report, kept in the home for this state of the models' files and the
    libraries: building them means importing diffusers and transformers' model code (about 10 s of
    a 13 s doctor), which a second doctor skips."""
    from localora import attention, paths

    return attention.remembered(paths.home() / "attention.json", _attention_key(profile),
                                lambda: _find_attention(profile))


def _attention_key(profile: profiles.Profile) -> str:
    """What decides the report: each model's source, whether it is here, and its config files (the
    folder, a snapshot's commit, their times and sizes), how localora loads them, and the versions
    and attention backend of the libraries."""
    import os

    import torch

    from localora.files import stable_hash
    from localora.vlm import model as vlm_model

    models = []
    for source in (profile.diffusion.source, profile.vlm.source, profile.clip.source):
        state, files = profiles.availability(source), []
        if state == "ok":
            try:
                folder = profiles.locate(source, source)
            except LocaloraError:
                folder = None
            if folder is not None and folder.is_dir():
                files = sorted((str(f.relative_to(folder)), f.stat().st_mtime_ns, f.stat().st_size)
                               for f in [*folder.glob("*.json"), *folder.glob("*/config.json")])
            files = [str(folder), files]
        models.append([source, state, files])
    return stable_hash({
        "models": models, "profile": [repr(profile.diffusion), repr(profile.vlm), repr(profile.clip)],
        "vlm_attention": vlm_model.ATTENTION, "backend": os.environ.get("DIFFUSERS_ATTN_BACKEND"),
        "packages": [torch.__version__] + [package_version(p) for p in ("diffusers", "transformers", "open_clip_torch")],
    })


def _find_attention(profile: profiles.Profile) -> dict[str, dict[str, Any]]:
    """Which attention each model of the profile runs, from its config built on the meta device (no
    weights read): denoiser, text encoders, vlm, clip -> implementation and the classes that run
    it. A model whose config is not here (not pulled, a tiny one not built yet, a single-file
    checkpoint) is NOT_HERE."""
    from localora import archs, attention
    from localora.diffusion.pipeline import empty_models
    from localora.scoring.clip import empty_model as empty_clip
    from localora.vlm.model import empty_model as empty_vlm

    def build(source: str, empty: Any) -> Any:
        if profiles.availability(source) != "ok":  # never builds a tiny model nor looks further
            return None
        try:
            return empty()
        except LocaloraError:
            return None

    def of(*models: Any) -> dict[str, Any]:
        if not models or models[0] is None:
            return attention.Attention(attention.NOT_HERE).as_dict()
        return attention.summary({k: v for m in models for k, v in attention.used(m).items()}).as_dict()

    denoiser = archs.arch(profile.diffusion.arch).denoiser
    pipeline = build(profile.diffusion.source, lambda: empty_models(profile.diffusion)) or {}
    encoders = [pipeline[n] for n in archs.arch(profile.diffusion.arch).text_encoders if n in pipeline]
    return {
        "denoiser": {"model": denoiser, **of(pipeline.get(denoiser))},
        "text_encoders": of(*encoders),
        "vlm": of(build(profile.vlm.source, lambda: empty_vlm(profile.vlm))),
        "clip": of(build(profile.clip.source, lambda: empty_clip(profile.clip))),
    }


def _attention_line(found: dict[str, dict[str, Any]]) -> str:
    """`attention: unet sdpa (AttnProcessor2_0), text encoders sdpa, vlm sdpa, clip sdpa (...)`: the
    classes are named where they say more than the implementation (diffusers processors, open_clip's
    modules) and wherever implementations differ."""
    from localora.attention import Attention

    def said(part: dict[str, Any], classes: bool) -> str:
        found = Attention(part["implementation"], part["via"])
        return str(found) if classes or found.implementation == "mixed" else found.implementation

    return "attention: " + ", ".join([
        f"{found['denoiser']['model']} {said(found['denoiser'], True)}",
        f"text encoders {said(found['text_encoders'], False)}",
        f"vlm {said(found['vlm'], False)}",
        f"clip {said(found['clip'], True)}",
    ])


def _plans(profile: profiles.Profile, gpu: dict[str, Any], vram: float | None) -> list:
    """The plan for --vram's card, else for this GPU's free memory, else for 12, 16 and 24 GiB cards."""
    import psutil

    from localora import planning

    ram = psutil.virtual_memory().available
    if vram is not None:
        cards = [vram]
    elif gpu["name"] is not None:
        cards = [gpu["free_bytes"] / GIB + CUDA_CONTEXT_GIB]  # free memory is what is left after the context
    else:
        cards = list(planning.CARDS_GIB)
    return [planning.plan(profile, int(g * GIB), free_ram=ram) for g in cards]


def _cards(plans: list[dict[str, Any]]) -> str:
    return ", ".join(f"{p['card_gib']:g}" for p in plans) + " GiB cards"


def _placement_line(plan: dict[str, Any]) -> str:
    """What the device manager's `auto` will do with these models on this card, in one line."""
    return {
        "resident": "every model it needs stays on the GPU" + (
            f" ({', '.join(plan['on_cpu'])} on the CPU)" if plan["on_cpu"] else ""),
        "moving": "not all models fit at once: the others wait in CPU RAM and are moved, never reloaded",
        "reload": "one model at a time fits, but CPU RAM cannot hold the others: set placement = \"reload\" "
                  "(evicted models are loaded again from disk)",
        "too large": "even the largest model alone does not fit: use a smaller profile (e.g. sdxl-realistic-small)",
        "unknown": "a model's size is not known here, so there is no plan",
    }[plan["verdict"]]


def _doctor_lines(d: dict[str, Any]) -> list[str]:
    from localora.planning import Plan

    est = d["estimate_gib"]
    cuda = f"CUDA {d['cuda']}" if d["cuda"] else "CPU-only build"
    unknown = [n for n, s in est["per_model"].items() if s is None]
    plans = [line for p in d["plans"] for line in Plan(**{k: v for k, v in p.items() if k != "needs_gib"}).lines()]
    return [
        f"python {d['python']}",
        f"torch {d['torch']} ({cuda}; CUDA available: {'yes' if d['cuda_available'] else 'no'})",
        *(f"{package} {version}" for package, version in d["packages"].items()),
        f"GPU: {_gpu_line(d['gpu'])}",
        f"profile {d['profile']} (placement {d['placement']}, device {d['device']})",
        *(f"  {m['role']:9} {m['name']}: {m['availability']}" for m in d["models"]),
        f"estimated peak GPU memory: {est['resident']:.1f} GiB with every model resident, "
        f"{est['one_at_a_time']:.1f} GiB one at a time"
        + (f" (not counting {', '.join(unknown)}: size unknown)" if unknown else ""),
        "  " + ", ".join(f"{n} {'?' if s is None else f'{s:.1f}'} GiB" for n, s in est["per_model"].items()),
        f"  basis: {est['basis']}",
        f"placement {d['placement']}: {d['plan']}",
        *plans,
        _attention_line(d["attention"]),
    ]


@click.command()
@click.option("--profile", "-p", "profile_name", default=None, shell_complete=complete_profiles,
              help="Profile to check (default: the default one).")
@click.option("--vram", type=click.FloatRange(min=1, max=4096), default=None, metavar="GB",
              help="Plan for a card of this many GiB instead of this machine's (e.g. 12 for an RTX 3060).")
@vlm_option
@json_option
def doctor(profile_name, vram, vlm, as_json) -> None:
    """Versions, GPU, which weights of a profile are here, its estimated peak GPU memory, what
    placement does with its models in a 5-iteration run: on this GPU, on a --vram GB card, or
    (no GPU here) on 12, 16 and 24 GiB cards, and which attention each model runs (SDPA or not)."""
    profile = profiles.load_profile(profile_name, vlm=vlm)
    data = _doctor_data(profile, vram)
    emit(as_json, data, _doctor_lines(data))
    if data["missing"]:
        profiles.require(profile, vlm=vlm)  # the line every command gives for the same models


COMMANDS = [ask, doctor]
