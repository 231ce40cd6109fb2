"""Issue 27 items 1-6: the metadata other tools read, checked against the third-party names and
tables it concerns.

A1111 sources read (kklouzal/stable-diffusion-webui, whose modules/ are A1111's):
  modules/sd_samplers_kdiffusion.py @ 21b3bcb6f1ef108efad453119acd8afb37f1c8c9: DPM++ 2M's options hold
      {'scheduler': 'karras'}, and get_sigmas() turns "Automatic" into that option: so "Automatic"
      is not the spacing a diffusers render used.
  modules/sd_schedulers.py @ 10d3fe75e467fa3cd257e68679e3bd0a24b47e1e: the `schedulers` table (labels)
      and ddim_scheduler / simple_scheduler / uniform, restated below in timestep space.
  modules/sd_samplers_timesteps.py @ 1d2d72fbceca5dca70560a70ecefe7f60516dbde: the DDIM sampler steps on
      arange(0, 1000, 1000 // n) + 1 whatever the schedule type.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from localora.diffusion.metadata import a1111, comfyui
from localora.diffusion.metadata.info import RenderInfo

A1111_SCHEDULE_LABELS = {"Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
                         "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"}
A1111_SAMPLER_LABELS = {"DPM++ 2M", "Euler a", "Euler", "DDIM"}  # sd_samplers_kdiffusion / _timesteps tables


def info(scheduler="euler", sigmas="default", spacing="leading", steps=4, **kw) -> RenderInfo:
    base = dict(prompt="x", loras=(), weights=(), method="merge", seed=1, negative_prompt="", steps=steps,
                guidance=5.0, width=64, height=64, switch_every=None, profile="p", model="m", arch="sd15",
                source="/m", vae=None, scheduler=scheduler, sigmas=sigmas, dtype="float32", device="cpu",
                spacing=spacing)
    return RenderInfo(**{**base, **kw})


# ---- A1111's schedules, restated from modules/sd_schedulers.py (timestep indices of a 1000-step model)

def a1111_timesteps(label: str, n: int) -> list[float]:
    if label == "DDIM":
        return [float(t) for t in range(1, 1000, max(1000 // n, 1))][::-1]
    if label == "Simple":
        return [float(999 - int(i * (1000 / n))) for i in range(n)]
    if label == "Uniform":
        return [float(t) for t in np.linspace(999, 0, n)]
    raise KeyError(label)


def model_sigmas() -> np.ndarray:
    """sigma_t of SD's scaled_linear betas (0.00085 .. 0.012), as k-diffusion's wrapper holds them."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    acp = np.cumprod(1 - betas)
    return ((1 - acp) / acp) ** 0.5


def a1111_sigmas(label: str, n: int) -> np.ndarray:
    s = model_sigmas()
    lo, hi = s[0], s[-1]
    if label == "Karras":  # k_diffusion.sampling.get_sigmas_karras, rho 7
        ramp = np.linspace(0, 1, n)
        return (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    if label == "Exponential":  # get_sigmas_exponential
        return np.exp(np.linspace(math.log(hi), math.log(lo), n))
    raise KeyError(label)


def diffusers_schedule(scheduler: str, sigmas: str, spacing: str, n: int):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler)

    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  steps_offset=1, timestep_spacing=spacing)
    flags = {} if sigmas == "default" else {f"use_{sigmas}_sigmas": True}
    cls = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
           "dpmpp_2m": DPMSolverMultistepScheduler, "ddim": DDIMScheduler}[scheduler]
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if scheduler == "dpmpp_2m" else {}
    s = cls.from_config({**config, **(flags if scheduler in ("euler", "dpmpp_2m") else {}), **extra})
    s.set_timesteps(n)
    return [float(t) for t in s.timesteps], (np.asarray(s.sigmas[:n], dtype=np.float64) if hasattr(s, "sigmas") else None)


PAIRS = [(sch, sig, sp) for sch in ("euler", "euler_a", "dpmpp_2m", "ddim")
         for sig in ("default", "karras", "exponential", "beta") for sp in ("leading", "trailing", "linspace")]


@pytest.mark.parametrize("scheduler, sigmas, spacing", PAIRS)
@pytest.mark.parametrize("steps", [3, 4, 20, 30])
def test_every_schedule_label_is_explicit_and_exact_where_it_says_so(scheduler, sigmas, spacing, steps):
    """Item 1: never "Automatic" (DPM++ 2M's Automatic is Karras in A1111); an A1111 label for every
    pair; where no Note says "nearest", A1111's schedule of that label is the render's own."""
    i = info(scheduler, sigmas, spacing, steps)
    name, label = a1111.sampler(i)
    assert name in A1111_SAMPLER_LABELS and label in A1111_SCHEDULE_LABELS and label != "Automatic"
    timesteps, own_sigmas = diffusers_schedule(scheduler, sigmas, spacing, steps)
    if scheduler == "ddim":  # A1111's DDIM sampler steps on its own timesteps, whatever the schedule type
        same = timesteps == a1111_timesteps("DDIM", steps)
    elif label in ("Karras", "Exponential"):
        same = np.allclose(own_sigmas, a1111_sigmas(label, steps), rtol=1e-4)
    elif label == "Beta":
        same = False  # A1111's beta is spaced in timesteps, diffusers' in sigmas
    else:
        # On a fractional timestep k-diffusion interpolates log sigma (t_to_sigma), diffusers sigma
        # itself (np.interp): the same timesteps give the same sigmas only when they are whole.
        same = timesteps == a1111_timesteps(label, steps) and all(float(t).is_integer() for t in timesteps)
    assert a1111.exact_schedule(i) == same
    note = a1111.note(i) or ""
    assert ("nearest A1111 has" in note) == (not same)
    assert f"Schedule type: {label}," in a1111.infotext(i)


def test_the_tiny_sd15_profile_writes_an_explicit_schedule(sd15_renderer, demo_loras):
    from localora.diffusion.render import RenderJob
    from localora.diffusion.sampling import Sampling

    job = RenderJob("x", tuple(demo_loras["sd15"][:1]), (1.0,), "merge", Sampling(seed=1))
    i = sd15_renderer.info(sd15_renderer.resolve(job))
    assert (i.scheduler, i.spacing) == ("dpmpp_2m", "leading")
    assert "Schedule type: Automatic" not in a1111.infotext(i) and a1111.sampler(i)[1] == "DDIM"
    assert comfyui.sampler(i) == ("dpmpp_2m", "ddim_uniform")


def test_an_entry_written_before_the_spacing_field_reads_as_leading():
    entry = info().entry()
    del entry["spacing"]
    assert RenderInfo.from_entry(entry, "old.png").spacing == "leading"


# ------------------------------------------------------------------ items 2, 3, 6: the ComfyUI graph

def _chunk_kinds(png_bytes: bytes) -> dict[str, bytes]:
    """keyword -> chunk type, read from the raw PNG."""
    import struct

    out, pos = {}, 8
    while pos < len(png_bytes):
        length, kind = struct.unpack(">I4s", png_bytes[pos:pos + 8])
        data = png_bytes[pos + 8:pos + 8 + length]
        if kind in (b"tEXt", b"iTXt", b"zTXt"):
            out[data.partition(b"\0")[0].decode("latin-1")] = kind
        pos += 12 + length
    return out


def _merge_info(sdxl_renderer, demo_loras, prompt="x", **sampling):
    from localora.diffusion.render import RenderJob
    from localora.diffusion.sampling import Sampling

    job = RenderJob(prompt, tuple(demo_loras["sdxl"][:2]), (0.5, 1.0), "merge", Sampling(seed=3, **sampling))
    return sdxl_renderer.info(sdxl_renderer.resolve(job))


def test_the_comfyui_graph_is_ascii_json_in_a_text_chunk_whatever_the_prompt(sdxl_renderer, demo_loras):
    """Item 2: ComfyUI's SaveImage writes metadata.add_text("prompt", json.dumps(prompt)) (nodes.py @
    Comfy-Org/ComfyUI a125cd84b054a57729b5eecab930ca9408719832): ASCII JSON, so a tEXt chunk."""
    import io
    import json

    from PIL import Image

    from localora.diffusion.metadata import annotate, png_texts

    info = _merge_info(sdxl_renderer, demo_loras, prompt="ein Hund mit Hut, 帽子")
    texts = png_texts(info)
    assert texts["prompt"].isascii()
    assert json.loads(texts["prompt"])["3"]["inputs"]["text"] == "ein Hund mit Hut, 帽子"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    assert _chunk_kinds(annotate(buf.getvalue(), info))["prompt"] == b"tEXt"


@pytest.mark.parametrize("sampling, fragment", [({"guidance": 150.0}, "cfg 150"), ({"width": 8, "height": 64}, "width 8")])
def test_a_graph_comfyui_would_refuse_is_left_out_with_a_note(sdxl_renderer, demo_loras, sampling, fragment):
    """Item 6: KSampler cfg 0..100, EmptyLatentImage width/height 16..16384 (nodes.py INPUT_TYPES @
    Comfy-Org/ComfyUI a125cd84b054a57729b5eecab930ca9408719832); validate_inputs refuses values outside."""
    from localora.diffusion.metadata import comfyui, png_texts

    info = _merge_info(sdxl_renderer, demo_loras, **sampling)
    texts = png_texts(info)
    assert "prompt" not in texts
    note = a1111.parse_infotext(texts["parameters"])["fields"]["Note"]
    assert "no ComfyUI graph" in note and fragment in note
    fine = _merge_info(sdxl_renderer, demo_loras, guidance=100.0, width=16, height=16)
    assert "prompt" in png_texts(fine)
    comfyui.check(comfyui.workflow(fine), "fine")


def test_loras_and_checkpoints_in_subfolders_are_named_as_comfyui_lists_them(demo_loras, tmp_path, monkeypatch):
    """Item 3: ComfyUI's folder_paths.get_filename_list names a file by its path below models/loras
    (or models/checkpoints), A1111 its Lora folder likewise: "characters/hero.safetensors"."""
    import shutil

    from localora.diffusion.metadata.comfyui import checkpoint_name
    from localora.diffusion.metadata.info import LoraFile

    hero = tmp_path / "ComfyUI" / "models" / "loras" / "characters" / "hero.safetensors"
    hero.parent.mkdir(parents=True)
    shutil.copyfile(demo_loras["sdxl"][0].path, hero)
    assert LoraFile.of(hero).file == "characters/hero.safetensors"
    # a LoRA folder of localora's (--lora-dir, $LOCALORA_LORA_DIRS) is a root too, whatever its name
    mine = tmp_path / "my-loras" / "people" / "hero.safetensors"
    mine.parent.mkdir(parents=True)
    shutil.copyfile(hero, mine)
    monkeypatch.setenv("LOCALORA_LORA_DIRS", str(tmp_path / "my-loras"))
    assert LoraFile.of(mine).file == "people/hero.safetensors"
    ckpt = info(source=str(tmp_path / "webui" / "models" / "Stable-diffusion" / "xl" / "base.safetensors"))
    assert checkpoint_name(ckpt) == "xl/base.safetensors"


# ------------------------------------------------------------------ items 4, 5: generate --from an A1111/Forge PNG

def _stock_png(path, text):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    meta.add_text("parameters", text)
    Image.new("RGB", (32, 32)).save(path, pnginfo=meta)
    return path


def test_generate_from_checks_every_loras_hash_and_names_every_field_it_drops(demo_loras, tmp_path):
    """Item 5 (and 4): every "Lora hashes" entry is checked, A1111's addnet hash or Forge's whole-file
    sha256 (stable-diffusion-webui-forge modules/hashes.py); Hires fix, Clip skip, Schedule type and
    Model hash are named in a note; the profile's own sampler (Euler for tiny) is no difference."""
    from click.testing import CliRunner

    from localora.cli import main
    from localora.files import file_hash, safetensors_data_hash

    character, clothing = demo_loras["sdxl"][0].path, demo_loras["sdxl"][1].path
    hashes = (f"{character.stem}: {file_hash(character)[:10]}, "  # Forge's
              f"{clothing.stem}: 0123456789ab")  # neither: a LoRA of other bytes
    text = (f"a girl <lora:{character.stem}:0.6> <lora:{clothing.stem}:1.1>\n"
            f"Steps: 2, Sampler: Euler, Schedule type: Karras, CFG scale: 4.5, Seed: 11, Size: 32x32, "
            f"Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Clip skip: 2, Hires upscale: 2, "
            f"Hires upscaler: Latent, Lora hashes: \"{hashes}\", Version: f2.0.1")
    stock = _stock_png(tmp_path / "stock.png", text)
    result = CliRunner().invoke(main, ["generate", "--from", str(stock), "-o", str(tmp_path / "redo.png")])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert any("Lora hash 0123456789ab" in n and str(clothing) in n for n in notes)
    assert not any(str(character) in n for n in notes)  # Forge's hash of the right file
    for field in ("Schedule type", "Model hash", "Model", "Clip skip", "Hires upscale", "Hires upscaler"):
        assert any(n.startswith(f"note: {field}: ") for n in notes), field
    assert not any("Sampler" in n or "Version" in n for n in notes)
    assert safetensors_data_hash(character)[:12] != file_hash(character)[:12]  # two different hashes indeed
