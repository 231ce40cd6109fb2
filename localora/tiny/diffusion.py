"""Tiny SDXL- and SD1.5-shaped pipelines and demo LoRAs, random but deterministic.

The shapes follow ../shared/notes/offline-models.md: ~1 M-parameter UNets that run 4 steps at
64x64 in a fraction of a second on a CPU, with real CLIP tokenizers (open_clip ships the BPE).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

_TEXT = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="gelu",
)
_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
)
_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    timestep_spacing="leading", steps_offset=1,
)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def clip_tokenizer():
    """The real CLIP BPE tokenizer (49,408 tokens), built from the vocabulary open_clip ships."""
    import open_clip
    from transformers import CLIPTokenizer

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(vocab)}, merges=merges, model_max_length=77,
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2/CLIP byte table: printable bytes map to themselves, the rest above 255.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=64,
    )


def build_sdxl(out: Path, seed: int) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **_UNET, cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=1,
    )
    text_config = CLIPTextConfig(**_TEXT)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(text_config), text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler(**_SCHEDULER),
    )
    pipe.save_pretrained(out, safe_serialization=True)


def build_sd15(out: Path, seed: int) -> None:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_UNET, cross_attention_dim=32)
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(CLIPTextConfig(**_TEXT)), tokenizer=clip_tokenizer(), unet=unet,
        scheduler=DPMSolverMultistepScheduler(**_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)


# ------------------------------------------------------------------ LoRAs

def random_lora(unet: torch.nn.Module, rank: int, seed: int, strength: float = 1.0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (A [rank, in], B [out, rank]) for every attention projection of `unet`.

    B is non-zero (unlike a fresh training init) so the LoRA visibly changes the output.
    """
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in unet.named_modules():
        linear = getattr(module, "base_layer", module)  # a UNet that already carries peft adapters
        if isinstance(linear, torch.nn.Linear) and name.endswith(LORA_TARGETS) and (".attn1." in name or ".attn2." in name):
            a = torch.randn(rank, linear.in_features, generator=g) / linear.in_features**0.5
            b = torch.randn(linear.out_features, rank, generator=g) * strength / rank**0.5
            layers[name] = (a, b)
    return layers


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """save_file, byte for byte the same on every build: safetensors writes the metadata map in its
    Rust HashMap's order, which changes from process to process; the header is rewritten with the
    metadata sorted (same length, so every offset stays)."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata or None)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header["__metadata__"].items())),
                  **{k: v for k, v in header.items() if k != "__metadata__"}}
    text = json.dumps(header, separators=(",", ":")).encode()
    Path(path).write_bytes(data[:8] + text.ljust(size) + data[8 + size:])


def save_diffusers_lora(path: Path, layers: dict, metadata: dict[str, str] | None = None,
                        component: str = "unet") -> None:
    """The diffusers/peft layout that `save_lora_weights` writes (scale 1: alpha = rank)."""
    tensors = {}
    for name, (a, b) in layers.items():
        tensors[f"{component}.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{component}.{name}.lora_B.weight"] = b.contiguous()
    save_safetensors(tensors, path, metadata)


def save_kohya_lora(path: Path, layers: dict, alpha: float, metadata: dict[str, str] | None = None) -> None:
    """The kohya-ss layout (lora_down/lora_up/alpha; effective scale alpha / rank)."""
    tensors = {}
    for name, (a, b) in layers.items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = a.contiguous()
        tensors[f"{key}.lora_up.weight"] = b.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_safetensors(tensors, path, metadata)


DEMO_LORAS = {
    # name: (category, trigger words)
    "demo-character": ("character", "demo character, red hair"),
    "demo-clothing": ("clothing", "demo clothing, blue jacket"),
    "demo-style": ("style", "demo style, watercolor"),
}


def _build_demo_loras(out: Path, seed: int, arch: str) -> None:
    from diffusers import UNet2DConditionModel

    from localora import tiny

    unet = UNet2DConditionModel.from_pretrained(tiny.ensure(arch) / "unet", use_safetensors=True)
    spec = {"sdxl": "stable-diffusion-xl-v1-base/lora", "sd15": "stable-diffusion-v1/lora"}[arch]
    kohya_base = {"sdxl": "sdxl_base_v1-0", "sd15": "sd_v1"}[arch]
    catalog = ["# The demo LoRAs of the tiny profile: random weights, real file formats.\n"]
    for i, (name, (category, triggers)) in enumerate(DEMO_LORAS.items()):
        layers = random_lora(unet, rank=4, seed=seed + 101 * (i + 1))
        path = out / f"{name}.safetensors"
        if name == "demo-character":
            # Trigger words in the modelspec header, the way modern trainers write them.
            save_diffusers_lora(path, layers, {
                "modelspec.architecture": spec, "modelspec.title": name, "modelspec.trigger_phrase": triggers,
            })
        elif name == "demo-clothing":
            # kohya-ss layout and metadata, alpha 2 on rank 4 (scale 0.5).
            freq = {f"10_{name}": {t.strip(): 10 for t in triggers.split(",")}}
            save_kohya_lora(path, layers, alpha=2.0, metadata={
                "ss_output_name": name, "ss_base_model_version": kohya_base, "ss_network_dim": "4",
                "ss_network_alpha": "2.0", "ss_tag_frequency": json.dumps(freq),
            })
        else:
            # No header metadata at all: only an A1111 sidecar knows the trigger words.
            save_diffusers_lora(path, layers)
            (out / f"{name}.json").write_text(json.dumps({"activation text": triggers, "sd version": arch.upper()}))
        catalog.append(f'[loras.{name}]\nfile = "{name}.safetensors"\ncategory = "{category}"\ntriggers = "{triggers}"\n')
    (out / "catalog.toml").write_text("\n".join(catalog))


def build_demo_loras_sdxl(out: Path, seed: int) -> None:
    _build_demo_loras(out, seed, "sdxl")


def build_demo_loras_sd15(out: Path, seed: int) -> None:
    _build_demo_loras(out, seed, "sd15")
