"""`every-token`: the UniTE baseline. Every member gives its top-k at every step, the union is averaged,
every member follows the chosen text. SAFE's paper shows this to be unstable and slow; we keep it to
measure that."""

from __future__ import annotations

from ..decisions import EOG
from .base import ContextFull, Piece, PolicyBase


class EveryTokenPolicy(PolicyBase):
    """All members are consulted at every token. The primary (first) member keeps the tokens it chose
    itself, as a drafter does; the others re-tokenize the shared text canonically."""

    def start(self) -> None:
        self.p_tokens: list[int] = []
        for m in self.members:
            m.feed(m.prompt)

    def step(self, budget: int) -> list[Piece]:
        dists = []
        for i, m in enumerate(self.members):
            target = m.prompt + (self.p_tokens if i == 0 else m.track.tokens)
            if len(target) >= m.model.n_ctx:
                raise ContextFull
            row = len(target) - 1
            dists.append(m.dist(m.feed(target, rows=[row])[row]))
        self.stats.verification_calls += len(self.members) - 1
        primary = self.members[0]
        own_tok, _ = self.pick(primary, None, dist=dists[0])
        own_key = primary.key_of(own_tok)
        key, winner = self.ensemble_choice(dists, sharpen=False)  # plain UniTE: no SAFE sharpening
        self.stats.ensembled += 1
        if key != own_key:
            self.stats.overrides += 1
        if key == EOG:
            return [Piece(b"", "ensemble", winner, end=True)]
        if key == own_key:
            self.p_tokens.append(own_tok)
        else:
            self.p_tokens.extend(primary.model.tokenize(key, add_bos=False, special=False))  # type: ignore[arg-type]
        for m in self.members[1:]:
            m.track.extend(key)  # type: ignore[arg-type]
        return [Piece(key, "ensemble", winner)]  # type: ignore[arg-type]
