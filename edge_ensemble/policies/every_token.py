"""`every-token`: the UniTE baseline. Every member gives its top-k at every step, the union is averaged,
every member follows the chosen text. SAFE's paper shows this to be unstable and slow; we keep it to
measure that."""

from __future__ import annotations

from ..alignment import complete_utf8_len
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
            dists.append(m.dist(m.feed(target, rows=[row])[row], self.temperature))
        primary = self.members[0]
        own_tok, _ = self.pick(primary, None, dist=dists[0])
        own_key = primary.key_of(own_tok)
        if any(len(m.track.text) != complete_utf8_len(m.track.text) for m in self.members[1:]):
            # The text ends inside a UTF-8 character: the others cannot be asked mid-character (their
            # tokenization stops before it), so the primary finishes the character alone.
            if own_key == EOG:
                return [Piece(b"", "draft", end=True)]
            self.p_tokens.append(own_tok)
            for m in self.members[1:]:
                m.track.extend(own_key)  # type: ignore[arg-type]
            return [Piece(own_key, "draft")]  # type: ignore[arg-type]
        self.stats.verification_calls += len(self.members) - 1
        key, winner = self.ensemble_choice(dists, sharpen=False)  # plain UniTE: no SAFE sharpening
        self.stats.ensembled += 1
        if key != own_key:
            self.stats.overrides += 1
        if key == EOG:
            return [Piece(b"", "ensemble", winner, end=True)]
        if key == own_key:
            self.p_tokens.append(own_tok)
        else:
            self.p_tokens.extend(primary.tokens_for(key))  # type: ignore[arg-type]
        for m in self.members[1:]:
            m.track.extend(key)  # type: ignore[arg-type]
        return [Piece(key, "ensemble", winner)]  # type: ignore[arg-type]
