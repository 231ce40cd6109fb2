"""Full-size models of a profile with random weights, written as local model folders, for
`bench_gpu.py --random-fullsize`: the real shapes, memory and speed without a model hub.

    profile, loras = write(folder, "sdxl-realistic", dtype, smoke=False)

    FOLDER/diffusion/   an SDXL pipeline: UNet, VAE and both text encoders from the published
                        configs in scripts/fullsize/ (the VAE config keeps force_upcast, so an fp16
                        run exercises the renderer's one-time VAE upcast); tokenizers are
                        localora's tiny CLIP tokenizer (same vocabulary size, other merges)
    FOLDER/vlm/         the profile's VLM (Qwen2-VL or Qwen2.5-VL) from localora/configs, saved in
                        bf16; the loader quantizes it (nf4) at load where bitsandbytes can
    FOLDER/clip/        open_clip ViT-L-14 (CLIP-L) with its built-in config, random init
    FOLDER/loras/       k LoRAs of rank r on the attention projections (to_q/k/v/out.0) of the UNet

The returned Profile is the named profile with these folders as its sources, so the run goes
through exactly the loaders and the placement a downloaded profile uses.

A random VLM under a JSON grammar writes every string to its longest allowed length (thousands of
tokens per answer: an hour per compose on a GPU, days on a CPU). Its saved generation config
therefore biases the closing quote up (sequence_bias), so answers are short, as a trained
model's are; the grammar still decides what is valid. The token counts are reported as measured.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

FULLSIZE = Path(__file__).resolve().parent / "fullsize"
CONFIGS = Path(__file__).resolve().parent.parent / "localora" / "configs"
# The published rotary settings of the Qwen2-VL/Qwen2.5-VL language models (head width 128).
QWEN_ROPE = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}
LORA_RANK, LORA_COUNT = 32, 3


# Smoke runs on a CPU: images reach the VLM at 56x56 (4 visual tokens each) instead of the
# profile's 448x448 and up (256+ each), and the VLM runs in bf16: bitsandbytes' 4-bit CPU kernels
# are slower than plain bf16 matrix products there. Everything else is the profile's.
SMOKE_PIXELS = 56 * 56


def write(folder: Path, profile_name: str, dtype, smoke: bool, vlm_name: str | None = None, build: bool = True):
    """(profile, loras): the profile's full-size models with random weights under `folder`
    (written unless `build` is False: a folder an earlier call wrote)."""
    from localora.profiles import load_catalog

    catalog = load_catalog()
    base = catalog.get(profile_name, "qwen2-vl-2b" if smoke else vlm_name)
    if base.diffusion.arch != "sdxl":
        from localora.errors import LocaloraError

        raise LocaloraError(f"--profile {profile_name}: --random-fullsize builds SDXL profiles only "
                            f"(scripts/check_fullsize.py covers the others' shapes)")
    folder.mkdir(parents=True, exist_ok=True)
    loras = write_sdxl(folder / "diffusion", folder / "loras", dtype, build)
    if build:
        write_vlm(folder / "vlm", base.vlm.source, base.vlm.min_pixels, base.vlm.max_pixels)
        write_clip(folder / "clip")
    diffusion = replace(base.diffusion, name=f"{base.diffusion.name}-random", source=str(folder / "diffusion"),
                        vae=None)
    vlm = replace(base.vlm, name=f"{base.vlm.name}-random", source=str(folder / "vlm"))
    if smoke:
        diffusion = replace(diffusion, width=64, height=64, steps=1)
        vlm = replace(vlm, min_pixels=SMOKE_PIXELS, max_pixels=SMOKE_PIXELS)
        import torch

        if not torch.cuda.is_available():
            vlm = replace(vlm, quantization="none")
    profile = replace(base, name=f"{base.name}-random", diffusion=diffusion, vlm=vlm,
                      clip=replace(base.clip, name=f"{base.clip.name}-random", source=str(folder / "clip")))
    return profile, loras


NAMES = (("character", "character"), ("clothing", "clothing"), ("style", "style"))[:LORA_COUNT]


def write_sdxl(out: Path, lora_dir: Path, dtype, build: bool = True) -> list:
    """The SDXL pipeline in `dtype`, and LORA_COUNT LoRAs of rank LORA_RANK for its UNet."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    import check_fullsize as cf
    from localora.diffusion.loras import Lora
    from localora.tiny.diffusion import clip_tokenizer, random_lora, save_diffusers_lora

    loras = [Lora(f"random-{name}", lora_dir / f"random-{name}.safetensors", category=category,
                  triggers=f"{name} trigger") for name, category in NAMES]
    if not build:
        return loras
    pipe = StableDiffusionXLPipeline(
        vae=cf.build("vae", "vae", "cpu", dtype), text_encoder=cf.build("te", "clip_vit_l_text", "cpu", dtype),
        text_encoder_2=cf.build("te2", "openclip_bigg_text", "cpu", dtype), tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(), unet=cf.build("unet", "sdxl_unet", "cpu", dtype),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1))
    pipe.save_pretrained(out, safe_serialization=True)
    lora_dir.mkdir(parents=True, exist_ok=True)
    for i, lora in enumerate(loras):
        layers = {k: (a.to(torch.float16), b.to(torch.float16))
                  for k, (a, b) in random_lora(pipe.unet, LORA_RANK, seed=10 + i, strength=0.5).items()}
        save_diffusers_lora(lora.path, layers, {"ss_base_model_version": "sdxl_base_v1-0"})
    return loras


def vlm_config(source: str) -> dict:
    """The published config of a Qwen2-VL/Qwen2.5-VL model, with its text part under text_config."""
    c = json.loads((CONFIGS / f"{source.replace('/', '--')}.json").read_text())
    if source == "Qwen/Qwen2-VL-2B-Instruct":
        c = json.loads((FULLSIZE / "qwen2_vl_2b.json").read_text())
    if "text_config" not in c:
        text = {k: v for k, v in c.items() if k not in ("architectures", "model_type", "vision_config", "torch_dtype")}
        c = {"model_type": c["model_type"], "vision_config": c["vision_config"],
             "text_config": {**text, "rope_parameters": QWEN_ROPE, "max_position_embeddings": 32768},
             "tie_word_embeddings": c.get("tie_word_embeddings", False)}
    return c


def write_vlm(out: Path, source: str, min_pixels: int, max_pixels: int) -> None:
    import torch
    from transformers import (GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    import check_fullsize as cf
    from localora.errors import LocaloraError
    from localora.tiny import vlm as tiny_vlm

    c = vlm_config(source)
    kinds = {"qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, tiny_vlm.SPECIAL_TOKENS),
             "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                            tiny_vlm.SPECIAL_TOKENS_2_5)}
    if c["model_type"] not in kinds:
        raise LocaloraError(f"VLM {source}: --random-fullsize builds Qwen2-VL and Qwen2.5-VL; pick one with --vlm")
    config_cls, model_cls, processor_cls, specials = kinds[c["model_type"]]
    tok = tiny_vlm.tokenizer(specials, tiny_vlm.CHAT_TEMPLATE)
    ids = tiny_vlm._qwen_ids(tok)
    config = config_cls(
        text_config={**c["text_config"], "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        vision_config=c["vision_config"], tie_word_embeddings=c.get("tie_word_embeddings", False),
        **tiny_vlm._token_ids(ids))
    with torch.device("meta"):
        model = model_cls(config)
    model = cf.randomize(model.to(dtype=torch.bfloat16))
    model.tie_weights()
    quote = tok.convert_tokens_to_ids('"')
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"], do_sample=False, sequence_bias=[[[quote], 20.0]])
    model.save_pretrained(out, safe_serialization=True)
    processor_cls(image_processor=Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels),
                  video_processor=Qwen2VLVideoProcessor(), tokenizer=tok,
                  chat_template=tiny_vlm.CHAT_TEMPLATE).save_pretrained(out)
    del model


def write_clip(out: Path) -> None:
    """open_clip's ViT-L-14 (the profile's CLIP-L), its built-in config, random init."""
    import open_clip

    from localora.tiny import clip as tiny_clip

    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": open_clip.get_model_config("ViT-L-14"), "preprocess_cfg": tiny_clip.PREPROCESS_CFG}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    import torch
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(f"local-dir:{out}")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(out / "open_clip_model.safetensors"))


if __name__ == "__main__":
    # Run by bench_fullsize.py in a child process, so the memory of building is given back
    # before the measured run starts: FOLDER PROFILE DTYPE SMOKE(0/1) [VLM].
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    folder, name, dtype, smoke = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4] == "1"
    write(Path(folder), name, dtype, smoke, sys.argv[5] if len(sys.argv) > 5 else None)
    (Path(folder) / "built.json").write_text(json.dumps(sys.argv[2:]) + "\n")
