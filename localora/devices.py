"""One accelerator shared by the diffusion pipeline, the VLM and the CLIP scorer.

    placement   what happens when a model is needed and others are on the accelerator
    auto        (default) keep every model resident while the free memory holds the next one with
                an activation reserve; otherwise move the least recently used ones to CPU RAM
    swap        at most one model on the accelerator; the others wait in (pinned) CPU RAM
    resident    everything stays where it was loaded (large cards)
    reload      as swap, but evicted models are dropped and loaded again from disk, for machines
                whose CPU RAM cannot hold the offloaded copies

4-bit and 8-bit (bitsandbytes) models move like any other (transformers >= 5 moves their packed
weights and quantization state), so no placement but `reload` ever loads a model twice. Every
change is recorded with the model's size, its duration and the accelerator memory after it, and
announced before it starts (loads take tens of seconds on a real card); on a CPU-only machine
nothing moves, but the same sequence is recorded so the policy can be checked anywhere.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from localora.errors import LocaloraError

PLACEMENTS = ("auto", "swap", "resident", "reload")
# Working memory a model needs on top of its weights while it runs (activations, the VAE decode,
# the KV cache): a fraction of its size plus a floor. A heuristic, stated in `doctor`.
RESERVE_FRACTION = 0.25
RESERVE_BYTES = 1 << 30


@dataclass(frozen=True)
class Placement:
    """One recorded placement change, or (done=False) one about to start."""

    component: str
    action: str  # "load", "to-device", "offload", "drop"
    seconds: float
    memory_bytes: int  # allocated on the accelerator after the change (0 on CPU)
    resident: tuple[str, ...]  # components resident on the accelerator after the change
    bytes: int = 0  # the component's own size (parameters and buffers), once known
    done: bool = True
    detail: str = ""  # e.g. the quantization a VLM was actually loaded with


@dataclass
class _Component:
    load: Callable[[torch.device], Any]
    source: str
    describe: Callable[[], str] = lambda: ""
    model: Any = None
    on_device: bool = False
    size: int = 0  # bytes, measured after the first load
    estimate: int = 0  # bytes expected before the first load (0: unknown)
    used: int = 0  # when last acquired, for least-recently-used eviction


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise LocaloraError(f"device '{name}': no such CUDA device here; set the profile's device to \"auto\" or \"cpu\"")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LocaloraError(f"device '{name}': MPS is not available here; set the profile's device to \"auto\" or \"cpu\"")
    return device


def _memory(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _free_memory(device: torch.device) -> int | None:
    """Free accelerator memory in bytes; None where memory is not the accelerator's (CPU)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def footprint(model: Any) -> int:
    """Bytes of a module's (or a pipeline's modules') parameters and buffers, quantized ones as stored."""
    modules = [m for m in getattr(model, "components", {}).values() if isinstance(m, torch.nn.Module)]
    total = 0
    for module in modules or ([model] if isinstance(model, torch.nn.Module) else []):
        for t in list(module.parameters()) + list(module.buffers()):
            total += t.numel() * t.element_size()
    return total


def reserve(size: int) -> int:
    return int(RESERVE_FRACTION * size) + RESERVE_BYTES


@dataclass
class DeviceManager:
    device: torch.device = field(default_factory=pick_device)
    placement: str = "auto"
    log: Callable[[Placement], None] | None = None
    history: list[Placement] = field(default_factory=list)
    free_memory: Callable[[], int | None] | None = None  # default: the device's; injectable for tests
    _components: dict[str, _Component] = field(default_factory=dict)
    _clock: int = 0

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement {self.placement!r} is not one of {', '.join(PLACEMENTS)}")
        if self.free_memory is None:
            self.free_memory = lambda: _free_memory(self.device)

    @classmethod
    def for_profile(cls, profile: Any, log: Callable[[Placement], None] | None = None) -> DeviceManager:
        """The device and placement a profile asks for."""
        return cls(pick_device(profile.device), profile.placement, log=log)

    def register(self, name: str, load: Callable[[torch.device], Any], *, source: str = "",
                 describe: Callable[[], str] | None = None, estimate: int | None = None) -> None:
        """`load(device)` builds the component on `device`; it is called on first use only (and
        again after a drop under `reload`). `describe()` tells, after loading, what was loaded;
        `estimate` is its expected size in bytes, so `auto` can make room before a first load.

        Registering the same name and source again keeps what is loaded (several renderers may
        share one pipeline); another source replaces it, so a model is never silently reused.
        """
        old = self._components.get(name)
        if old is not None and old.source == source:
            return
        if old is not None and old.model is not None:
            self._drop(name, old)
        self._components[name] = _Component(load=load, source=source, describe=describe or (lambda: ""),
                                            estimate=estimate or 0)

    def resident(self) -> tuple[str, ...]:
        return tuple(n for n, c in self._components.items() if c.on_device)

    def sizes(self) -> dict[str, int]:
        """Measured size of each loaded component, in bytes."""
        return {n: c.size for n, c in self._components.items() if c.size}

    def acquire(self, name: str) -> Any:
        """The component `name`, resident on the accelerator, evicting others as the placement says."""
        comp = self._components[name]
        self._clock += 1
        comp.used = self._clock
        if comp.on_device:
            return comp.model
        self._make_room(name, comp)
        action = "load" if comp.model is None else "to-device"
        self._announce(name, action)
        start = time.perf_counter()
        if comp.model is None:
            comp.model = comp.load(self.device)
            comp.size = footprint(comp.model)
        else:
            comp.model = _move(comp.model, self.device)
        comp.on_device = True
        self._record(name, action, start, comp)
        return comp.model

    def _make_room(self, name: str, comp: _Component) -> None:
        others = sorted(((c.used, n) for n, c in self._components.items() if n != name and c.on_device))
        if self.placement == "resident" or not others:
            return
        if self.placement in ("swap", "reload"):
            for _, other in others:
                self._evict(other, self._components[other])
            return
        # auto: evict least recently used models until the free memory holds this one and its
        # working memory. Before a first load its size is the estimate.
        free = self.free_memory()
        if free is None:
            return  # CPU: everything already lives in RAM, nothing to gain by moving
        size = comp.size or comp.estimate
        need = size + reserve(size)
        for _, other in others:
            if free >= need:
                return
            evicted = self._components[other]
            self._evict(other, evicted)
            free = self.free_memory()

    def _evict(self, name: str, comp: _Component) -> None:
        if self.placement == "reload":
            self._drop(name, comp)
            return
        self._announce(name, "offload")
        start = time.perf_counter()
        if self.device.type != "cpu":
            comp.model = _move(comp.model, torch.device("cpu"))
        comp.on_device = False
        self._free()
        self._record(name, "offload", start, comp)

    def _drop(self, name: str, comp: _Component) -> None:
        start = time.perf_counter()
        comp.model = None
        comp.on_device = False
        self._free()
        self._record(name, "drop", start, comp)

    def _free(self) -> None:
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    def _announce(self, name: str, action: str) -> None:
        if self.log:
            comp = self._components[name]
            self.log(Placement(name, action, 0.0, _memory(self.device), self.resident(), comp.size, done=False,
                               detail=comp.source))

    def _record(self, name: str, action: str, start: float, comp: _Component) -> None:
        detail = comp.describe() if action == "load" else ""
        event = Placement(name, action, time.perf_counter() - start, _memory(self.device), self.resident(),
                          comp.size, detail=detail)
        self.history.append(event)
        if self.log:
            self.log(event)


def plan_for(sizes: dict[str, int], free: int | None, free_ram: int | None = None) -> str:
    """What `auto` will do with models of these sizes given `free` accelerator bytes, for `doctor`:
    "resident" (all fit together with working memory), "moving" (one at a time fits; the others
    wait in CPU RAM), "reload" (one at a time fits but CPU RAM cannot hold the others: set
    placement = "reload") or "too large" (even the largest alone does not fit)."""
    if free is None:
        return "resident (no accelerator: nothing moves)"
    largest = max(sizes.values(), default=0)
    if sum(sizes.values()) + reserve(largest) <= free:
        return "resident"
    if largest + reserve(largest) > free:
        return "too large"
    if free_ram is not None and sum(sizes.values()) - largest > free_ram:
        return "reload"
    return "moving"


def _move(model: Any, device: torch.device) -> Any:
    """Move a pipeline or module; CPU copies are pinned so the way back to the GPU is fast."""
    moved = model.to(device)
    moved = moved if moved is not None else model
    if device.type == "cpu" and torch.cuda.is_available():
        _pin(moved)
    return moved


def _pin(model: Any) -> None:
    modules = [m for m in getattr(model, "components", {}).values() if isinstance(m, torch.nn.Module)]
    for module in modules or [model]:
        for t in list(module.parameters()) + list(module.buffers()):
            try:
                t.data = t.data.pin_memory()
            except RuntimeError:
                return  # pinning is an optimisation; without enough page-locked memory, skip it
