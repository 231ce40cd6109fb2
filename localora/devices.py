"""One accelerator shared by the diffusion pipeline, the VLM and the CLIP scorer.

Under the "swap" placement at most one of them is resident on the accelerator at any moment: the
others wait in CPU RAM, or are dropped and reloaded when they cannot be moved (bitsandbytes-
quantized models). Under "resident" everything stays where it was first loaded. Every placement
change is recorded with its duration and the accelerator memory after it; on a CPU-only machine
nothing moves, but the same sequence is recorded so the policy can be checked anywhere.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Placement:
    """One recorded placement change."""

    component: str
    action: str  # "load", "to-device", "offload", "drop"
    seconds: float
    memory_bytes: int  # allocated on the accelerator after the change (0 on CPU)
    resident: tuple[str, ...]  # components resident on the accelerator after the change


@dataclass
class _Component:
    load: Callable[[torch.device], Any]
    movable: bool
    source: str
    model: Any = None
    on_device: bool = False


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _memory(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


@dataclass
class DeviceManager:
    device: torch.device = field(default_factory=pick_device)
    placement: str = "swap"
    log: Callable[[Placement], None] | None = None
    history: list[Placement] = field(default_factory=list)
    _components: dict[str, _Component] = field(default_factory=dict)

    @classmethod
    def for_profile(cls, profile: Any, log: Callable[[Placement], None] | None = None) -> DeviceManager:
        """The device and placement a profile asks for."""
        return cls(pick_device(profile.device), profile.placement, log=log)

    def register(self, name: str, load: Callable[[torch.device], Any], *, movable: bool = True,
                 source: str = "") -> None:
        """`load(device)` builds the component on `device`; it is called on first use only,
        and again after a drop. `movable=False` for models that cannot leave the device.

        Registering the same name and source again keeps what is loaded (several renderers may
        share one pipeline); another source replaces it, so a model is never silently reused.
        """
        old = self._components.get(name)
        if old is not None and old.source == source:
            return
        if old is not None and old.model is not None:
            self._drop(name, old)
        self._components[name] = _Component(load=load, movable=movable, source=source)

    def resident(self) -> tuple[str, ...]:
        return tuple(n for n, c in self._components.items() if c.on_device)

    def acquire(self, name: str) -> Any:
        """The component `name`, resident on the accelerator, evicting others under "swap"."""
        comp = self._components[name]
        if comp.on_device:
            return comp.model
        if self.placement == "swap":
            for other, c in self._components.items():
                if other != name and c.on_device:
                    self._evict(other, c)
        start = time.perf_counter()
        if comp.model is None:
            comp.model = comp.load(self.device)
            action = "load"
        else:
            comp.model = _move(comp.model, self.device)
            action = "to-device"
        comp.on_device = True
        self._record(name, action, start)
        return comp.model

    def _evict(self, name: str, comp: _Component) -> None:
        if not comp.movable:
            self._drop(name, comp)
            return
        start = time.perf_counter()
        if self.device.type != "cpu":
            comp.model = _move(comp.model, torch.device("cpu"))
        comp.on_device = False
        self._free()
        self._record(name, "offload", start)

    def _drop(self, name: str, comp: _Component) -> None:
        start = time.perf_counter()
        comp.model = None
        comp.on_device = False
        self._free()
        self._record(name, "drop", start)

    def _free(self) -> None:
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    def _record(self, name: str, action: str, start: float) -> None:
        event = Placement(name, action, time.perf_counter() - start, _memory(self.device), self.resident())
        self.history.append(event)
        if self.log:
            self.log(event)


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
