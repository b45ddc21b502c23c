"""`single`: one model, plain decoding. The reference every other policy is measured against."""

from __future__ import annotations

from .base import ContextFull, EvalConfig, Piece, Policy
from .registry import register


@register
class SinglePolicy(Policy):
    """Decode with the first member only, one token per decode call."""

    name = "single"
    summary = "the first member alone"
    drafter_only = True
    logprobs = True  # every token is the one model's own
    eval_configs = (EvalConfig("single", each_member=True),)  # single:<member>: each member alone

    def start(self) -> None:
        self.pending = self.next_dist(self.lanes[0], [])

    def step(self, budget: int) -> list[Piece]:
        lane = self.lanes[0]
        tok = self.pick(self.pending)
        if lane.member.is_eog(tok):
            return [Piece(b"", "single", end=True)]
        if lane.room < 1:
            raise ContextFull
        scored = self.scored(lane, self.pending, tok)
        self.pending = lane.step(tok, self.temperature)
        return [Piece(lane.member.token_bytes(tok), "single", logprob=scored)]
