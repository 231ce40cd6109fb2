"""A short runnable diffusers script that redoes a render: the render outside localora.

    diffusers_script(info, source=None, lora_paths=None) -> str

The script loads the profile's pipeline (local files only, as localora does), the scheduler
localora used, each LoRA file as a named adapter, sets the adapters' weights and renders with the
same seed (noise drawn on the CPU), steps, guidance, size and negative prompt, in the dtype the
render ran in. A Merge render comes out as localora rendered it; Switch and Composite need
localora's own denoising loop, so for them the script renders the Merge of the same weights and
says so at its top.
"""

from __future__ import annotations

from pathlib import Path

from localora import archs
from localora.diffusion.metadata.info import RenderInfo

# localora's scheduler -> the diffusers class and the from_config arguments pipeline.py uses.
SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", ""),
    "euler_a": ("EulerAncestralDiscreteScheduler", ""),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", ', algorithm_type="dpmsolver++", solver_order=2'),
    "ddim": ("DDIMScheduler", ""),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", ""),
}
# Pipeline arguments that only some bases take.
LOAD_KWARGS = {"sdxl": ", add_watermarker=False", "sd15": ", safety_checker=None, requires_safety_checker=False"}


def diffusers_script(info: RenderInfo, source: str | None = None, lora_paths: list[Path] | None = None,
                     out: str = "render.png") -> str:
    """`source`: where the model is (default the profile's source); `lora_paths`: the LoRA files
    (default their file names, next to the script)."""
    base = archs.arch(info.arch)
    cls = base.pipeline
    scheduler, extra = SCHEDULERS[info.scheduler]
    paths = [str(p) for p in lora_paths] if lora_paths else [x.file for x in info.loras]
    names = [f"lora{i}" for i in range(len(info.loras))]
    kwargs = LOAD_KWARGS.get(info.arch, "")
    warning = "" if info.reproducible_elsewhere else (
        f"# NOTE: this was a localora {info.method} render; diffusers' stock pipeline runs the LoRAs merged,\n"
        f"# so this script renders the Merge of the same weights, not the same image.\n")
    vae = ""
    if info.vae:
        vae = (f"pipe.vae = AutoencoderKL.from_pretrained({info.vae!r}, **{{DTYPE: dtype}}, "
               f"local_files_only=True)\n")
    loads = "".join(f"pipe.load_lora_weights({p!r}, adapter_name={n!r})  # sha256 {x.sha256}\n"
                    for p, n, x in zip(paths, names, info.loras))
    loader = "from_single_file" if str(source or info.source).endswith(".safetensors") else "from_pretrained"
    call = [f"prompt={info.prompt!r}"]
    if base.negative_prompt:
        call.append(f"negative_prompt={(info.negative_prompt or None)!r}")
    call += [f"num_inference_steps={info.steps}", f"guidance_scale={float(info.guidance)!r}"]
    if info.arch == "zimage":
        call += ["cfg_normalization=False", "cfg_truncation=1.0"]
    if info.max_sequence_length:
        call.append(f"max_sequence_length={info.max_sequence_length}")
    call += [f"width={info.width}", f"height={info.height}", f"generator=torch.Generator(\"cpu\").manual_seed({info.seed})"]
    arguments = "".join(f"    {a},\n" for a in call)
    return f'''"""Redo a localora render with diffusers: {info.method}, profile {info.profile}, model {info.model}."""
{warning}import diffusers
import torch
from diffusers import AutoencoderKL, {cls}, {scheduler}

dtype = torch.{info.dtype}
# diffusers 0.40 renamed from_pretrained's torch_dtype to dtype (the old name warns); older releases know only torch_dtype.
DTYPE = "dtype" if tuple(int(x) for x in diffusers.__version__.split(".")[:2]) >= (0, 40) else "torch_dtype"
pipe = {cls}.{loader}({str(source or info.source)!r}, **{{DTYPE: dtype}}, local_files_only=True{kwargs})
{vae}pipe.scheduler = {scheduler}.from_config(pipe.scheduler.config{extra})
{loads}pipe.set_adapters({names!r}, adapter_weights={[float(w) for w in info.weights]!r})
pipe = pipe.to({info.device!r})
image = pipe(
{arguments}).images[0]
image.save({out!r})
'''
