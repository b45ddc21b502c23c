"""`every-token`: the UniTE baseline. Every member gives its top-k at every step, the union is averaged,
every member follows the chosen text. SAFE's paper shows this to be unstable and slow; we keep it to
measure that."""

from __future__ import annotations

from ..decisions import EOG
from .base import ContextFull, Piece, PolicyBase


class EveryTokenPolicy(PolicyBase):
    """All members re-tokenize the shared text canonically and are consulted at every token."""

    def start(self) -> None:
        for m in self.members:
            m.feed(m.prompt)

    def step(self, budget: int) -> list[Piece]:
        dists = []
        for m in self.members:
            target = m.prompt + m.track.tokens
            if len(target) >= m.model.n_ctx:
                raise ContextFull
            row = len(target) - 1
            dists.append(m.dist(m.feed(target, rows=[row])[row]))
        self.stats.verification_calls += len(self.members) - 1
        key, winner = self.ensemble_choice(dists)
        self.stats.ensembled += 1
        if key == EOG:
            return [Piece(b"", "ensemble", winner, end=True)]
        for m in self.members:
            m.track.extend(key)  # type: ignore[arg-type]
        return [Piece(key, "ensemble", winner)]  # type: ignore[arg-type]
