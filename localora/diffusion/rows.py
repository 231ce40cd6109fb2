"""Per-row LoRA weights: one UNet batch in which every row has its own mixture of the adapters.

    with row_weights(pipe.unet, adapters) as rows:
        rows.weights = W                          # (rows, k): one weight per adapter for each batch row
        out = pipe.unet(x, ...)                   # row r computes W x + sum_k W[r, k] s_k B_k A_k x

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

from localora.errors import LocaloraError
from localora.memory import is_out_of_memory  # noqa: F401  (the renderer's import of it)


def lora_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


class Rows:
    """The weight matrix the hooks read; set it before each UNet call (any number of rows)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._weights: torch.Tensor | None = None

    @property
    def weights(self) -> torch.Tensor:
        return self._weights

    @weights.setter
    def weights(self, value: torch.Tensor) -> None:
        self._weights = value.to(self.device)


@contextmanager
def row_weights(unet: torch.nn.Module, adapters: Sequence[str]) -> Iterator[Rows]:
    """Within the block, batch row r of every UNet call uses `rows.weights[r]` (one per adapter).

    Costs one `set_adapters` call in all, however many steps and rows run inside."""
    layers = lora_layers(unet)
    rows = Rows(unet.device)
    unet.set_adapters(list(adapters), weights=[1.0] * len(adapters))  # scaling = the unit scale, read below
    for layer in layers:
        if any(a in getattr(layer, "lora_variant", {}) for a in adapters):
            raise LocaloraError("per-row LoRA weights do not support DoRA or other LoRA variants; "
                                "render with --batch 1")
    hooks = [layer.register_forward_hook(partial(_add_rows, adapters=list(adapters), rows=rows,
                                                 unit={a: layer.scaling[a] for a in adapters if a in layer.lora_A}))
             for layer in layers]
    unet.disable_lora()
    try:
        yield rows
    finally:
        for hook in hooks:
            hook.remove()
        unet.enable_lora()


def _add_rows(layer, args, output, *, adapters: list[str], rows: Rows, unit: dict[str, float]):
    x, weights = args[0], rows.weights
    if x.shape[0] != weights.shape[0]:
        raise RuntimeError(f"a batch of {x.shape[0]} rows under per-row weights for {weights.shape[0]}")
    for j, name in enumerate(adapters):
        if name not in unit:
            continue
        column = weights[:, j]
        used = column.nonzero().squeeze(1)
        if used.numel() == 0:
            continue
        lora_a = layer.lora_A[name]
        every = used.numel() == x.shape[0]  # Merge rows use every adapter: no gather, no scatter
        xs = (x if every else x.index_select(0, used)).to(lora_a.weight.dtype)
        term = layer.lora_B[name](lora_a(layer.lora_dropout[name](xs))) * unit[name]
        scale = (column if every else column.index_select(0, used)).to(term.dtype).view(-1, *([1] * (term.dim() - 1)))
        term = (term * scale).to(output.dtype)
        output = output + term if every else output.index_add(0, used, term)
    return output


def one_hot_rows(weights: Sequence[float], which: Sequence[int], per_row: int) -> torch.Tensor:
    """(len(which) * per_row, k): `per_row` rows for each adapter in `which` alone at its weight."""
    w = torch.zeros(len(which) * per_row, len(weights), dtype=torch.float64)
    for n, i in enumerate(which):
        w[n * per_row:(n + 1) * per_row, i] = weights[i]
    return w

