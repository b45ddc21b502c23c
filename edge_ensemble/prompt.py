"""What a generation starts from: a conversation, or raw text for completion.

A conversation is rendered for each member in its own chat template (:mod:`edge_ensemble.chat`); a
:class:`RawText` goes to every member as it is — no template — and each member tokenizes it itself, with its
own BOS convention. :func:`prompt_tokens_for` is the one place that tells the two apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence, Union

if TYPE_CHECKING:
    from .runtime import Model


@dataclass(frozen=True)
class RawText:
    """A raw completion prompt: the text the answer continues.

    Control-token text in it (``<|im_start|>``, ``<start_of_turn>``) is parsed as the model's markup, as
    llama-cpp-python's ``create_completion`` and llama-server do: whoever writes a raw prompt writes the whole
    prompt, template included, so there is no message content to protect. BOS is added as the GGUF asks,
    but not a second time when the text already starts with it.
    """

    text: str


Prompt = Union[Sequence[dict[str, str]], RawText]


def prompt_tokens_for(model: "Model", prompt: Prompt) -> list[int]:
    """``model``'s prompt tokens for a conversation (its chat template) or a :class:`RawText`."""
    if isinstance(prompt, RawText):
        data = prompt.text.encode("utf-8")
        bos = model.piece(model.bos_id, special=True) if model.bos_id >= 0 else b""
        add_bos = model.add_bos and not (bos and data.startswith(bos))
        return model.tokenize(data, add_bos=add_bos, special=True)
    return model.prompt_tokens(model.render_chat(prompt))
