"""The diffusion bases localora renders, each declared once: every method, the loader, the LoRA
reader, the exports, doctor and the tiny builders read these facts instead of asking "is it SDXL?".

    ARCHS["flux"].denoiser       "transformer"      the pipeline attribute the LoRAs live on
    ARCHS["flux"].guidance       "distilled"        cfg | distilled | none (see GUIDANCE)
    ARCHS["zimage"].size_multiple  16               image sides must be multiples of this
    arch("flux")                 the entry, or one error line naming the known ones
    LORA_BASES                   every base a LoRA file may be recognised as (these and the
                                 ones localora only names to refuse)

Adding a base is one entry here, one denoiser family in diffusion/denoisers.py, one profile in
models.toml and one tiny builder. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from localora.errors import LocaloraError

# How a base is steered towards the prompt:
#   cfg        classifier-free guidance: an unconditional pass beside the conditional one, mixed by
#              the guidance scale (SDXL, SD1.5; Z-Image when its scale is above 0)
#   distilled  the guidance scale is an input of the model (Flux.1 [dev]'s guidance embedding):
#              one conditional pass, no negative prompt; a model without the embedding
#              ([schnell]) ignores the scale
GUIDANCE = ("cfg", "distilled")


@dataclass(frozen=True)
class Arch:
    name: str  # models.toml's `arch`
    label: str  # what a person calls it
    pipeline: str  # the diffusers pipeline class
    denoiser: str  # the pipeline attribute holding the denoising network: "unet" or "transformer"
    text_encoders: tuple[str, ...]  # pipeline attributes, in order
    guidance: str  # one of GUIDANCE
    flow: bool  # flow matching (FlowMatchEulerDiscreteScheduler, shifted sigmas) or DDPM-type
    size_multiple: int  # VAE downscale x latent packing
    family: str  # the denoiser family in diffusion/denoisers.py
    # kohya's LoRA name prefix per component, as kohya's sd-scripts (and ComfyUI's loader) write them
    kohya_prefixes: dict[str, str] = field(default_factory=dict)
    kohya_base: str = ""  # kohya's ss_base_model_version
    modelspec: str = ""  # modelspec.architecture of a LoRA
    negative_prompt: bool = True  # whether a negative prompt means anything
    cfg_offset: float = 0.0  # guidance scale + this = the classic CFG scale (Z-Image's c + g (c - u): 1)
    # What `localora generate --method composite` means on this base (README, --help)
    composite_note: str = ""
    # Components a spec's `quantization` (nf4/int8) applies to: the denoiser and the large text encoder
    quantize: tuple[str, ...] = ()


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("sdxl", "SDXL", "StableDiffusionXLPipeline", "unet", ("text_encoder", "text_encoder_2"), "cfg", False, 8,
         "unet", {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
         "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", quantize=("unet",)),
    Arch("sd15", "SD1.5", "StableDiffusionPipeline", "unet", ("text_encoder",), "cfg", False, 8,
         "unet", {"unet": "lora_unet_", "text_encoder": "lora_te_"}, "sd_v1", "stable-diffusion-v1/lora", quantize=("unet",)),
    Arch("flux", "Flux.1", "FluxPipeline", "transformer", ("text_encoder", "text_encoder_2"), "distilled", True, 16,
         "flux", {"transformer": "lora_unet_", "text_encoder": "lora_te1_"}, "flux1", "flux-1-dev/lora",
         negative_prompt=False,
         composite_note="no unconditional pass: the mean of the k single-LoRA predictions, guidance embedded",
         quantize=("transformer", "text_encoder_2")),
    Arch("zimage", "Z-Image", "ZImagePipeline", "transformer", ("text_encoder",), "cfg", True, 16,
         "zimage", {"transformer": "lora_unet_"}, "zimage", "z-image/lora", cfg_offset=1.0,
         composite_note="the guided mean of the k single-LoRA predictions; Turbo (scale 0) runs no unconditional pass",
         quantize=("transformer", "text_encoder")),
)}

# Bases a LoRA file can be recognised as: the rendered ones, and others named only to refuse them.
LORA_BASES = {**{a.name: a.label for a in ARCHS.values()}, "sd2": "SD2", "sd3": "SD3", "qwenimage": "Qwen-Image",
              "flux2": "Flux.2"}


def arch(name: str) -> Arch:
    if name not in ARCHS:
        raise LocaloraError(f"unknown base '{name}'; localora renders {', '.join(ARCHS)}")
    return ARCHS[name]


def label(name: str | None) -> str:
    return LORA_BASES.get(name or "", "unknown")


def article(label_: str) -> str:
    """'a' or 'an' before a base's name as it is read aloud (an SDXL, a Flux.1, an SD1.5)."""
    return "an" if label_[:1] in "AEFHILMNORSX" and not label_.startswith(("Fl", "Fu")) else "a"
