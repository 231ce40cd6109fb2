"""The local vision-language model: the model (model.py), its answer grammars (schemas.py) and
the prompt templates it is asked with (prompts.py).

Callers depend on the small protocol below, not on the backend, so the judge and the search
loop can be driven by anything that answers like the VLM.
"""

from __future__ import annotations

from typing import Any, Protocol


class Answer(Protocol):
    text: str
    value: Any  # the parsed structured answer (schema calls)
    seconds: float
    prompt_tokens: int
    new_tokens: int


class ChatModel(Protocol):
    """localora.vlm.model.VLM is one. `temperature` None means greedy."""

    def chat(self, system: str | None, images: list, text: str, schema: Any = ..., temperature: float | None = ...,
             seed: int | None = ...) -> Answer: ...

    def image_tokens(self, pixels: int) -> int:
        """Visual tokens one image of about `pixels` pixels takes in a prompt (its family's rule)."""
        ...
