"""The three ways to compose LoRAs at sampling time, as ../shared/notes/methods.md defines them.

    merge(pipe, adapters, weights, prompt, sampling, on_step) -> latents     one signature for all
    METHODS["switch"].order(loras)                                          the order a method wants
    decode(pipe, latents) -> PIL image

Each method takes a loaded pipeline whose adapters are already loaded and a resolved Sampling,
and returns the final latents. Merge and Switch run the stock diffusers pipeline; Composite needs
its own denoising loop because it runs the UNet once per LoRA at every step. METHODS is the one
registry: the renderer, the CLI's choices, the bench and the docs read it. To add a method, write
its function here and register it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from localora.diffusion.loras import Lora, switch_order
from localora.diffusion.pipeline import set_unet_weights, set_weights
from localora.diffusion.sampling import Sampling
from localora.errors import LocaloraError

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # torch loads on first render, so that commands without a model start fast
    import torch
    from PIL import Image

StepCallback = Callable[[int, int], None]  # (step index, total steps)


class MethodFn(Protocol):
    def __call__(self, pipe, adapters: list[str], weights: list[float], prompt: str, s: Sampling,
                 on_step: StepCallback | None = None) -> torch.Tensor: ...


def _generator(seed: int) -> torch.Generator:
    import torch

    # Noise is drawn on the CPU so a seed gives the same start on any device.
    return torch.Generator("cpu").manual_seed(seed)


def fresh_scheduler(pipe):
    """Give the pipeline a new scheduler built from its config, and return it.

    Schedulers keep state between renders: Euler's `init_noise_sigma` is the largest sigma of the
    last `set_timesteps`, DPM++ keeps its previous model outputs and the step index. A new one per
    render makes every render independent of whatever ran before it in the process.
    """
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    return pipe.scheduler


def _run_pipeline(pipe, prompt: str, s: Sampling, on_step: StepCallback | None,
                  switch: Callable | None = None) -> torch.Tensor:
    def callback(p, i, t, kwargs):
        if switch:
            switch(i)
        if on_step:
            on_step(i, s.steps)
        return {}

    fresh_scheduler(pipe)
    return pipe(
        prompt=prompt, negative_prompt=s.negative_prompt or None, num_inference_steps=s.steps,
        guidance_scale=s.guidance, width=s.width, height=s.height, generator=_generator(s.seed),
        output_type="latent", callback_on_step_end=callback,
    ).images


def merge(pipe, adapters: list[str], weights: list[float], prompt: str, s: Sampling,
          on_step: StepCallback | None = None) -> torch.Tensor:
    """LoRA Merge: all adapters active together, W' = W + sum_k w_k B_k A_k (unfused, exact)."""
    set_weights(pipe, adapters, weights)
    return _run_pipeline(pipe, prompt, s, on_step)


def merge_many(pipe, adapters: list[str], rows: list[list[float]], prompt: str, s: Sampling,
               on_step: StepCallback | None = None) -> torch.Tensor:
    """LoRA Merge of several weight vectors at once: one UNet batch whose row m (and its
    unconditional twin) uses `rows[m]` (rows.py). Every image starts from the seed's noise, as
    merge() draws it, so row m equals merge() at `rows[m]` up to float rounding. Only for
    deterministic schedulers: an ancestral step draws different noise for a batch.
    Returns latents with one row per weight vector."""
    import torch
    from diffusers.utils.torch_utils import randn_tensor

    from localora.diffusion.rows import lora_layers, row_weights

    m = len(rows)
    device = pipe.unet.device
    # 1. Prompt embeddings: text-encoder LoRA layers make them differ per weight vector.
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    per_row = any(lora_layers(e) for e in encoders)
    encoded = []
    for w in rows if per_row else rows[:1]:
        set_weights(pipe, adapters, w)
        encoded.append(_encode(pipe, prompt, s, device))
    encoded = encoded if per_row else encoded * m
    negative = torch.cat([e["embeds"][:1] for e in encoded])
    positive = torch.cat([e["embeds"][1:] for e in encoded])
    kwargs = {}
    if encoded[0]["added"] is not None:
        kwargs = {"pooled_prompt_embeds": torch.cat([e["added"]["text_embeds"][1:] for e in encoded]),
                  "negative_pooled_prompt_embeds": torch.cat([e["added"]["text_embeds"][:1] for e in encoded])}
    # 2. One image's starting noise, drawn exactly as the pipeline draws it, for every row.
    shape = (1, pipe.unet.config.in_channels, s.height // pipe.vae_scale_factor, s.width // pipe.vae_scale_factor)
    noise = randn_tensor(shape, generator=_generator(s.seed), device=device, dtype=positive.dtype)

    def callback(p, i, t, kw):
        if on_step:
            on_step(i, s.steps)
        return {}

    fresh_scheduler(pipe)
    weights = torch.tensor(rows, dtype=torch.float64)
    # 3. The stock denoising loop; classifier-free guidance batches [uncond rows, cond rows].
    with row_weights(pipe.unet, adapters) as lora_rows:
        # Stock pipelines run the unconditional rows only when guidance is on (scale > 1).
        lora_rows.weights = torch.cat([weights, weights]) if s.guidance > 1 else weights
        return pipe(
            prompt_embeds=positive, negative_prompt_embeds=negative, **kwargs, latents=noise.repeat(m, 1, 1, 1),
            num_inference_steps=s.steps, guidance_scale=s.guidance, width=s.width, height=s.height,
            generator=_generator(s.seed), output_type="latent", callback_on_step_end=callback,
        ).images


def switch_active(step: int, n: int, every: int) -> int:
    """Index of the LoRA active at denoising step `step` under LoRA Switch.

    The change happens after the scheduler step of steps every, 2*every, ..., so the first LoRA
    covers steps 0..every (every + 1 steps) and each later turn `every` steps.
    """
    return 0 if step == 0 else ((step - 1) // every) % n


def switch(pipe, adapters: list[str], weights: list[float], prompt: str, s: Sampling,
           on_step: StepCallback | None = None) -> torch.Tensor:
    """LoRA Switch: one adapter at a time, in the given order, rotating every `s.switch_every` steps.

    The prompt is encoded with only the first adapter active, as in the reference.
    """
    set_weights(pipe, [adapters[0]], [weights[0]])
    current = [0]

    def after_step(i: int) -> None:
        nxt = switch_active(i + 1, len(adapters), s.switch_every)
        if nxt != current[0]:
            set_unet_weights(pipe, [adapters[nxt]], [weights[nxt]])
            current[0] = nxt

    return _run_pipeline(pipe, prompt, s, on_step, switch=after_step)


def composite(pipe, adapters: list[str], weights: list[float], prompt: str, s: Sampling,
              on_step: StepCallback | None = None) -> torch.Tensor:
    """LoRA Composite: at every step, one UNet pass per adapter alone on [uncond, cond];
    eps = u + g (c - u) with u, c the means over adapters. Correct for any guidance g.

    The k passes run as one UNet batch of 2k rows, each row with its own LoRA (rows.py), so no
    set_adapters call happens between them; if the card runs out of memory the batch is split.
    """
    import torch

    with torch.no_grad():
        return _composite(pipe, adapters, weights, prompt, s, on_step)


def _composite(pipe, adapters: list[str], weights: list[float], prompt: str, s: Sampling,
               on_step: StepCallback | None) -> torch.Tensor:
    import torch

    from localora.diffusion.rows import is_out_of_memory, row_weights

    # 1. Encode the prompt with every LoRA active (their text-encoder layers, if any, as in Merge).
    device = pipe.unet.device
    set_weights(pipe, adapters, weights)
    cond = _encode(pipe, prompt, s, device)
    # 2. Timesteps, then the starting noise: prepare_latents scales the noise by init_noise_sigma,
    #    which Euler-type schedulers derive from the schedule that is set.
    generator = _generator(s.seed)
    scheduler = fresh_scheduler(pipe)
    scheduler.set_timesteps(s.steps, device=device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, s.height, s.width, cond["embeds"].dtype,
                                   device, generator)
    extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
    k = len(adapters)
    per_pass = k  # LoRAs in one UNet batch (2 rows each); halved if the card runs out of memory
    # 3. The denoising loop: per step, the guided mean of the k single-LoRA noise predictions.
    with row_weights(pipe.unet, adapters) as rows:
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            while True:
                try:
                    total = sum(_composite_pass(pipe, rows, x, t, cond, weights, range(j, min(j + per_pass, k)))
                                for j in range(0, k, per_pass))
                    break
                except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                    if not is_out_of_memory(e) or per_pass == 1:
                        raise
                    per_pass = max(1, per_pass // 2)
                    log.warning("composite: out of accelerator memory with %d LoRAs per UNet batch; "
                                "going on with %d", 2 * per_pass, per_pass)
            uncond, text = (total / k).chunk(2)
            eps = uncond + s.guidance * (text - uncond)
            latents = scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
            if on_step:
                on_step(i, s.steps)
    return latents


def composite_per_lora(pipe, adapters: list[str], weights: list[float], prompt: str, s: Sampling,
                       on_step: StepCallback | None = None) -> torch.Tensor:
    """Composite as the paper writes it: per step, one UNet pass per LoRA, each switched on with
    set_adapters. Kept as the reference that `composite` is tested and benchmarked against."""
    import torch

    with torch.no_grad():
        set_weights(pipe, adapters, weights)
        cond = _encode(pipe, prompt, s, pipe.unet.device)
        generator = _generator(s.seed)
        scheduler = fresh_scheduler(pipe)
        scheduler.set_timesteps(s.steps, device=pipe.unet.device)
        latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, s.height, s.width, cond["embeds"].dtype,
                                       pipe.unet.device, generator)
        extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            total = 0
            for name, w in zip(adapters, weights):
                set_unet_weights(pipe, [name], [w])
                total = total + pipe.unet(x, t, encoder_hidden_states=cond["embeds"], added_cond_kwargs=cond["added"],
                                          return_dict=False)[0]
            uncond, text = (total / len(adapters)).chunk(2)
            latents = scheduler.step(uncond + s.guidance * (text - uncond), t, latents, **extra, return_dict=False)[0]
            if on_step:
                on_step(i, s.steps)
        return latents


def _composite_pass(pipe, rows, x, t, cond: dict, weights: list[float], which: range):
    """The sum over the LoRAs in `which` of their [uncond, cond] noise predictions, in one UNet batch."""
    from localora.diffusion.rows import one_hot_rows

    n = len(which)
    rows.weights = one_hot_rows(weights, which, per_row=2)
    added = None if cond["added"] is None else {key: v.repeat(n, *([1] * (v.dim() - 1)))
                                                 for key, v in cond["added"].items()}
    out = pipe.unet(x.repeat(n, 1, 1, 1), t, encoder_hidden_states=cond["embeds"].repeat(n, 1, 1),
                    added_cond_kwargs=added, return_dict=False)[0]
    return out.view(n, 2, *out.shape[1:]).sum(0)


def sdxl_time_ids(height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's size and crop conditioning, as the stock pipeline builds it with its defaults:
    original size = target size = the image's (height, width), crop top-left (0, 0)."""
    import torch

    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype)


def _encode(pipe, prompt: str, s: Sampling, device: torch.device) -> dict:
    """Prompt embeddings for [uncond, cond], plus SDXL's pooled text and size conditioning."""
    import torch

    if getattr(pipe, "text_encoder_2", None) is not None:
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=s.negative_prompt or None)
        time_ids = sdxl_time_ids(s.height, s.width, pos.dtype)
        added = {"text_embeds": torch.cat([neg_pooled, pooled]).to(device),
                 "time_ids": torch.cat([time_ids, time_ids]).to(device)}
        return {"embeds": torch.cat([neg, pos]).to(device), "added": added}
    pos, neg = pipe.encode_prompt(prompt, device, 1, True, negative_prompt=s.negative_prompt or None)
    return {"embeds": torch.cat([neg, pos]), "added": None}


def decode(pipe, latents: torch.Tensor) -> Image.Image:
    """Latents to a PIL image with the pipeline's VAE (upcast where fp16 would overflow)."""
    import torch

    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(dtype=torch.float32)
    latents = latents.to(vae.dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    with torch.no_grad():
        image = vae.decode(latents, return_dict=False)[0]
    if upcast:
        vae.to(dtype=torch.float16)
    return pipe.image_processor.postprocess(image.detach(), output_type="pil")[0]


# ------------------------------------------------------------------ the registry

def _as_given(loras: Sequence[Lora]) -> list[int]:
    return list(range(len(loras)))


@dataclass(frozen=True)
class Method:
    name: str
    run: MethodFn
    summary: str  # one line, for --help and the docs
    # The order the method wants its LoRAs in (indices into the given list).
    order: Callable[[Sequence[Lora]], list[int]] = _as_given


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("merge", merge, "all LoRAs active at once, W' = W + sum w_k B_k A_k (unfused, exact)"),
    Method("switch", switch, "one LoRA at a time, rotating every --switch-every steps, character first",
           order=switch_order),
    Method("composite", composite, "one UNet pass per LoRA per step; the guided mean of their noise"),
)}


def get(name: str) -> Method:
    if name not in METHODS:
        raise LocaloraError(f"unknown method '{name}'; use one of {', '.join(METHODS)}")
    return METHODS[name]


def arrange(method: str, loras: Sequence[Lora], weights: Sequence[float]) -> tuple[tuple[Lora, ...], tuple[float, ...]]:
    """The LoRAs and their weights in the order `method` runs them."""
    idx = get(method).order(loras)
    return tuple(loras[i] for i in idx), tuple(weights[i] for i in idx)
