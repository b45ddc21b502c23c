"""`every-token`: the UniTE baseline. Every member gives its top-k at every step, the union is averaged,
every member follows the chosen text. SAFE's paper shows this to be unstable and slow; we keep it to
measure that."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..alignment import complete_utf8_len
from ..decisions import EOG
from .base import UNION_K, WEIGHTS, EvalConfig, Piece, Policy, PolicyStats, option
from .registry import register


@dataclass(frozen=True)
class EveryTokenOptions:
    """every-token's options."""

    union_k: int = option(UNION_K)
    weights: tuple[float, ...] | None = option(WEIGHTS)


@dataclass
class EveryTokenStats(PolicyStats):
    """Counts of an every-token answer (``ensembled``: every token the members were asked about)."""

    overrides: int = 0  # ensembled tokens that differ from what the primary would have chosen
    verification_calls: int = 0

    def figures(self, tokens: int) -> dict[str, Any]:
        return {"overridden_tokens": self.overrides, "verification_calls": self.verification_calls}


@register
class EveryTokenPolicy(Policy):
    """All members are consulted at every token. The primary (first) member keeps the tokens it chose
    itself, as a drafter does; members with its tokenizer follow those ids, the others re-tokenize the
    shared text canonically."""

    name = "every-token"
    summary = "all members choose every token (UniTE's union)"
    Options = EveryTokenOptions
    Stats = EveryTokenStats
    options: EveryTokenOptions
    stats: EveryTokenStats
    # the gate of the old eval table is SAFE's, which every-token never read
    eval_configs = (EvalConfig("every-token"),)

    def start(self) -> None:
        self.p_tokens: list[int] = []
        # Each prompt is prefilled in one pass with its last row read, exactly as plain decoding does (a
        # different batch split would change the logits slightly and with them near-tie greedy choices).
        self.dists = self._next_dists()

    def _next_dists(self) -> list:
        """Every member's next-token distribution after the accepted text (a twin reads its twin's)."""
        dists: list = []
        for i, lane in enumerate(self.lanes):
            twin = self.twin[i]
            dists.append(dists[twin] if twin is not None else
                         self.next_dist(lane, self.p_tokens if i == 0 else lane.track.tokens))
        return dists

    def step(self, budget: int) -> list[Piece]:
        dists = self.dists if self.dists is not None else self._next_dists()
        self.dists = None
        primary = self.lanes[0]
        own_tok = self.pick(dists[0])
        own_key = primary.key_of(own_tok)
        if any(not m.follows_drafter and len(m.track.text) != complete_utf8_len(m.track.text) for m in self.lanes[1:]):
            # The text ends inside a UTF-8 character: a re-tokenizing member cannot be asked mid-character
            # (its tokenization stops before it), so the primary finishes the character alone.
            if own_key == EOG:
                return [Piece(b"", "draft", end=True)]
            return [self._accept(primary.key_bytes(own_key), [own_tok], "draft")]
        self.stats.verification_calls += len(self.lanes) - 1
        key, winner = self.ensemble_choice(dists)  # plain UniTE: no SAFE sharpening
        self.stats.ensembled += 1
        if key != own_key:
            self.stats.overrides += 1
        if key == EOG:  # (drafted: the primary's own token, where the members chose to end instead)
            return [Piece(b"", "ensemble", winner, end=True, drafted=None if own_key == EOG else primary.key_bytes(own_key))]
        if key == own_key:
            return [self._accept(primary.key_bytes(key), [own_tok], "ensemble", winner)]
        piece = self._accept(primary.key_bytes(key), primary.key_tokens(key), "ensemble", winner)
        piece.drafted = b"" if own_key == EOG else primary.key_bytes(own_key)  # what the primary alone would have written
        return [piece]

    def _accept(self, data: bytes, tokens: list[int], kind: str, winner: str | None = None) -> Piece:
        """Append an accepted piece: the primary's tokens, every other member's view of the text."""
        self.p_tokens.extend(tokens)
        for m in self.lanes[1:]:
            m.track.extend(data, tokens)
        return Piece(data, kind, winner)
