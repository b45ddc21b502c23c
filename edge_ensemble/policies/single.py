"""`single`: one model, plain decoding. The reference every other policy is measured against."""

from __future__ import annotations

import numpy as np

from .base import ContextFull, Piece, PolicyBase


class SinglePolicy(PolicyBase):
    """Decode with the first member only, one token per llama_decode call."""

    def start(self) -> None:
        m = self.members[0]
        self.pending = m.feed(m.prompt, rows=[len(m.prompt) - 1])[len(m.prompt) - 1].copy()

    def step(self, budget: int) -> list[Piece]:
        m = self.members[0]
        tok, _ = self.pick(m, self.pending)
        if m.model.is_eog(tok):
            return [Piece(b"", "single", end=True)]
        if m.room < 1:
            raise ContextFull
        self.pending = m.decode_one(tok).copy()
        return [Piece(m.model.token_bytes[tok], "single")]
