"""What is happening between two events, for a spinner or a heartbeat line.

A model load takes tens of seconds on a real card and one VLM answer several; no event arrives
meanwhile. The live views show one of these phrases beside a spinner, and the plain views print
it as a heartbeat line when nothing was printed for a while:

    loading vlm (Qwen2-VL-7B-Instruct) …           a model being loaded or moved (devices.py)
    VLM generating, 37 tokens (at most 2405)       one answer being decoded (vlm/model.py)
    rendering, step 3/4                            a denoising step (diffusion/render.py)

Nothing here imports torch: the UI can start before the models' libraries are loaded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from localora.devices import Placement

# A plain view prints a heartbeat line after this many seconds without one.
HEARTBEAT_S = 10.0
# Plain views indent what is happening under the text of their timed "[mm:ss]" lines: a script
# that counts timed lines counts events (compose) or finished rows (bench), never these.
INDENT = " " * len("[00:00] ")

_VERBS = {"load": "loading", "to-device": "moving to the accelerator", "offload": "offloading", "drop": "dropping"}


def placement_phrase(p: Placement) -> str:
    """"loading vlm (name) …" for a change about to start; its detail names the model."""
    which = f" ({p.detail})" if p.detail else ""
    return f"{_VERBS.get(p.action, p.action)} {p.component}{which} …"


def generating_phrase(tokens: int, limit: int) -> str:
    return f"VLM generating, {tokens} tokens" + (f" (at most {limit})" if limit else "")


def step_phrase(i: int, total: int) -> str:
    return f"rendering, step {i}/{total}"


@dataclass
class Heartbeat:
    """When a plain view should print a line although no event came: after `every` quiet seconds."""

    every: float = HEARTBEAT_S
    clock: Callable[[], float] = time.monotonic
    last: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.last = self.clock()

    def printed(self) -> None:
        """A line was just printed (any line): the quiet time starts again."""
        self.last = self.clock()

    def due(self) -> bool:
        return self.clock() - self.last >= self.every
