"""CLIP-T and CLIP-I with open_clip, from the CLIP model a profile names.

Scores are the raw cosine similarity of L2-normalised CLIP embeddings, in [-1, 1]. That is the
convention of the multi-LoRA papers (a CLIP-T of 0.34 is a cosine). scoring/clipscore.py gives CLIPScore
(Hessel et al. 2021: w * max(cos, 0), w = 2.5), times 100 as it is usually printed, for
comparing with papers that report it.

- CLIP-T: cosine between an image and its text prompt.
- CLIP-I: mean cosine between an image and each reference image of the LoRA concepts.

Every model source ("tiny:clip", "hf-hub:REPO" from the local HF cache, a local folder) becomes
a local folder holding open_clip_config.json + open_clip_model.safetensors, loaded through
open_clip's `local-dir:` path. Only safetensors weights are loaded, never pickles.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from PIL import Image

from localora import estimates, profiles
from localora.devices import DeviceManager, pick_device
from localora.errors import LocaloraError
from localora.files import open_image
from localora.profiles import ClipSpec

ImageLike = Union[Image.Image, str, Path]

COMPONENT = "clip"
CONFIG_FILE = "open_clip_config.json"
# open_clip prefers these names in a folder; requiring one of them keeps it off .bin/.pth files.
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")


def model_dir(spec: ClipSpec) -> Path:
    """The local folder of the CLIP model `spec` names, checked to be loadable without pickles."""
    path = profiles.locate(spec.source, f"clip '{spec.name}'")
    if not path.is_dir() or not (path / CONFIG_FILE).is_file():
        raise LocaloraError(
            f"clip '{spec.name}': {path} is not an open_clip model folder (it needs {CONFIG_FILE} "
            f"+ {WEIGHT_FILES[0]}); point `source` in models.toml at such a folder or an open_clip hub repo"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise LocaloraError(
            f"clip '{spec.name}': no {' or '.join(WEIGHT_FILES)} in {path}; localora loads only "
            f"safetensors weights (fetch the repo's {WEIGHT_FILES[0]})"
        )
    return path


def load_model(path: Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The open_clip model in `path`, in eval mode with gradients off; float32 (as the papers score)
    unless LOCALORA_DTYPE asks for another dtype."""
    import open_clip

    try:
        model = open_clip.create_model(f"local-dir:{path}", device=device)
    except (ValueError, RuntimeError, FileNotFoundError, KeyError) as e:
        raise LocaloraError(f"{path}: cannot load the open_clip model ({e})") from None
    dtype = profiles.run_dtype("float32", torch.device(device).type, cpu="float32")
    return model.to(getattr(torch, dtype)).eval().requires_grad_(False)


def empty_model(spec: ClipSpec) -> torch.nn.Module:
    """The CLIP model built from its open_clip config on the meta device, no weights read: what
    doctor asks "which attention?". A MissingError when it is not here."""
    import open_clip

    from localora import verbosity

    with verbosity.hushed(""), torch.device("meta"):  # "": open_clip warns on the root logger that no weights load
        return open_clip.create_model(f"local-dir:{model_dir(spec)}", load_weights=False, device="meta")


class ClipScorer:
    """Embeds images and texts with one open_clip model and scores them by cosine.

    With a DeviceManager the model is the component "clip" and is acquired for every batch, so
    the manager may swap it off the accelerator between calls; without one it is loaded once.
    """

    def __init__(self, path: Path, manager: DeviceManager | None = None, device: str | torch.device = "auto",
                 spec: ClipSpec | None = None):
        import open_clip

        self.path = Path(path)
        self._manager = manager
        self._own: torch.nn.Module | None = None
        self._device = pick_device(device) if isinstance(device, str) else device
        self._preprocess: Callable[[Image.Image], torch.Tensor] | None = None
        try:
            self._tokenizer = open_clip.get_tokenizer(f"local-dir:{self.path}")
        except Exception as e:  # a hub-tokenizer config (SigLIP) fails here offline
            raise LocaloraError(f"{self.path}: cannot build the CLIP tokenizer offline ({e})") from None
        if manager is not None:
            # Small: on a card that cannot hold every model it runs on the CPU (devices.py).
            manager.register(COMPONENT, lambda dev: load_model(self.path, dev), source=str(self.path),
                             describe=lambda: self.path.name, cpu_ok=True,
                             estimate=estimates.estimate_bytes(spec.source, "float32") if spec else None,
                             key=estimates.clip_key(spec) if spec else "")

    @classmethod
    def load(cls, spec: ClipSpec, manager: DeviceManager | None = None, device: str | torch.device = "auto") -> ClipScorer:
        """The scorer for a profile's CLIP spec (`profile.clip`); the model loads on first use."""
        return cls(model_dir(spec), manager=manager, device=device, spec=spec)

    # ------------------------------------------------------------------ embeddings

    def _model(self) -> torch.nn.Module:
        if self._manager is not None:
            return self._manager.acquire(COMPONENT)
        if self._own is None:
            self._own = load_model(self.path, self._device)
        return self._own

    def _transform(self, model: torch.nn.Module) -> Callable[[Image.Image], torch.Tensor]:
        # Derived from the model's own preprocess config, so a reload elsewhere cannot disagree.
        if self._preprocess is None:
            from open_clip.transform import PreprocessCfg, image_transform_v2

            self._preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
        return self._preprocess

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[ImageLike], batch_size: int = 16) -> torch.Tensor:
        """(N, D) float32 CPU tensor of L2-normalised image embeddings."""
        model = self._model()
        param = next(model.parameters())
        preprocess = self._transform(model)
        out = []
        for i in range(0, len(images), batch_size):
            pixels = torch.stack([preprocess(open_image(im)) for im in images[i : i + batch_size]])
            emb = model.encode_image(pixels.to(param.device, param.dtype)).float()
            out.append(F.normalize(emb, dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, 0)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(N, D) float32 CPU tensor of L2-normalised text embeddings (texts cut at 77 tokens)."""
        model = self._model()
        device = next(model.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self._tokenizer(list(texts[i : i + batch_size])).to(device)
            out.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, 0)

    # ------------------------------------------------------------------ scores

    def clip_t(self, image: ImageLike, text: str) -> float:
        """Cosine between `image` and `text`."""
        return self.clip_t_batch([image], text)[0]

    def clip_i(self, image: ImageLike, references: Sequence[ImageLike]) -> float:
        """Mean cosine between `image` and each reference image."""
        return self.clip_i_batch([image], references)[0]

    def clip_t_batch(self, images: Sequence[ImageLike], text: str) -> list[float]:
        """CLIP-T of several images against one prompt (e.g. every method's render of one set)."""
        if not images:
            return []
        sims = self.image_embeddings(images) @ self.text_embeddings([text]).T
        return sims[:, 0].tolist()

    def clip_i_batch(self, images: Sequence[ImageLike], references: Sequence[ImageLike]) -> list[float]:
        """CLIP-I of several images against one shared list of reference images."""
        if not references:
            raise LocaloraError("CLIP-I needs at least one reference image; give the LoRAs reference images")
        if not images:
            return []
        sims = self.image_embeddings(images) @ self.image_embeddings(references).T
        return sims.mean(dim=1).tolist()
