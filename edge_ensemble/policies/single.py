"""`single`: one model, plain decoding. The reference every other policy is measured against."""

from __future__ import annotations

from .base import ContextFull, Piece, PolicyBase


class SinglePolicy(PolicyBase):
    """Decode with the first member only, one token per decode call."""

    def start(self) -> None:
        self.pending = self.next_dist(self.lanes[0], [])

    def step(self, budget: int) -> list[Piece]:
        lane = self.lanes[0]
        tok = self.pick(self.pending)
        if lane.member.is_eog(tok):
            return [Piece(b"", "single", end=True)]
        if lane.room < 1:
            raise ContextFull
        self.pending = lane.step(tok, self.temperature)
        return [Piece(lane.member.token_bytes(tok), "single")]
