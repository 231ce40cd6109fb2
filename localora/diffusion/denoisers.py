"""The denoiser seam: what each family of bases does at each step, as small functions with one
shared signature, so that the methods (methods.py) are written once for every base.

    fam = family(pipe)                       # archs.ARCHS[arch].family: "unet", "flux", "zimage"
    cond = fam.encode(pipe, prompt, s, uncond)  # the prompt, per branch: (uncond, cond) or (cond,)
    run = fam.start(pipe, s, cond, seed)     # a fresh scheduler, its timesteps, the starting noise
    for t in run.timesteps:
        out = fam.predict(pipe, run, rows, t, cond, groups)   # model outputs, one per batch row
        eps = fam.guide(out.view(groups, images, branches, ...), s)  # -> one prediction per image
        rows = fam.step(run, eps, t, rows)
    latents = fam.unpacked(pipe, rows, s)    # (images, channels, h, w) for every family
    image = fam.decode(pipe, latents)
    fam.stock_kwargs(s)                      # the same settings for the stock pipeline's __call__

Batch rows are laid out group-major, then image, then branch: Composite runs k groups (one LoRA
each, per-row weights in rows.py) of one image; batched Merge one group of m images. Each family
reproduces its stock diffusers pipeline's own denoising step (same timesteps, same noise, same
guidance formula, same dtypes), so that a method written here equals the stock pipeline where
both can run it (Merge through the stock pipeline is the tests' reference).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from localora import archs
from localora.diffusion.sampling import Sampling

if TYPE_CHECKING:
    import torch
    from PIL import Image


@dataclass
class Cond:
    """A prompt's conditioning for one image: `branches` rows (uncond first for UNets, cond first
    for Z-Image), in whatever form the family's network takes."""

    branches: int
    data: dict[str, Any]
    images: int = 1  # rows per branch: 1, or one per image when text-encoder LoRAs make them differ


# Conditioning entries that do not grow with the batch (Flux's token positions and guidance).
SHARED = ("text_ids", "guidance")


def concat(conds: list[Cond]) -> Cond:
    """Several images' conditioning as one (image-major rows), for a batch whose images differ in
    their text encoders' LoRA weights."""
    import torch

    def join(key: str, values: list):
        first = values[0]
        if first is None or key in SHARED:
            return first
        if isinstance(first, dict):
            return {k: torch.cat([v[k] for v in values]) for k in first}
        if isinstance(first, list):
            return [x for v in values for x in v]
        return torch.cat(values)

    return Cond(conds[0].branches, {k: join(k, [c.data[k] for c in conds]) for k in conds[0].data},
                sum(c.images for c in conds))


@dataclass
class Run:
    """One render's schedule and starting noise (one image's latents)."""

    scheduler: Any
    timesteps: Any
    latents: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)


class Family(Protocol):
    def encode(self, pipe, prompt: str, s: Sampling, uncond: bool) -> Cond: ...
    def start(self, pipe, s: Sampling, cond: Cond, seed: int) -> Run: ...
    def predict(self, pipe, run: Run, latents: torch.Tensor, t, cond: Cond, groups: int) -> torch.Tensor: ...
    def guide(self, out: torch.Tensor, s: Sampling) -> torch.Tensor: ...
    def step(self, run: Run, eps: torch.Tensor, t, latents: torch.Tensor) -> torch.Tensor: ...
    def unpacked(self, pipe, latents: torch.Tensor, s: Sampling) -> torch.Tensor: ...
    def decode(self, pipe, latents: torch.Tensor) -> Image.Image: ...
    def stock_kwargs(self, s: Sampling) -> dict[str, Any]: ...
    def uses_uncond(self, s: Sampling, always: bool) -> bool: ...


def generator(seed: int) -> torch.Generator:
    import torch

    # Noise is drawn on the CPU so a seed gives the same start on any device.
    return torch.Generator("cpu").manual_seed(seed)


def fresh_scheduler(pipe):
    """Give the pipeline a new scheduler built from its config, and return it.

    Schedulers keep state between renders: Euler's `init_noise_sigma` is the largest sigma of the
    last `set_timesteps`, DPM++ keeps its previous model outputs and the step index, flow-matching
    Euler its step index and shifted sigmas. A new one per render makes every render independent of
    whatever ran before it in the process.
    """
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    return pipe.scheduler


def denoiser(pipe, arch: str):
    """The network the LoRAs act on (the UNet or the transformer)."""
    return getattr(pipe, archs.arch(arch).denoiser)


def _rows(x: torch.Tensor, per: int, groups: int) -> torch.Tensor:
    """Each of x's rows `per` times in a row, the whole `groups` times: the batch layout above."""
    x = x if per == 1 else x.repeat_interleave(per, 0)
    return x if groups == 1 else x.repeat(groups, *([1] * (x.dim() - 1)))


# ------------------------------------------------------------------ UNet bases (SDXL, SD1.5)

class UNetFamily:
    """Classifier-free guidance on [uncond, cond] rows; SDXL adds pooled text and size conditioning."""

    def uses_uncond(self, s: Sampling, always: bool) -> bool:
        # The stock pipelines skip the unconditional rows at guidance <= 1; Composite (always)
        # keeps them, so that eps = u + g (c - u) holds for any g.
        return always or s.guidance > 1

    def encode(self, pipe, prompt: str, s: Sampling, uncond: bool) -> Cond:
        import torch

        device = pipe.unet.device
        if getattr(pipe, "text_encoder_2", None) is not None:
            pos, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                negative_prompt=s.negative_prompt or None)
            time_ids = sdxl_time_ids(s.height, s.width, pos.dtype)
            added = {"text_embeds": torch.cat([neg_pooled, pooled]).to(device),
                     "time_ids": torch.cat([time_ids, time_ids]).to(device)}
            cond = Cond(2, {"embeds": torch.cat([neg, pos]).to(device), "added": added})
        else:
            pos, neg = pipe.encode_prompt(prompt, device, 1, True, negative_prompt=s.negative_prompt or None)
            cond = Cond(2, {"embeds": torch.cat([neg, pos]), "added": None})
        return cond if uncond else _select(cond, 1)

    def start(self, pipe, s: Sampling, cond: Cond, seed: int) -> Run:
        # Timesteps first, then the noise: prepare_latents scales it by init_noise_sigma, which
        # Euler-type schedulers derive from the schedule that is set.
        device = pipe.unet.device
        gen = generator(seed)
        scheduler = fresh_scheduler(pipe)
        scheduler.set_timesteps(s.steps, device=device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, s.height, s.width, cond.data["embeds"].dtype,
                                       device, gen)
        return Run(scheduler, scheduler.timesteps, latents, pipe.prepare_extra_step_kwargs(gen, 0.0))

    def predict(self, pipe, run: Run, latents, t, cond: Cond, groups: int):
        reps = _reps(latents, cond, groups)
        x = run.scheduler.scale_model_input(_rows(latents, cond.branches, 1), t)
        added = cond.data["added"]
        if added is not None:
            added = {k: _rows(v, 1, reps) for k, v in added.items()}
        return pipe.unet(_rows(x, 1, groups), t, encoder_hidden_states=_rows(cond.data["embeds"], 1, reps),
                         added_cond_kwargs=added, return_dict=False)[0]

    def guide(self, out, s: Sampling):
        if out.shape[1] == 1:
            return out[:, 0]
        uncond, text = out[:, 0], out[:, 1]
        return uncond + s.guidance * (text - uncond)

    def step(self, run: Run, eps, t, latents):
        return run.scheduler.step(eps, t, latents, **run.extra, return_dict=False)[0]

    def unpacked(self, pipe, latents, s: Sampling):
        return latents

    def decode(self, pipe, latents) -> Image.Image:
        """Latents to a PIL image with the pipeline's VAE (upcast where fp16 would overflow).

        The upcast is made once and kept for the pipeline's life: the stock pipelines cast the VAE
        to fp32 and back at every image (two full copies of its weights per render, and on an
        offloaded placement a new pinned CPU copy each time). The image is the same either way:
        decoding runs in fp32 in both."""
        import torch

        vae = pipe.vae
        if vae.dtype == torch.float16 and vae.config.force_upcast:
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
        return pipe.image_processor.postprocess(image.detach(), output_type="pil")[0]

    def stock_kwargs(self, s: Sampling) -> dict[str, Any]:
        return {"negative_prompt": s.negative_prompt or None, "guidance_scale": s.guidance}


def sdxl_time_ids(height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """SDXL's size and crop conditioning, as the stock pipeline builds it with its defaults:
    original size = target size = the image's (height, width), crop top-left (0, 0)."""
    import torch

    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype)


def _select(cond: Cond, branch: int) -> Cond:
    """The conditioning of one branch alone (the stock pipelines' layout without guidance)."""
    data = {k: (None if v is None else {n: t[branch:branch + 1] for n, t in v.items()} if isinstance(v, dict)
                else v[branch:branch + 1]) for k, v in cond.data.items()}
    return Cond(1, data)


def _reps(latents: torch.Tensor, cond: Cond, groups: int) -> int:
    """How often the conditioning's rows repeat in a batch of `groups` x the latents' images."""
    return latents.shape[0] // cond.images * groups


# ------------------------------------------------------------------ Flux.1

class FluxFamily:
    """Flux.1: packed 2x2 latent tokens, flow-matching Euler with a resolution-dependent shift, and
    (dev) the guidance scale as an input of the transformer: one conditional pass per step."""

    def uses_uncond(self, s: Sampling, always: bool) -> bool:
        return False

    def encode(self, pipe, prompt: str, s: Sampling, uncond: bool) -> Cond:
        import torch

        device = pipe.transformer.device
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                      num_images_per_prompt=1,
                                                      max_sequence_length=s.max_sequence_length or 512)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full([1], s.guidance, device=device, dtype=torch.float32)
        return Cond(1, {"embeds": embeds, "pooled": pooled, "text_ids": text_ids, "guidance": guidance})

    def start(self, pipe, s: Sampling, cond: Cond, seed: int) -> Run:
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        device = pipe.transformer.device
        latents, image_ids = pipe.prepare_latents(1, pipe.transformer.config.in_channels // 4, s.height, s.width,
                                                  cond.data["embeds"].dtype, device, generator(seed))
        scheduler = fresh_scheduler(pipe)
        sigmas = np.linspace(1.0, 1 / s.steps, s.steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = _shift(scheduler, latents.shape[1], calculate_shift)
        timesteps, _ = retrieve_timesteps(scheduler, s.steps, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return Run(scheduler, timesteps, latents, {"image_ids": image_ids})

    def predict(self, pipe, run: Run, latents, t, cond: Cond, groups: int):
        d = cond.data
        x = _rows(latents, 1, groups)
        n, reps = x.shape[0], _reps(latents, cond, groups)
        guidance = None if d["guidance"] is None else d["guidance"].expand(n)
        return pipe.transformer(
            hidden_states=x, timestep=t.expand(n).to(x.dtype) / 1000, guidance=guidance,
            pooled_projections=_rows(d["pooled"], 1, reps), encoder_hidden_states=_rows(d["embeds"], 1, reps),
            txt_ids=d["text_ids"], img_ids=run.extra["image_ids"], joint_attention_kwargs={}, return_dict=False,
        )[0]

    def guide(self, out, s: Sampling):
        return out[:, 0]

    def step(self, run: Run, eps, t, latents):
        return run.scheduler.step(eps, t, latents, return_dict=False)[0]

    def unpacked(self, pipe, latents, s: Sampling):
        return unpack(latents, pipe.vae_scale_factor, s.height, s.width)

    def decode(self, pipe, latents) -> Image.Image:
        import torch

        vae = pipe.vae
        latents = (latents / vae.config.scaling_factor + vae.config.shift_factor).to(vae.dtype)
        with torch.no_grad():
            image = vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image.detach(), output_type="pil")[0]

    def stock_kwargs(self, s: Sampling) -> dict[str, Any]:
        return {"guidance_scale": s.guidance, "max_sequence_length": s.max_sequence_length or 512}


def unpack(latents: torch.Tensor, vae_scale_factor: int, height: int, width: int) -> torch.Tensor:
    """Flux's packed 2x2 tokens (batch, (h/2)(w/2), 4c) back to latents (batch, c, h, w) for an
    image of height x width pixels."""
    batch, tokens, channels = latents.shape
    h2, w2 = height // (vae_scale_factor * 2), width // (vae_scale_factor * 2)
    latents = latents.view(batch, h2, w2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels // 4, h2 * 2, w2 * 2)


def _shift(scheduler, image_seq_len: int, calculate_shift: Callable) -> float:
    """The resolution-dependent shift mu, as the stock Flux and Z-Image pipelines compute it."""
    cfg = scheduler.config
    return calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))


# ------------------------------------------------------------------ Z-Image

class ZImageFamily:
    """Z-Image: a single-stream transformer over lists of per-image tokens (captions unpadded),
    flow-matching Euler, and guidance pred = c + g (c - u) whenever g > 0 (Turbo runs at 0: no
    unconditional pass). The network predicts the negated velocity; the scheduler runs in fp32."""

    def uses_uncond(self, s: Sampling, always: bool) -> bool:
        return s.guidance > 0

    def encode(self, pipe, prompt: str, s: Sampling, uncond: bool) -> Cond:
        device = pipe.transformer.device
        pos, neg = pipe.encode_prompt(prompt=prompt, device=device, do_classifier_free_guidance=uncond,
                                      negative_prompt=s.negative_prompt or None,
                                      max_sequence_length=s.max_sequence_length or 512)
        return Cond(2 if uncond else 1, {"captions": list(pos) + (list(neg) if uncond else [])})

    def start(self, pipe, s: Sampling, cond: Cond, seed: int) -> Run:
        import torch
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, retrieve_timesteps

        device = pipe.transformer.device
        latents = pipe.prepare_latents(1, pipe.transformer.in_channels, s.height, s.width, torch.float32, device,
                                       generator(seed))
        scheduler = fresh_scheduler(pipe)
        mu = _shift(scheduler, (latents.shape[2] // 2) * (latents.shape[3] // 2), calculate_shift)
        sigmas = torch.linspace(1.0, 1 / s.steps, s.steps).tolist()
        timesteps, _ = retrieve_timesteps(scheduler, s.steps, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return Run(scheduler, timesteps, latents)

    def predict(self, pipe, run: Run, latents, t, cond: Cond, groups: int):
        import torch

        x = _rows(latents.to(pipe.transformer.dtype), cond.branches, groups)
        captions = cond.data["captions"] * _reps(latents, cond, groups)
        timestep = (1000 - t.expand(x.shape[0])) / 1000
        out = pipe.transformer(list(x.unsqueeze(2).unbind(0)), timestep, captions, return_dict=False)[0]
        return torch.stack([o.float() for o in out]).squeeze(2)

    def guide(self, out, s: Sampling):
        pos = out[:, 0]
        if out.shape[1] > 1:
            pos = pos + s.guidance * (pos - out[:, 1])
        return -pos

    def step(self, run: Run, eps, t, latents):
        import torch

        return run.scheduler.step(eps.to(torch.float32), t, latents, return_dict=False)[0]

    def unpacked(self, pipe, latents, s: Sampling):
        return latents

    def decode(self, pipe, latents) -> Image.Image:
        import torch

        vae = pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        with torch.no_grad():
            image = vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(image.detach(), output_type="pil")[0]

    def stock_kwargs(self, s: Sampling) -> dict[str, Any]:
        return {"negative_prompt": s.negative_prompt or None, "guidance_scale": s.guidance,
                "cfg_normalization": False, "cfg_truncation": 1.0, "max_sequence_length": s.max_sequence_length or 512}


FAMILIES: dict[str, Family] = {"unet": UNetFamily(), "flux": FluxFamily(), "zimage": ZImageFamily()}


def family_of(arch: str) -> Family:
    return FAMILIES[archs.arch(arch).family]
