"""The GPU user's model shapes, checked on a CPU: full-size SDXL, SD1.5 and Qwen2-VL-2B with
random weights, a kohya LoRA with real key names, each method's step, and doctor's estimates.

    python scripts/check_fullsize.py [--out fullsize.json] [--skip-vlm] [--skip-forward]

1. Every component is built from its published config (scripts/fullsize/*.json) on the meta
   device: parameter counts and bytes (fp16/bf16) beside doctor's estimate (must agree within 10%).
2. The full SDXL UNet with 3 peft LoRAs (r=32 on the attention projections), on the meta device:
   LoRA-wrapped layers and the cost of one `unet.set_adapters` call (median of 5).
3. SDXL and SD1.5 pipelines with random bf16 weights: a kohya LoRA written with real key names
   (SDXL: `lora_unet_input_blocks_4_1_...` SGM names and `lora_te1_`/`lora_te2_`; SD1.5:
   `lora_unet_down_blocks_...` and `lora_te_`) loads through localora's loader with every module
   of the file applied and no unexpected key; then one step of Merge, Switch and Composite at
   128x128 through localora.diffusion.methods.
4. Qwen2-VL-2B with random bf16 weights answers one VLM call with two images through the real
   processor settings of the profile's min/max pixels (the tokenizer is localora's tiny Qwen2
   tokenizer, its special tokens mapped into the real config: the vocabulary differs, the shapes
   and the visual-token count do not).
5. Flux.1 and Z-Image (scripts/fullsize_flow.py): their components' parameters from the published
   configs beside doctor's, kohya's Flux names for every block mapped by diffusers' converter onto
   the full-size transformer, and one step of each method at full width (one block of each kind).
Prints JSON (also written to --out). Fits 24 GB; about 5-10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tomllib
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONFIGS = Path(__file__).resolve().parent / "fullsize"
RANK, ALPHA = 8, 4.0


def config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(kind: str, name: str, device: str = "meta", dtype=None):
    """A component from its config: on the meta device, or with random weights on the CPU."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if kind == "unet":
            model = UNet2DConditionModel.from_config(config(name))
        elif kind == "vae":
            model = AutoencoderKL.from_config(config(name))
        else:
            cls = CLIPTextModelWithProjection if kind == "te2" else CLIPTextModel
            model = cls(CLIPTextConfig(**config(name)))
    if device == "meta":
        return model
    return randomize(model.to(dtype=dtype))


def randomize(model):
    """Allocate a meta-built model on the CPU and fill it fast: weights N(0, 0.02), norms 1, biases 0."""
    import torch

    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(0.02).to(p.dtype))
    for module in model.modules():  # buffers such as position ids are computed, not loaded
        if hasattr(module, "position_ids") and isinstance(module.position_ids, torch.Tensor):
            module.position_ids.copy_(torch.arange(module.position_ids.shape[-1]).expand_as(module.position_ids))
    return model.eval()


# ------------------------------------------------------------------ 1. counts vs doctor

def counts() -> dict:
    from localora.estimates import BYTES, PARAMS, vlm_bytes

    parts = {
        "sdxl": {"unet": build("unet", "sdxl_unet"), "text_encoder": build("te", "clip_vit_l_text"),
                 "text_encoder_2": build("te2", "openclip_bigg_text"), "vae": build("vae", "vae")},
        "sd15": {"unet": build("unet", "sd15_unet"), "text_encoder": build("te", "clip_vit_l_text"),
                 "vae": build("vae", "vae")},
    }
    repos = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "sd15": "gsdf/Counterfeit-V2.5"}
    out = {}
    for arch, comps in parts.items():
        each = {k: params(m) for k, m in comps.items()}
        total = sum(each.values())
        estimate = PARAMS[repos[arch]]
        out[arch] = {"parameters": each, "total": total, "bytes_fp16": int(total * BYTES["float16"]),
                     "doctor_parameters": estimate, "doctor_ratio": round(estimate / total, 4)}
    vlm = qwen2_vl(device="meta")
    total = params(vlm)
    estimate = PARAMS["Qwen/Qwen2-VL-2B-Instruct"]
    out["qwen2_vl_2b"] = {"total": total, "bytes_bf16": 2 * total, "bytes_nf4_doctor": vlm_bytes("Qwen/Qwen2-VL-2B-Instruct", "nf4", "bfloat16"),
                          "doctor_parameters": estimate, "doctor_ratio": round(estimate / total, 4)}
    return out


# ------------------------------------------------------------------ 2. set_adapters cost

def set_adapters_cost() -> dict:
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    unet = build("unet", "sdxl_unet")
    names = ["character", "clothing", "style"]
    for name in names:
        unet.add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                         adapter_name=name)
    layers = sum(isinstance(m, LoraLayer) for m in unet.modules())
    times = []
    for _ in range(5):
        start = time.perf_counter()
        unet.set_adapters(names, weights=[0.8, 0.6, 1.1])
        times.append(time.perf_counter() - start)
    return {"lora_wrapped_layers": layers, "adapters": len(names),
            "set_adapters_ms_median": round(1000 * statistics.median(times), 1)}


# ------------------------------------------------------------------ 3. pipelines, kohya LoRA, methods

def kohya_lora(pipe, arch: str, path: Path) -> int:
    """A kohya LoRA over the UNet's attention blocks and every text encoder's attention and MLP
    projections, with the key names kohya writes for `arch`; returns the number of modules."""
    import torch
    from safetensors.torch import save_file

    from localora.export.keys import kohya_name

    generator = torch.Generator().manual_seed(1)
    tensors, modules = {}, 0

    def add(key: str, linear) -> None:
        nonlocal modules
        down = torch.randn(RANK, linear.in_features, generator=generator) * 0.01
        up = torch.randn(linear.out_features, RANK, generator=generator) * 0.01
        tensors.update({f"{key}.lora_down.weight": down.to(torch.float16), f"{key}.lora_up.weight": up.to(torch.float16),
                        f"{key}.alpha": torch.tensor(ALPHA)})
        modules += 1

    for name, module in pipe.unet.named_modules():
        if ".attentions." in name and isinstance(module, torch.nn.Linear) and (
                ".attn1." in name or ".attn2." in name or name.endswith(("proj_in", "proj_out")) or ".ff." in name):
            add(kohya_name("unet", name, arch), module)
    for component in ("text_encoder", "text_encoder_2") if arch == "sdxl" else ("text_encoder",):
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name and name.endswith(
                    ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")):
                add(kohya_name(component, name, arch), module)
    base = "sdxl_base_v1-0" if arch == "sdxl" else "sd_v1"
    save_file(tensors, str(path), metadata={"ss_base_model_version": base, "ss_network_dim": str(RANK),
                                            "ss_network_alpha": str(ALPHA)})
    return modules


def pipeline(arch: str):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from localora.tiny.diffusion import clip_tokenizer

    bf16 = torch.bfloat16
    unet = build("unet", f"{arch}_unet", "cpu", bf16)
    vae = build("vae", "vae", "cpu", bf16)
    te = build("te", "clip_vit_l_text", "cpu", bf16)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    if arch == "sdxl":
        te2 = build("te2", "openclip_bigg_text", "cpu", bf16)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=clip_tokenizer(),
                                         tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=clip_tokenizer(), unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Unexpected(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        text = record.getMessage()
        if "unexpected" in text.lower() or "missing" in text.lower():
            self.messages.append(text[:300])


def methods_step(arch: str, folder: Path) -> dict:
    import torch
    from peft.tuners.lora import LoraLayer

    from localora.diffusion import methods
    from localora.diffusion.loras import Lora
    from localora.diffusion.pipeline import load_adapter
    from localora.diffusion.sampling import Sampling

    start = time.perf_counter()
    pipe = pipeline(arch)
    built = time.perf_counter() - start
    out = {"build_seconds": round(built, 1)}
    names = []
    handler = _Unexpected()
    logging.getLogger().addHandler(handler)
    logging.getLogger("diffusers").addHandler(handler)
    logging.getLogger("peft").addHandler(handler)
    try:
        # Both files are written from the plain model, before peft wraps its layers.
        files = [folder / f"{arch}-kohya-{i}.safetensors" for i in range(2)]
        written = [kohya_lora(pipe, arch, path) for path in files]
        for i, (path, modules) in enumerate(zip(files, written)):
            before = {c: sum(len(m.lora_A) for m in getattr(pipe, c).modules() if isinstance(m, LoraLayer))
                      for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None}
            load_adapter(pipe, Lora(f"l{i}", path), f"l{i}", arch)
            after = {c: sum(len(m.lora_A) for m in getattr(pipe, c).modules() if isinstance(m, LoraLayer))
                     for c in before}
            applied = sum(after[c] - before[c] for c in before)
            # peft starts lora_B at zero: a layer whose weights did not come from the file stays zero.
            unloaded = sum(bool((m.lora_B[f"l{i}"].weight == 0).all()) for c in before
                           for m in getattr(pipe, c).modules() if isinstance(m, LoraLayer) and f"l{i}" in m.lora_B)
            out[f"lora_{i}"] = {"modules_in_file": modules, "modules_applied": applied - unloaded,
                                "layers_left_at_zero": unloaded,
                                "per_component": {c: after[c] - before[c] for c in before}}
            names.append(f"l{i}")
    finally:
        for name in ("", "diffusers", "peft"):
            logging.getLogger(name).removeHandler(handler)
    out["unexpected_or_missing_keys"] = handler.messages
    out["all_keys_applied"] = all(out[f"lora_{i}"]["modules_in_file"] == out[f"lora_{i}"]["modules_applied"]
                                  for i in range(2)) and not handler.messages
    s = Sampling(seed=0, steps=1, width=128, height=128, guidance=5.0, negative_prompt="")
    for method in ("merge", "switch", "composite"):
        start = time.perf_counter()
        latents = methods.METHODS[method].run(pipe, names, [0.8, 0.6], "a portrait, red jacket", s)
        out[method] = {"seconds": round(time.perf_counter() - start, 1), "latents": list(latents.shape),
                       "finite": bool(torch.isfinite(latents).all())}
    del pipe
    return out


# ------------------------------------------------------------------ 4. the VLM

def qwen2_vl(device: str = "meta"):
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from localora.tiny import vlm as tiny_vlm

    c = config("qwen2_vl_2b")
    tok = tiny_vlm.tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in tiny_vlm.SPECIAL_TOKENS}
    cfg = Qwen2VLConfig(
        text_config={**c["text_config"], "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        vision_config=c["vision_config"], tie_word_embeddings=True,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(cfg)
    if device == "meta":
        return model
    model = randomize(model.to(dtype=torch.bfloat16))
    model.tie_weights()
    return model


def vlm_call() -> dict:
    import torch
    from PIL import Image
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from localora import paths
    from localora.tiny import vlm as tiny_vlm

    two_b = tomllib.loads(paths.models_toml().read_text())["vlm"]["qwen2-vl-2b"]  # its processor caps
    start = time.perf_counter()
    model = qwen2_vl(device="cpu")
    built = time.perf_counter() - start
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=two_b["min_pixels"], max_pixels=two_b["max_pixels"]),
        video_processor=Qwen2VLVideoProcessor(), tokenizer=tiny_vlm.tokenizer(), chat_template=tiny_vlm.CHAT_TEMPLATE)
    # At the profile's smallest cap (448x448 = min_pixels: 256 visual tokens each): the prefill of a
    # random 2B model in bf16 on 2 CPU cores costs minutes per thousand tokens.
    images = [Image.new("RGB", (448, 448), (200, 40, 40)), Image.new("RGB", (448, 448), (40, 40, 200))]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "Which picture is better?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, add_vision_id=True)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    return {"build_seconds": round(built, 1), "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "visual_tokens": visual, "min_pixels": two_b["min_pixels"], "max_pixels": two_b["max_pixels"],
            "new_tokens": int(out.shape[1] - inputs["input_ids"].shape[1]),
            "generate_seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fullsize.json")
    parser.add_argument("--skip-forward", action="store_true", help="Only counts and set_adapters (part 1-2).")
    parser.add_argument("--skip-vlm", action="store_true")
    parser.add_argument("--skip-flow", action="store_true", help="Leave out Flux.1 and Z-Image (fullsize_flow.py).")
    args = parser.parse_args()
    os.environ.setdefault("LOCALORA_HOME", tempfile.mkdtemp(prefix="localora-fullsize-"))
    import resource

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.perf_counter()
    report = {"counts": counts(), "set_adapters": set_adapters_cost()}
    if not args.skip_forward:
        folder = Path(tempfile.mkdtemp(prefix="localora-fullsize-loras-"))
        report["sdxl"] = methods_step("sdxl", folder)
        report["sd15"] = methods_step("sd15", folder)
    if not args.skip_vlm and not args.skip_forward:
        report["vlm"] = vlm_call()
    if not args.skip_flow:  # Flux.1 and Z-Image: scripts/fullsize_flow.py
        import fullsize_flow

        report["flow"] = {"counts": fullsize_flow.counts(), "kohya_flux": fullsize_flow.kohya_mapping()}
        if not args.skip_forward:
            folder = Path(tempfile.mkdtemp(prefix="localora-fullsize-flow-"))
            for arch in fullsize_flow.PARTS:
                report["flow"][f"{arch}_step"] = fullsize_flow.methods_step(arch, folder)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux
    text = json.dumps(report, indent=1)
    print(text)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
