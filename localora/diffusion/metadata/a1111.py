"""A1111 / Forge infotext: the `parameters` text a PNG from stable-diffusion-webui carries.

    infotext(info) -> str          three lines, A1111's layout:
        <prompt> <lora:NAME:WEIGHT> ...
        Negative prompt: <negative>                       (only when there is one)
        Steps: 4, Sampler: Euler, Schedule type: DDIM, CFG scale: 5.0, Seed: 0, Size: 64x64,
        [Model hash: ..., ]Model: ..., Lora hashes: "NAME: 0123456789ab, ...", [Note: "...", ]
        Version: localora 0.1.0, localora: "{...json...}"
    parse_infotext(text) -> dict   {"prompt", "negative_prompt", "fields", "localora"}
    for_people(text) -> str        the infotext without the localora entry, to paste into A1111
    sampler(info) -> (Sampler, Schedule type)

Layout, field order and quoting as A1111 writes them (read in AUTOMATIC1111/stable-diffusion-webui,
modules/processing.py create_infotext and modules/infotext_utils.py quote / parse_generation_parameters,
2026-12-01): settings as "Key: value" joined by ", "; a value holding ",", ":" or a newline is
written as a JSON string. The prompt line holds one <lora:NAME:WEIGHT> tag per LoRA, NAME being the
file's stem (A1111 finds a LoRA by its stem); "Lora hashes" names them with ":" and "," removed
(extensions-builtin/Lora/extra_networks_lora.py) and gives the addnet hash's first 12 hex
(network.py, modules/hashes.py addnet_hash_safetensors). Sampler and schedule labels are
modules/sd_samplers_kdiffusion.py's and modules/sd_schedulers.py's.

Switch and Composite are not LoRA stacks A1111 can run: their infotext says so in a Note field
and in the localora entry, and the tags give the weights only as a starting point.
"""

from __future__ import annotations

import json
import re
from typing import Any

from localora import __version__, archs
from localora.errors import LocaloraError
from localora.diffusion.metadata.info import RenderInfo

# localora's scheduler -> A1111's sampler label. DDIM is A1111's timestep sampler of that name.
SAMPLERS = {"euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M", "ddim": "DDIM", "flow_euler": "Euler"}
# A1111's "Schedule type" labels (modules/sd_schedulers.py `schedulers`). "Automatic" is never
# written: it means the sampler's own default (DPM++ 2M's is Karras), not the spacing localora used.
SCHEDULE_LABELS = ("Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                   "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")
# diffusers' timestep_spacing -> the A1111 schedule that gives the same timesteps: "leading" with
# steps_offset 1 is A1111's DDIM schedule (t = 1, 1 + 1000//n, ... reversed), "trailing" its Simple
# (t = 999 - int(i * 1000/n)), "linspace" its Uniform (t = linspace(999, 0, n)).
SPACING_LABELS = {"leading": "DDIM", "trailing": "Simple", "linspace": "Uniform"}
SIGMA_LABELS = {"karras": "Karras", "exponential": "Exponential", "beta": "Beta"}
METHOD_NAMES = {"merge": "Merge", "switch": "Switch", "composite": "Composite", "cmlora": "CMLoRA"}

# A1111's own pattern of one "Key: value" setting (a value is a JSON string or runs to the next ",").
_SETTING = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def weight_text(w: float) -> str:
    """The shortest text that reads back as the same float (1.0 -> "1", 0.35 -> "0.35")."""
    text = repr(float(w))
    return text[:-2] if text.endswith(".0") else text


def _sigmas(info: RenderInfo) -> str:
    """The sigma spacing the render really had: diffusers' Euler a and DDIM have no Karras,
    exponential or beta option, so they ran the config's timestep spacing whatever it asked."""
    return "default" if info.scheduler in ("euler_a", "ddim") else info.sigmas


def sampler(info: RenderInfo) -> tuple[str, str]:
    """(Sampler, Schedule type): the explicit schedule label of the spacing the render used."""
    if info.scheduler == "flow_euler":  # flow matching: Forge writes its Flux renders as Euler / Simple
        return SAMPLERS[info.scheduler], "Simple"
    sigmas = _sigmas(info)
    label = SPACING_LABELS.get(info.spacing, "DDIM") if sigmas == "default" else SIGMA_LABELS[sigmas]
    return SAMPLERS[info.scheduler], label


def exact_schedule(info: RenderInfo) -> bool:
    """Whether A1111's schedule of that label steps through the render's own timesteps or sigmas
    (else the label is the nearest it has). Checked in tests/test_metadata.py against diffusers'
    schedulers and a restatement of A1111's schedule functions. A1111's DDIM steps by 1000 // n
    from 1, as diffusers' leading spacing does, but gives more than n timesteps for some n; its
    Simple truncates i * 1000 / n where diffusers' trailing rounds, the same only when n divides 1000; Uniform meets linspace on whole timesteps only when n - 1 divides 999. DPM-Solver
    spaces "leading" and "linspace" over n + 1 points, diffusers' Euler runs Karras and exponential
    sigmas between the spaced ends (the model's own only with linspace), and A1111's Beta is spaced
    in timesteps where diffusers' is in sigmas: no A1111 schedule matches those."""
    sigmas, n = _sigmas(info), info.steps
    if info.scheduler == "flow_euler":
        # Forge's Simple steps evenly through the model's shifted sigmas; a resolution-dependent shift
        # (Flux.1 [dev] in diffusers) is one A1111/Forge may compute otherwise: not claimed exact.
        return sigmas == "simple"
    if sigmas != "default":
        # Euler's run between the spaced ends: the model's own ends only with linspace spacing
        return sigmas in ("karras", "exponential") and (info.scheduler == "dpmpp_2m" or info.spacing == "linspace")
    leading = len(range(1, 1000, max(1000 // n, 1))) == n  # A1111's DDIM gives n timesteps, as diffusers does
    if info.scheduler == "ddim":  # A1111's DDIM sampler always steps on the leading timesteps
        return info.spacing == "leading" and leading
    if info.scheduler == "dpmpp_2m" and info.spacing != "trailing":
        return False
    if info.spacing == "leading":
        return leading
    if info.spacing == "trailing":
        return 1000 % n == 0
    return info.spacing == "linspace" and n > 1 and 999 % (n - 1) == 0


def prompt_line(info: RenderInfo) -> str:
    """One <lora:NAME:WEIGHT> tag per LoRA; a LoRA with block weights gets the LoRA Block Weight
    extension's item, <lora:NAME:WEIGHT:lbw=V1,V2,...>."""
    blocks = info.blocks or (None,) * len(info.loras)
    tags = " ".join(f"<lora:{x.name}:{weight_text(w)}" + ("" if b is None else f":lbw={','.join(map(weight_text, b))}")
                    + ">" for x, w, b in zip(info.loras, info.weights, blocks))
    return f"{info.prompt} {tags}" if info.prompt else tags


def note(info: RenderInfo) -> str | None:
    """Why stock A1111 cannot redo this render exactly: Switch and Composite, or a sigma spacing
    A1111 has no schedule for."""
    notes = []
    if info.method == "switch":
        notes.append(f"a localora LoRA Switch render (one LoRA active at a time, rotating every {info.switch_every} "
                     f"steps); stock A1111 runs the tags merged, so it gives another image")
    if info.method == "cmlora":
        notes.append(f"a localora CMLoRA render (cached LoRA Composite, cache interval {info.cache_interval}); "
                     f"stock A1111 runs the tags merged, so it gives another image")
    if info.method == "composite":
        notes.append("a localora LoRA Composite render (one UNet pass per LoRA per step); stock A1111 runs the tags "
                     "merged, so it gives another image")
    if info.reproducible_elsewhere:
        from localora.diffusion.metadata.comfyui import workflow

        try:
            workflow(info)
        except LocaloraError as e:
            notes.append(f"no ComfyUI graph in this PNG: {str(e).split(': ', 1)[-1]}")
    if not exact_schedule(info):
        notes.append(f"Schedule type {sampler(info)[1]} is the nearest A1111 has to this render's sigmas "
                     f"(diffusers {info.scheduler}, {info.sigmas} sigmas, {info.spacing} timestep spacing), "
                     f"so A1111 gives a close, not the same, image")
    return "; ".join(notes) or None


def settings(info: RenderInfo) -> dict[str, str | None]:
    """The settings line's fields, in A1111's order; None is left out."""
    name, schedule = sampler(info)
    hashes = ", ".join(f"{x.name.replace(':', '').replace(',', '')}: {x.short_hash}" for x in info.loras)
    return {
        "Steps": str(info.steps), "Sampler": name, "Schedule type": schedule, **guidance_fields(info),
        "Seed": str(info.seed), "Size": f"{info.width}x{info.height}", "Model hash": info.model_hash,
        "Model": info.model, "Lora hashes": hashes,
        "localora method": METHOD_NAMES[info.method] if info.method != "merge" else None, "Note": note(info),
        "Version": f"localora {__version__}", "localora": info.entry_json(),
    }


def guidance_fields(info: RenderInfo) -> dict[str, str]:
    """CFG scale, as A1111 writes it; a guidance-distilled base (Flux.1) as Forge writes it: CFG
    scale 1 (no unconditional pass) and the embedded scale as "Distilled CFG Scale"; Z-Image's
    c + g (c - u) is classifier-free guidance at scale 1 + g."""
    base = archs.ARCHS.get(info.arch)
    if base is not None and base.guidance == "distilled":
        return {"CFG scale": "1.0", "Distilled CFG Scale": str(float(info.guidance))}
    return {"CFG scale": str(float(info.guidance) + (base.cfg_offset if base else 0.0))}


def infotext(info: RenderInfo) -> str:
    line = ", ".join(f"{k}: {quote(v)}" for k, v in settings(info).items() if v is not None)
    negative = f"\nNegative prompt: {info.negative_prompt}" if info.negative_prompt else ""
    return f"{prompt_line(info)}{negative}\n{line}"


def parse_infotext(text: str) -> dict[str, Any]:
    """An infotext (localora's or any A1111/Forge one) as
    {"prompt": the prompt line as written, <lora:...> tags included (diffusion.loras.split_lora_tags
     reads them), "negative_prompt", "fields": {key: unquoted value}, "localora": the entry or None}.
    A1111's reading, not its defaults: only fields present are returned."""
    *lines, last = text.strip().split("\n")
    if len(_SETTING.findall(last)) < 3:  # A1111's own test: no settings line, all prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields = {k: unquote(v) for k, v in _SETTING.findall(last)}
    entry = None
    if "localora" in fields:
        try:
            entry = json.loads(fields["localora"])
        except ValueError:
            entry = None
    return {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative),
            "fields": fields, "localora": entry if isinstance(entry, dict) else None}


def for_people(text: str) -> str:
    """An infotext without its `localora` entry: what a person pastes into A1111's prompt box (A1111
    ignores the entry, but it is a screenful of JSON). The PNG itself keeps the whole text."""
    parsed = parse_infotext(text)
    fields = {k: v for k, v in parsed["fields"].items() if k != "localora"}
    negative = f"\nNegative prompt: {parsed['negative_prompt']}" if parsed["negative_prompt"] else ""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in fields.items())
    return f"{parsed['prompt']}{negative}\n{line}" if line else f"{parsed['prompt']}{negative}"


def read_info(text: str, where: str) -> RenderInfo:
    """The RenderInfo of a localora infotext; one error line for any other infotext."""
    entry = parse_infotext(text)["localora"]
    if entry is None:
        raise LocaloraError(f"{where}: its infotext was not written by localora (no localora entry); only "
                            f"localora renders can be exported to this target")
    return RenderInfo.from_entry(entry, where)
