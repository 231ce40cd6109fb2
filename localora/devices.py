"""One accelerator shared by the diffusion pipeline, the VLM and the CLIP scorer.

    placement   what happens when a model is needed and others are on the accelerator
    auto        (default) keep every model resident while the free memory holds the one about to
                run and its working memory; otherwise move the least recently used ones to CPU
                RAM. A small model registered with `cpu_ok` (CLIP) runs on the CPU instead when
                the card cannot hold every model at once, so it never pushes a large one off
    swap        at most one model on the accelerator; the others wait in (pinned) CPU RAM
    resident    everything stays where it was loaded (large cards)
    reload      as swap, but evicted models are dropped and loaded again from disk, for machines
                whose CPU RAM cannot hold the offloaded copies

4-bit and 8-bit (bitsandbytes) models move like any other (transformers >= 5 moves their packed
weights and quantization state), so no placement but `reload` ever loads a model twice. Every
change is recorded with the model's size, its duration and the accelerator memory after it, and
announced before it starts (loads take tens of seconds on a real card); on a CPU-only machine
nothing moves, but the same sequence is recorded so the policy can be checked anywhere.

Free memory is the driver's free memory plus the blocks PyTorch's caching allocator holds but
does not use (a moved-off model's memory lands there and is reused without a round trip to the
driver), so `gc.collect()` + `empty_cache()` run only when memory is actually short. A model's
size is measured at its first load (quantization state included) and kept in the home
(estimates.remember), so the next run plans with it from the start. CPU copies of moved-off
models are pinned once and reused at every later move.

    free_memory(), release(), measure(name, model)   injectable: the planner and the tests give a
                                                     simulated card (SimulatedCard)
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from localora import estimates
from localora.errors import LocaloraError

PLACEMENTS = ("auto", "swap", "resident", "reload")


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
    device: str = ""  # the device type the models run on ("cuda", "mps", "cpu"), for the live view's label


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
    key: str = ""  # the footprint store's key (estimates.footprint_key); "": not kept
    cpu_ok: bool = False  # small enough to run on the CPU when the card is short
    on_cpu: bool = False  # runs on the CPU for the rest of the run (cpu_ok and the card was short)
    pinned: dict[str, torch.Tensor] = field(default_factory=dict)  # CPU copies, made once


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
    """Memory this process can still use, in bytes: the driver's free memory plus what PyTorch's
    caching allocator has reserved but is not using; None where memory is not the accelerator's."""
    if device.type != "cuda":
        return None
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    free = torch.cuda.mem_get_info(device)[0] + max(0, cached)
    # $LOCALORA_VRAM_GB: a card of that size, on a bigger one (scripts/bench_gpu.py --vram also
    # caps the allocator with set_per_process_memory_fraction, which mem_get_info does not see).
    cap = os.environ.get("LOCALORA_VRAM_GB")
    if cap:
        free = min(free, max(0, int(float(cap) * 2**30) - torch.cuda.memory_reserved(device) + max(0, cached)))
    return free


def _modules(model: Any) -> list[tuple[str, torch.nn.Module]]:
    """A pipeline's modules by component name, or the module itself."""
    parts = [(n, m) for n, m in getattr(model, "components", {}).items() if isinstance(m, torch.nn.Module)]
    return parts or ([("", model)] if isinstance(model, torch.nn.Module) else [])


def footprint(model: Any) -> int:
    """Bytes of a module's (or a pipeline's modules') parameters and buffers as stored, with the
    quantization state bitsandbytes keeps beside each 4-bit weight (absmax, codes)."""
    total, seen = 0, set()
    for _, module in _modules(model):
        for t in list(module.parameters()) + list(module.buffers()):
            state = getattr(t, "quant_state", None)
            extra = [] if state is None else [state.absmax, state.code, getattr(state, "offset", None)]
            if state is not None and getattr(state, "nested", False):
                extra += [state.state2.absmax, state.state2.code]
            for x in [t, *extra]:
                if isinstance(x, torch.Tensor) and (x.data_ptr(), x.device) not in seen:
                    seen.add((x.data_ptr(), x.device))
                    total += x.numel() * x.element_size()
    return total


reserve = estimates.reserve  # working memory beside a model's weights while it runs


@dataclass
class DeviceManager:
    device: torch.device = field(default_factory=pick_device)
    placement: str = "auto"
    log: Callable[[Placement], None] | None = None
    history: list[Placement] = field(default_factory=list)
    free_memory: Callable[[], int | None] | None = None  # default: the device's; injectable for tests
    release: Callable[[], None] | None = None  # default: gc.collect() + empty_cache() on CUDA
    measure: Callable[[str, Any], int] | None = None  # default: footprint(model), kept in the home
    releases: int = 0  # release() calls: only when memory was short
    uses: list[str] = field(default_factory=list)  # the components acquired, one entry per stretch
    _components: dict[str, _Component] = field(default_factory=dict)
    _expected: dict[str, int] = field(default_factory=dict)
    _clock: int = 0

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement {self.placement!r} is not one of {', '.join(PLACEMENTS)}")
        if self.free_memory is None:
            self.free_memory = lambda: _free_memory(self.device)
        if self.release is None:
            self.release = self._empty_cache

    @classmethod
    def for_profile(cls, profile: Any, log: Callable[[Placement], None] | None = None) -> DeviceManager:
        """The device and placement a profile asks for."""
        return cls(pick_device(profile.device), profile.placement, log=log)

    def register(self, name: str, load: Callable[[torch.device], Any], *, source: str = "",
                 describe: Callable[[], str] | None = None, estimate: int | None = None, key: str = "",
                 cpu_ok: bool = False) -> None:
        """`load(device)` builds the component on `device`; it is called on first use only (and
        again after a drop under `reload`). `describe()` tells, after loading, what was loaded;
        `estimate` is its expected size in bytes, so `auto` can make room before a first load; a
        size measured at an earlier load under `key` (estimates.footprint_key) wins over it.
        `cpu_ok`: a small model that runs on the CPU when the card cannot hold every model.

        Registering the same name and source again keeps what is loaded (several renderers may
        share one pipeline); another source replaces it, so a model is never silently reused.
        """
        old = self._components.get(name)
        if old is not None and old.source == source:
            return
        if old is not None and old.model is not None:
            self._drop(name, old)
        known = estimates.measured(key) if key and self.measure is None else None
        self._components[name] = _Component(load=load, source=source, describe=describe or (lambda: ""),
                                            estimate=self._expected.get(name) or known or estimate or 0, key=key,
                                            cpu_ok=cpu_ok)

    def expect(self, name: str, size: int) -> None:
        """Plan with `size` bytes for `name` (registered now or later) until it is loaded and measured."""
        self._expected[name] = size
        if name in self._components:
            self._components[name].estimate = size

    def resident(self) -> tuple[str, ...]:
        return tuple(n for n, c in self._components.items() if c.on_device)

    def sizes(self) -> dict[str, int]:
        """Measured size of each loaded component, in bytes."""
        return {n: c.size for n, c in self._components.items() if c.size}

    def acquire(self, name: str) -> Any:
        """The component `name`, resident on the accelerator (or, for a `cpu_ok` one on a short
        card, on the CPU), evicting others as the placement says."""
        comp = self._components[name]
        self._clock += 1
        comp.used = self._clock
        if not self.uses or self.uses[-1] != name:
            self.uses.append(name)
        if comp.on_device or comp.on_cpu:
            if comp.on_device:
                self._make_room(name, comp, resident=True)  # its working memory, while it runs
            return comp.model
        if comp.cpu_ok and self.placement == "auto" and self._short():
            return self._load_on_cpu(name, comp)
        self._make_room(name, comp)
        action = "load" if comp.model is None else "to-device"
        self._announce(name, action)
        start = time.perf_counter()
        if comp.model is None:
            before = _memory(self.device)
            comp.model = comp.load(self.device)
            self._measured(name, comp, _memory(self.device) - before)
        else:
            comp.model = _move(comp.model, self.device, comp.pinned)
        comp.on_device = True
        self._record(name, action, start, comp)
        return comp.model

    def _measured(self, name: str, comp: _Component, allocated: int = 0) -> None:
        """The loaded model's size: its tensors as stored, or on a GPU what the load allocated if
        that is more (the allocator's rounding, buffers made while loading)."""
        if self.measure is not None:
            comp.size = self.measure(name, comp.model)
            return
        comp.size = max(footprint(comp.model), allocated)
        if comp.key and comp.size:
            estimates.remember(comp.key, comp.size)

    def _short(self) -> bool:
        """Whether the card cannot hold every registered model at once with the working memory of
        the largest: then a `cpu_ok` model stays on the CPU rather than push a large one off."""
        free = self.free_memory()
        if free is None:
            return False
        sizes = [c.size or c.estimate for c in self._components.values()]
        held = sum(c.size or c.estimate for c in self._components.values() if c.on_device)
        return sum(sizes) + reserve(max(sizes, default=0)) > free + held

    def _load_on_cpu(self, name: str, comp: _Component) -> Any:
        self._announce(name, "load")
        start = time.perf_counter()
        comp.model = comp.load(torch.device("cpu"))
        self._measured(name, comp)
        comp.on_cpu = True
        self._record(name, "load", start, comp, detail="on the CPU: the card cannot hold every model")
        return comp.model

    def _make_room(self, name: str, comp: _Component, resident: bool = False) -> None:
        others = sorted(((c.used, n) for n, c in self._components.items() if n != name and c.on_device))
        if self.placement == "resident" or not others or (resident and self.placement != "auto"):
            return
        if self.placement in ("swap", "reload"):
            for _, other in others:
                self._evict(other, self._components[other])
            return
        # auto: evict least recently used models until the free memory holds this one (unless it
        # is on the card already) and its working memory. Before a first load its size is the
        # estimate (or what it measured at its last load here).
        free = self.free_memory()
        if free is None:
            return  # CPU: everything already lives in RAM, nothing to gain by moving
        size = comp.size or comp.estimate
        need = reserve(size) + (0 if resident else size)
        for _, other in others:
            if free >= need:
                return
            evicted = self._components[other]
            self._evict(other, evicted)
            free = self.free_memory()
        if free < need:
            self.short_of_memory()  # nothing left to move: freed blocks may be stuck in the cache

    def short_of_memory(self) -> None:
        """Memory is actually short (nothing left to move, or an out-of-memory error): collect
        garbage and hand the allocator's cached blocks back to the driver."""
        self.releases += 1
        self.release()

    def offload_others(self, name: str) -> bool:
        """Move every other model off the card (a render's last resort before failing); whether
        any moved."""
        others = [n for n, c in self._components.items() if n != name and c.on_device]
        for other in others:
            self._evict(other, self._components[other])
        if others:
            self.short_of_memory()
        return bool(others)

    def _evict(self, name: str, comp: _Component) -> None:
        if self.placement == "reload":
            self._drop(name, comp)
            return
        self._announce(name, "offload")
        start = time.perf_counter()
        if self.device.type != "cpu":
            comp.model = _move(comp.model, torch.device("cpu"), comp.pinned)
        comp.on_device = False
        # No empty_cache(): the freed blocks stay with PyTorch's allocator, which _free_memory
        # counts and the next model's tensors reuse.
        self._record(name, "offload", start, comp)

    def _drop(self, name: str, comp: _Component) -> None:
        start = time.perf_counter()
        comp.model = None
        comp.on_device = False
        comp.pinned.clear()
        gc.collect()  # the dropped model's tensors must go before the next one loads
        self._record(name, "drop", start, comp)

    def _empty_cache(self) -> None:
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    def _announce(self, name: str, action: str) -> None:
        if self.log:
            comp = self._components[name]
            self.log(Placement(name, action, 0.0, _memory(self.device), self.resident(), comp.size, done=False,
                               detail=comp.source, device=self.device.type))

    def _record(self, name: str, action: str, start: float, comp: _Component, detail: str = "") -> None:
        detail = "; ".join(x for x in (comp.describe() if action == "load" else "", detail) if x)
        event = Placement(name, action, time.perf_counter() - start, _memory(self.device), self.resident(),
                          comp.size, detail=detail, device=self.device.type)
        self.history.append(event)
        if self.log:
            self.log(event)


@dataclass
class SimulatedCard:
    """A card of `capacity` bytes as the planner (and the tests) see it: free memory is the
    capacity less the CUDA context and the sizes of the models resident on it, whatever the
    loaded objects really weigh. attach() makes a DeviceManager plan against it."""

    capacity: int
    sizes: dict[str, int]
    context: int = int(estimates.CUDA_CONTEXT_GIB * estimates.GIB)
    releases: int = 0  # empty_cache() calls the manager made

    def attach(self, manager: DeviceManager) -> DeviceManager:
        for name, size in self.sizes.items():
            manager.expect(name, size)
        manager.free_memory = lambda: self.capacity - self.context - sum(self.sizes[n] for n in manager.resident())
        manager.measure = lambda name, model: self.sizes[name]
        manager.release = self._release
        return manager

    def _release(self) -> None:
        self.releases += 1


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


def _move(model: Any, device: torch.device, pinned: dict[str, torch.Tensor] | None = None) -> Any:
    """Move a pipeline or module. Moved to the CPU, its tensors land in pinned copies made at the
    first move and reused at every later one (the way back to the GPU is fast, and page-locked
    memory is not allocated again each time)."""
    if device.type == "cpu" and pinned is not None and not _quantized(model):
        to_cpu(model, pinned)
        return model
    moved = model.to(device)
    moved = moved if moved is not None else model
    if device.type == "cpu" and torch.cuda.is_available():
        _pin(moved)  # a quantized model's own .to() made new CPU tensors: pin those
    return moved


def _pin(model: Any) -> None:
    for _, module in _modules(model):
        for t in list(module.parameters()) + list(module.buffers()):
            try:
                t.data = t.data.pin_memory()
            except RuntimeError:
                return  # pinning is an optimisation; without enough page-locked memory, skip it


def _quantized(model: Any) -> bool:
    # bitsandbytes' weights carry their quantization state, which only their own .to() moves.
    return any(hasattr(p, "quant_state") for _, m in _modules(model) for p in m.parameters())


def to_cpu(model: Any, pinned: dict[str, torch.Tensor]) -> None:
    """Copy every parameter and buffer into its CPU copy in `pinned` (made, page-locked where CUDA
    allows, on the first call) and point the tensor at it."""
    for part, module in _modules(model):
        named = list(module.named_parameters()) + list(module.named_buffers())  # a tied weight once
        for name, t in named:
            key = f"{part}.{name}" if part else name
            buf = pinned.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype)
                if torch.cuda.is_available():
                    try:
                        buf = buf.pin_memory()
                    except RuntimeError:
                        pass  # pinning is an optimisation; without enough page-locked memory, skip it
                pinned[key] = buf
            if buf.data_ptr() != t.data.data_ptr():
                buf.copy_(t.data)
                t.data = buf
