"""The renderer: (prompt, LoRAs, weights, method, seed, settings) -> image, never computed twice.

Every render is addressed by a hash of everything that decides its pixels: the model build, the
LoRA files' contents, the weights, the method and the sampling settings. A render that was made
before is read back from the cache instead of denoised again.

    CACHE/v2/xx/KEY.png    the image, with its A1111 infotext and (Merge) ComfyUI graph as PNG
                           text chunks (diffusion/metadata): every PNG a user gets is a copy of it
    CACHE/v2/xx/KEY.json   the job that made it

The chunks name the LoRA files as the render at hand called them; a hit through files of other
names (same contents, same key) rewrites the chunks, never the pixels, before the image is
served. The chunks are not part of the key, so adding them needed no new cache format.

Writing is off the denoising path (diffusion/writer.py): each image goes to a background writer
as soon as it is denoised, and render_many returns without waiting for the files.

    denoise 1 ─ denoise 2 ─ denoise 3 ─ ...                     the caller's thread
         └─ PNG encode + chunks + KEY.png, KEY.json (atomic) ─  the writer's thread (<= 4 pending)
    Rendered.path   waits for its file (and raises its write's error): every reader uses it
    Renderer.close  (or `with renderer:`) waits for all, where a command's use of it ends

LOCALORA_SYNC_WRITES=1 (or Renderer(sync_writes=True)) writes before render_many returns, as
before; the files are byte for byte the same either way.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from localora import estimates, paths, profiles
from localora.diffusion import compiling, methods
from localora.devices import DeviceManager
from localora.errors import LocaloraError, RuntimeFailure
from localora.memory import OutOfMemory
from localora.files import atomic_write, clean_temporaries, file_hash, stable_hash
from localora.diffusion.job import RenderJob  # defined torch-free, so commands build jobs before torch loads
from localora.diffusion.loras import Lora
from localora.diffusion.sampling import Sampling
from localora.diffusion.pipeline import adapter_name, as_loaded, load_adapter, load_pipeline, model_identity
from localora.diffusion import metadata
from localora.diffusion.metadata import png
from localora.diffusion.metadata.info import RenderInfo, render_info
from localora.diffusion.writer import Writer
from localora.profiles import Profile

# 2: Composite on Euler-type schedulers drew its starting noise from the previous render's
# schedule in format 1, so format-1 images may be wrong; they are never read again.
CACHE_FORMAT = 2
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rendered:
    image: Image.Image
    key: str
    file: Path  # the cache PNG; it may still be being written: read it through `path`
    cached: bool
    seconds: float
    written: Future | None = field(default=None, repr=False, compare=False)  # its background write
    writer: Writer | None = field(default=None, repr=False, compare=False)

    @property
    def path(self) -> Path:
        """The cache PNG, once it is on disk; a failed write raises its error here."""
        if self.writer is not None:
            self.writer.wait(self.written)
        return self.file


@dataclass
class RenderStats:
    renders: int = 0  # denoised
    hits: int = 0  # served from the cache
    steps: int = 0  # denoising steps run
    compiles: int = 0  # --compile: denoiser graphs compiled (the first and each recompile)
    compile_seconds: float = 0.0  # --compile: their warm-up, not counted in any render's seconds


@dataclass
class Renderer:
    profile: Profile
    devices: DeviceManager | None = None  # default: the device and placement the profile asks for
    cache_dir: Path = field(default_factory=paths.render_cache_dir)
    on_step: methods.StepCallback | None = None
    batch: int = 0  # images per UNet batch for several Merge renders; 0: from free and measured working memory
    stats: RenderStats = field(default_factory=RenderStats)
    memory: OutOfMemory = field(default_factory=OutOfMemory)  # what fits, learned at the first OOM
    # Write each cache entry before render_many returns (as before the background writer); the
    # side-by-side script and the byte-identity test use it.
    sync_writes: bool = field(default_factory=lambda: os.environ.get("LOCALORA_SYNC_WRITES", "") not in ("", "0"))
    compile: bool = False  # --compile: torch.compile the denoiser where it loads (diffusion/compiling.py)
    _identity: dict | None = None
    _writer: Writer | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._writer = Writer(depth=0 if self.sync_writes else WRITES_PENDING)
        if self.devices is None:
            self.devices = DeviceManager.for_profile(self.profile)
        retire_old_entries(self.cache_dir)
        clean_temporaries(self.cache_dir)  # left by renders killed mid-write; the cache is shared, so only old ones
        spec = as_loaded(self.profile.diffusion, self.devices.device)
        dtype = profiles.run_dtype(spec.dtype, self.devices.device.type)
        size = estimates.diffusion_bytes(spec, dtype)
        precision = dtype if spec.quantization == "none" else f"{spec.quantization}, {dtype}"
        self.devices.register("diffusion", self._load, source=repr(spec),
                              describe=lambda: f"{spec.name} ({precision})", estimate=size,
                              key=estimates.diffusion_key(spec, dtype))

    def _load(self, device: torch.device):
        pipe = load_pipeline(self.profile.diffusion, device)
        if self.compile:
            note = compiling.unavailable(device)
            if note:
                log.warning("--compile: %s; rendering without it", note)
            else:
                compiling.compile_denoiser(pipe, self.profile.diffusion.arch)
        return pipe

    # ------------------------------------------------------------ the cache

    def resolve(self, job: RenderJob) -> RenderJob:
        """The job with every setting filled in from the profile and checked."""
        methods.get(job.method)
        if not job.loras:
            raise LocaloraError("no LoRAs given: pass at least one --lora")
        if len(job.weights) != len(job.loras):
            raise LocaloraError(f"{len(job.loras)} LoRAs but {len(job.weights)} weights")
        return replace(job, sampling=job.sampling.resolved(self.profile.diffusion),
                       blocks=check_blocks(job, self.profile.diffusion.arch))

    def key(self, job: RenderJob) -> str:
        job = self.resolve(job)
        if self._identity is None:
            self._identity = model_identity(self.profile.diffusion, self.devices.device)
        described = {"prompt": job.prompt, "loras": [file_hash(lora.path) for lora in job.loras],
                     "weights": [round(float(w), 6) for w in job.weights], "method": job.method,
                     **job.sampling.describe(job.method)}
        if job.blocks:  # only then: keys of renders without block weights stay what they were
            described["blocks"] = [None if b is None else [round(float(v), 6) for v in b] for b in job.blocks]
        return stable_hash({"format": CACHE_FORMAT, "model": self._identity, "job": described})

    def cache_path(self, key: str) -> Path:
        return self.cache_dir / f"v{CACHE_FORMAT}" / key[:2] / f"{key}.png"

    # ------------------------------------------------------------ rendering

    def render(self, job: RenderJob) -> Rendered:
        return self.render_many(job, [job.weights])[0]

    def render_many(self, job: RenderJob, weight_vectors: Sequence[Sequence[float]],
                    blocks: Sequence[tuple] | None = None) -> list[Rendered]:
        """The same prompt and seed under several weight vectors (one image each, in order);
        `blocks[i]`, when given, is image i's per-LoRA block vectors (RenderJob.blocks).

        Cache misses of a Merge job are denoised together, up to `batch` images per UNet batch
        (methods.merge_many), when the scheduler is deterministic; each image is cached exactly as
        a single render would be (same key: equal up to float rounding).
        """
        job = self.resolve(job)
        start = time.perf_counter()
        jobs = [self.resolve(replace(job, weights=tuple(float(w) for w in ws),
                                     blocks=tuple(blocks[i]) if blocks is not None else job.blocks))
                for i, ws in enumerate(weight_vectors)]
        out: dict[int, Rendered] = {}
        misses: dict[str, list[int]] = {}  # key -> positions (a vector may be asked for twice)
        for i, one in enumerate(jobs):
            key = self.key(one)
            hit = self._cached(key)
            if hit is not None:
                self._label(self.cache_path(key), one)
                self.stats.hits += 1
                out[i] = Rendered(hit, key, self.cache_path(key), True, time.perf_counter() - start)
            else:
                misses.setdefault(key, []).append(i)
        todo = [jobs[positions[0]] for positions in misses.values()]
        written: list[Future] = []

        def store(one: RenderJob, image: Image.Image) -> None:
            # Handed to the writer as soon as it is denoised: its encoding overlaps the next denoise.
            key = self.key(one)
            written.append(self._writer.submit(key, self._writing(key, one, image)))
            self.stats.renders += 1

        denoise_start, warmup = time.perf_counter(), self.stats.compile_seconds
        with compiling.counted(self.stats), compiling.failures():
            images = self._denoise_all(todo, store)
        # A batch's time is shared by its images, so per-render times (and the ETA) stay comparable;
        # --compile's warm-up is not a render's time (RenderStats.compile_seconds).
        each = (time.perf_counter() - denoise_start - (self.stats.compile_seconds - warmup)) / max(len(todo), 1)
        for one, image, done in zip(todo, images, written):
            key = self.key(one)
            for n, i in enumerate(misses[key]):
                out[i] = Rendered(image, key, self.cache_path(key), n > 0, each, done, self._writer)
        return [out[i] for i in range(len(jobs))]

    def _writing(self, key: str, job: RenderJob, image: Image.Image) -> Callable[[], None]:
        """The cache entry's write: PNG encode, text chunks, KEY.png then KEY.json, each atomic.
        What it says of the job is worked out here, on the caller's thread; only bytes and files
        are left to the writer's."""
        path = self.cache_path(key)
        info, described = self.info(job), json.dumps(self._describe(job), indent=1)

        def write() -> None:
            data = encode_png(image, info)
            atomic_write(path, lambda p: p.write_bytes(data))
            atomic_write(path.with_suffix(".json"), lambda p: p.write_text(described))

        return write

    def flush(self) -> None:
        """Wait until every render's cache files are written; a failed write raises its error."""
        self._writer.flush()

    def close(self) -> None:
        """flush(), and end the writer's thread (a later render starts it again)."""
        self._writer.close()

    def __enter__(self) -> Renderer:
        return self

    def __exit__(self, kind, error, trace) -> None:
        # With an error in flight the pending writes still finish; a failed one is only logged then.
        self._writer.settle(failing=kind is not None)

    def _cached(self, key: str) -> Image.Image | None:
        self._writer.settled(key)  # a render of this key still being written, by this renderer or another
        path = self.cache_path(key)
        if not path.is_file():
            return None
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError:
            path.unlink(missing_ok=True)  # a damaged cache entry is rendered again
            return None

    def info(self, job: RenderJob) -> RenderInfo:
        """What the exports say of this render (job resolved)."""
        return render_info(job.prompt, [lora.path for lora in job.loras], list(job.weights), job.method,
                           job.sampling, self.profile, self.devices.device.type, job.blocks)

    def _label(self, path: Path, job: RenderJob) -> None:
        """Give a cached PNG this job's text chunks if it lacks them (made before localora wrote
        them) or names the LoRAs otherwise; its pixels are copied as they are."""
        texts = metadata.png_texts(self.info(job))
        try:
            have = png.text_chunks(path)
            if all(have.get(k) == v for k, v in texts.items()):
                return
            data = png.with_text(path.read_bytes(), texts, str(path))
            atomic_write(path, lambda p: p.write_bytes(data))
        except (OSError, LocaloraError) as e:  # a read-only shared cache still serves its images
            log.warning("render cache %s: cannot write its metadata (%s); the image is served without it", path, e)

    def batchable(self, job: RenderJob) -> bool:
        return job.method == "merge" and self.profile.diffusion.scheduler not in STOCHASTIC_SCHEDULERS

    def _denoise_all(self, jobs: list[RenderJob],
                     done: Callable[[RenderJob, Image.Image], None] = lambda job, image: None) -> list[Image.Image]:
        """The jobs' images in order; `done(job, image)` is told of each as soon as it is made."""
        images: list[Image.Image] = []
        if len(jobs) < 2 or not self.batchable(jobs[0]):
            for one in jobs:
                images.append(self._denoise(one))
                done(one, images[-1])
            return images
        while len(images) < len(jobs):
            size = self.memory.merge_batch(self.batch or self._auto_batch(jobs[0].sampling))
            chunk = jobs[len(images):len(images) + size]
            try:
                with self._measuring(chunk[0].sampling, len(chunk)):
                    made = self._denoise_batch(chunk)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                self.memory.shrink_merge(len(chunk), e)  # kept for the run; re-raises all but an OOM
                continue
            images += made
            for one, image in zip(chunk, made):
                done(one, image)
        return images

    def _auto_batch(self, s: Sampling) -> int:
        """Images per Merge batch: what the free memory holds at the working memory per image
        measured on the first render at this size (that render runs alone); 4 on a CPU."""
        if self.devices.device.type != "cuda":
            return 4
        per_image = self.memory.activations.get((s.width, s.height))
        return 1 if per_image is None else batch_size(self.devices.free_memory() or 0, per_image)

    @contextmanager
    def _measuring(self, s: Sampling, images: int):
        """Measure the accelerator's peak working memory per image of the renders inside."""
        device = self.devices.device
        if device.type != "cuda":
            yield
            return
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield
        per_image = (torch.cuda.max_memory_allocated(device) - before) // max(images, 1)
        key = (s.width, s.height)
        self.memory.activations[key] = max(self.memory.activations.get(key, 0), int(per_image))

    def _denoise(self, job: RenderJob) -> Image.Image:
        """One render; out of memory, it falls back (memory.OutOfMemory.fall_back) and tries again."""
        while True:
            try:
                return self._denoise_once(job)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                self.memory.fall_back(e, self._fallbacks())

    def _fallbacks(self) -> list[tuple[str, Callable[[], bool]]]:
        """What a render that ran out of memory tries, in order: each says whether it changed anything."""
        def tiling() -> bool:
            vae = self.devices.acquire("diffusion").vae
            if getattr(vae, "use_tiling", True) and getattr(vae, "use_slicing", True):
                return False
            vae.enable_tiling()  # decode in tiles, and one image at a time
            vae.enable_slicing()
            return True

        return [("VAE tiling and slicing", tiling),
                ("the other models moved off the card", lambda: self.devices.offload_others("diffusion"))]

    def _denoise_once(self, job: RenderJob) -> Image.Image:
        pipe = self.devices.acquire("diffusion")
        names = [self._adapter(pipe, lora) for lora in job.loras]
        method = methods.get(job.method)
        # Composite keeps the LoRAs per denoiser batch that fit for the rest of the run.
        split = {"split": self.memory} if job.method == "composite" else {}
        latents = method.run(pipe, names, [float(w) for w in job.weights], job.prompt, job.sampling, self._step,
                             blocks=job.blocks or None, **split)
        _check_finite(latents, job)
        return methods.decode(pipe, latents)

    def _denoise_batch(self, jobs: list[RenderJob]) -> list[Image.Image]:
        pipe = self.devices.acquire("diffusion")
        names = [self._adapter(pipe, lora) for lora in jobs[0].loras]
        if len(jobs) == 1:
            return [self._denoise(jobs[0])]
        latents = methods.merge_many(pipe, names, [list(j.weights) for j in jobs], jobs[0].prompt,
                                     jobs[0].sampling, self._step,
                                     blocks=[j.blocks or None for j in jobs] if any(j.blocks for j in jobs) else None)
        _check_finite(latents, jobs[0])
        return [methods.decode(pipe, latents[i:i + 1]) for i in range(len(jobs))]

    def _step(self, i: int, total: int) -> None:
        self.stats.steps += 1
        if self.on_step:
            self.on_step(i, total)

    def _adapter(self, pipe, lora: Lora) -> str:
        # The pipeline itself knows what it has loaded; several renderers may share it.
        name = adapter_name(file_hash(lora.path))
        if not any(name in names for names in pipe.get_list_adapters().values()):
            load_adapter(pipe, lora, name, self.profile.diffusion.arch)
        return name

    def pipeline(self):
        """The loaded pipeline (for tests and tools that inspect it)."""
        return self.devices.acquire("diffusion")

    def adapters_for(self, loras: Sequence[Lora]) -> list[str]:
        """Adapter names of these LoRAs, loading any not loaded yet."""
        pipe = self.pipeline()
        return [self._adapter(pipe, lora) for lora in loras]

    def _describe(self, job: RenderJob) -> dict:
        d = asdict(job)
        d["loras"] = [{"name": lora.name, "path": str(lora.path), "sha256": file_hash(lora.path)} for lora in job.loras]
        d["profile"] = self.profile.name
        return d


def check_blocks(job: RenderJob, arch: str) -> tuple[tuple[float, ...] | None, ...]:
    """The job's block vectors, checked against the base's layout; () when no LoRA has one."""
    from localora.diffusion import blocks as blocklib

    if not blocklib.any_blocks(job.blocks):
        return ()
    names = blocklib.layout(arch, f"block weights on {job.loras[0].path if len(job.loras) == 1 else 'these LoRAs'}")
    if len(job.blocks) != len(job.loras):
        raise LocaloraError(f"{len(job.loras)} LoRAs but {len(job.blocks)} block vectors")
    for lora, b in zip(job.loras, job.blocks):
        if b is not None and len(b) != len(names):
            raise LocaloraError(f"{lora.path}: lbw= has {len(b)} values but the layout of this base has {len(names)} "
                                f"({' '.join(names)}); give {len(names)} values or a preset")
    return tuple(None if b is None else tuple(float(v) for v in b) for b in job.blocks)


def _check_finite(latents: torch.Tensor, job: RenderJob) -> None:
    """A render with NaN or Inf must fail, not decode to a black image and enter the cache."""
    if not bool(torch.isfinite(latents).all()):
        files = ", ".join(str(lora.path) for lora in job.loras)
        raise RuntimeFailure(f"render failed: NaN/Inf in the latents with the LoRAs {files}; one may hold NaN/Inf "
                            f"weights (check each alone with `localora generate`), or half precision overflowed")


def encode_png(image: Image.Image, info: RenderInfo) -> bytes:
    """The cache PNG's bytes: the image and its text chunks (diffusion/metadata)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return metadata.annotate(buf.getvalue(), info)


# Cache writes pending at most (each holds one decoded image): the writer keeps up with the
# denoiser as long as one encode is shorter than one render.
WRITES_PENDING = 4

# Ancestral samplers draw fresh noise at every step, and a batch draws it differently from single
# renders: their renders are never batched, so a batch and a single render stay equal.
STOCHASTIC_SCHEDULERS = ("euler_a",)


def batch_size(free: int, per_image: int, most: int = 8) -> int:
    """Images per batch that `free` bytes hold at `per_image` bytes of working memory each (measured;
    an out-of-memory batch is still split, and the split kept for the run)."""
    return int(max(1, min(most, free // max(per_image, 1))))


def retire_old_entries(cache_dir: Path) -> int:
    """Delete render-cache entries of format 1 (stored as DIR/xx/KEY.png, before formats had
    their own folder); says so once, since afterwards there are none. Returns how many."""
    old = [d for d in cache_dir.glob("??") if d.is_dir() and re.fullmatch(r"[0-9a-f]{2}", d.name)]
    count = sum(1 for d in old for _ in d.glob("*.png"))
    for d in old:
        shutil.rmtree(d, ignore_errors=True)  # another process may be retiring them too
    if count:
        log.warning("render cache %s: removed %d image(s) made by an older localora (Composite on SDXL could "
                    "start from the wrong noise there); they are rendered again when needed", cache_dir, count)
    return count
