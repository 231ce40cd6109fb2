"""Per-row LoRA weights: one UNet batch in which every row has its own mixture of the adapters.

    with row_weights(pipe.unet, adapters) as rows:
        rows.weights = W                          # (rows, k): one weight per adapter for each batch row
        out = pipe.unet(x, ...)                   # row r computes W x + sum_k W[r, k] s_k B_k A_k x
    with row_weights(pipe.unet, adapters, BlockMap.of(pipe.unet, "sdxl")) as rows:
        rows.set(W, M)                            # M (rows, k, slots): block multipliers (blocks.py)

Batched Composite uses one-hot rows (each LoRA alone at its weight, for uncond and cond); batched
Merge candidates use one full weight vector per image. Inside the block the adapters' own
forward is switched off (`disable_lora`) and a forward hook on each peft LoRA layer adds every
adapter's term to the rows that use it, from the layer's public lora_A / lora_B / lora_dropout
and its scaling at weight 1 (alpha / r). So no `set_adapters` call happens between passes or
rows: on a full-size SDXL UNet one such call costs 64-77 ms of Python.

Equal to the sequential result up to float rounding: w * (s * BAx) is summed where peft computes
(w * s) * BAx, and CPU/GPU kernels round differently at other batch sizes (about 5e-7 per UNet pass
on CPU).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch

from localora.diffusion import blocks
from localora.errors import LocaloraError
from localora.memory import is_out_of_memory  # noqa: F401  (the renderer's import of it)


def lora_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


class Rows:
    """The weight matrix the hooks read; set it before each UNet call (any number of rows).

    rows.weights = W (rows, k), or rows.set(W, M) with M (rows, k, slots): per-block multipliers, the
    layer in slot s then using W * M[..., s] (diffusion/blocks.py). Which rows use which adapter is
    decided here, once per distinct setting, on the host: the hooks inside the denoiser never ask
    the accelerator anything (reading a device tensor there would wait for it at every layer), and a
    setting seen before (Composite's one-hot rows, every step) costs a dictionary look-up.
    """

    CACHED = 64  # distinct settings kept; a search sets a few per batch

    def __init__(self, device: torch.device, slots: int = 1):
        self.device = device
        self.slots = slots
        self.plan: list[list[tuple[torch.Tensor, torch.Tensor | None] | None]] = []  # [slot][adapter]
        self.count = 0  # rows of the current setting
        self._weights: torch.Tensor | None = None
        self._plans: dict[tuple, tuple[int, list]] = {}

    @property
    def weights(self) -> torch.Tensor:
        return self._weights

    @weights.setter
    def weights(self, value: torch.Tensor) -> None:
        self.set(value)

    def set(self, weights: torch.Tensor, multipliers: torch.Tensor | None = None) -> None:
        weights = weights.detach().to("cpu", torch.float64)
        key = (tuple(weights.shape), weights.numpy().tobytes(),
               None if multipliers is None else multipliers.detach().to("cpu", torch.float64).numpy().tobytes())
        if key not in self._plans:
            if len(self._plans) >= self.CACHED:
                self._plans.clear()
            self._plans[key] = (weights.shape[0], self._plan(weights, multipliers))
        self.count, self.plan = self._plans[key]
        self._weights = weights

    def _plan(self, weights: torch.Tensor, multipliers: torch.Tensor | None) -> list:
        import numpy as np

        w = weights.numpy()
        m = None if multipliers is None else multipliers.detach().to("cpu", torch.float64).numpy()
        plan = []
        for s in range(self.slots):
            eff = w if m is None else w * m[:, :, s]
            per = []
            for j in range(eff.shape[1]):
                used = np.flatnonzero(eff[:, j])
                if used.size == 0:
                    per.append(None)
                    continue
                column = torch.from_numpy(eff[:, j].copy()).to(self.device)
                index = None if used.size == eff.shape[0] else torch.from_numpy(used).to(self.device)
                per.append((column, index))
            plan.append(per)
            if m is None:  # no block multipliers: every slot is the same
                plan = plan * self.slots
                break
        return plan


@contextmanager
def row_weights(unet: torch.nn.Module, adapters: Sequence[str], block_map=None) -> Iterator[Rows]:
    """Within the block, batch row r of every UNet call uses `rows.weights[r]` (one per adapter);
    with a blocks.BlockMap, each layer's hook also knows its block's slot (rows.set(W, M)).

    Costs one `set_adapters` call in all, however many steps and rows run inside."""
    from peft.tuners.lora import LoraLayer

    named = [(n, m) for n, m in unet.named_modules() if isinstance(m, LoraLayer)]
    rows = Rows(unet.device, blocks.slots(block_map.arch) if block_map else 1)
    unet.set_adapters(list(adapters), weights=[1.0] * len(adapters))  # scaling = the unit scale, read below
    for _, layer in named:
        if any(a in getattr(layer, "lora_variant", {}) for a in adapters):
            raise LocaloraError("per-row LoRA weights do not support DoRA or other LoRA variants; "
                                "render with --batch 1")
    hooks = [layer.register_forward_hook(partial(_add_rows, adapters=list(adapters), rows=rows,
                                                 slot=block_map.slot(name) if block_map else 0,
                                                 unit={a: layer.scaling[a] for a in adapters if a in layer.lora_A}))
             for name, layer in named]
    unet.disable_lora()
    try:
        yield rows
    finally:
        for hook in hooks:
            hook.remove()
        unet.enable_lora()


def _add_rows(layer, args, output, *, adapters: list[str], rows: Rows, unit: dict[str, float], slot: int):
    x, plan = args[0], rows.plan[slot]
    if x.shape[0] != rows.count:
        raise RuntimeError(f"a batch of {x.shape[0]} rows under per-row weights for {rows.count}")
    for j, name in enumerate(adapters):
        if name not in unit or plan[j] is None:
            continue
        column, used = plan[j]
        lora_a = layer.lora_A[name]
        xs = (x if used is None else x.index_select(0, used)).to(lora_a.weight.dtype)
        term = layer.lora_B[name](lora_a(layer.lora_dropout[name](xs))) * unit[name]
        scale = (column if used is None else column.index_select(0, used)).to(term.dtype)
        term = (term * scale.view(-1, *([1] * (term.dim() - 1)))).to(output.dtype)
        output = output + term if used is None else output.index_add(0, used, term)
    return output


def one_hot_rows(weights: Sequence[float], which: Sequence[int], per_row: int) -> torch.Tensor:
    """(len(which) * per_row, k): `per_row` rows for each adapter in `which` alone at its weight."""
    w = torch.zeros(len(which) * per_row, len(weights), dtype=torch.float64)
    for n, i in enumerate(which):
        w[n * per_row:(n + 1) * per_row, i] = weights[i]
    return w

