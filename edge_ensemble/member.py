"""A model taking part in an ensemble: its prompt, its view of the shared text, its cache, its timings."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .alignment import TokenTrack
from .decisions import EOG, Key, softmax, top_k
from .runtime import Model, common_prefix_len


@dataclass
class Dist:
    """One member's next-token distribution at one position, summarised for the decisions."""

    probs: np.ndarray  # full-vocabulary probabilities (float64)
    top_ids: np.ndarray
    top_probs: np.ndarray
    argmax: int

    @property
    def top1(self) -> float:
        return float(self.top_probs[0])


class Member:
    """Wraps a :class:`Model` with the per-generation state an ensemble needs."""

    def __init__(self, model: Model, *, name: str | None = None, weight: float = 1.0, top_k: int = 10) -> None:
        self.model = model
        self.name = name or model.name
        self.weight = weight
        self.k = top_k
        self.prompt: list[int] = []
        self.track = TokenTrack(self._tokenize_text, model.token_bytes)
        self.decode_seconds = 0.0
        self.decode_calls = 0
        self.decoded_tokens = 0
        self._first_token_cache: dict[bytes, int] = {}
        self._eog = model.eog_ids
        self._eog_mask = np.zeros(model.n_vocab, dtype=bool)
        self._eog_mask[self._eog] = True
        # Empty-bytes tokens (control tokens that are not EOG) are never candidates: they carry no text.
        self._bytes = model.token_bytes

    # -- text --------------------------------------------------------------------------------------------

    def _tokenize_text(self, data: bytes) -> list[int]:
        return self.model.tokenize(data, add_bos=False, special=False)

    def key_of(self, token: int) -> Key:
        """Candidate key of a token: its bytes, or EOG for any end-of-generation token."""
        return EOG if self._eog_mask[token] else self._bytes[token]

    def first_token(self, data: bytes) -> int:
        """First token of this member's tokenization of ``data`` (UniTE's rule for missing candidates)."""
        tok = self._first_token_cache.get(data)
        if tok is None:
            toks = self._tokenize_text(data)
            tok = toks[0] if toks else -1
            self._first_token_cache[data] = tok
        return tok

    def prob_of(self, dist: Dist, key: Key) -> float:
        """This member's probability of a candidate key."""
        if key == EOG:
            return float(dist.probs[self._eog].sum()) if self._eog.size else 0.0
        tok = self.first_token(key)  # type: ignore[arg-type]
        return float(dist.probs[tok]) if tok >= 0 else 0.0

    def argmax_key(self, dist: Dist) -> Key:
        return self.key_of(dist.argmax)

    def dist(self, logits: np.ndarray, temperature: float = 1.0) -> Dist:
        """Summarise one row of logits (softmax over the vocabulary, vectorised; top-k by argpartition)."""
        probs = softmax(logits, temperature if temperature > 0 else 1.0)
        ids, p = top_k(probs, self.k)
        return Dist(probs=probs, top_ids=ids, top_probs=p, argmax=int(ids[0]))

    def top_keys(self, dist: Dist) -> dict[Key, float]:
        """Top-k candidates as {key: probability}; EOG tokens pooled; empty control pieces dropped."""
        out: dict[Key, float] = {}
        for tid, p in zip(dist.top_ids.tolist(), dist.top_probs.tolist()):
            key = self.key_of(tid)
            if key == EOG:
                out[EOG] = self.prob_of(dist, EOG)
            elif key and out.get(key, -1.0) < p:
                out[key] = p
        return out

    # -- cache -------------------------------------------------------------------------------------------

    def feed(self, target: Sequence[int], rows: Sequence[int] = ()) -> dict[int, np.ndarray]:
        """Make the cache hold ``target`` and return logits rows at absolute positions ``rows``.

        Keeps the longest common prefix with what is cached, re-feeds from the earliest position that is
        either new or whose logits are wanted, in one llama_decode call (chunked by n_batch).
        """
        model = self.model
        common = common_prefix_len(model.tokens(), target)
        start = min([common, *rows]) if rows else common
        if start == len(target) and not rows:
            model.trim(start)
            return {}
        if start == len(target):  # logits wanted for the last cached token: re-feed it
            start -= 1
        model.trim(start)
        t0 = time.perf_counter()
        out = model.decode(target[start:], want=[r - start for r in sorted(rows)] if rows else None)
        self.decode_seconds += time.perf_counter() - t0
        self.decode_calls += 1
        self.decoded_tokens += len(target) - start
        return {r: out[i] for i, r in enumerate(sorted(rows))}

    def decode_one(self, token: int) -> np.ndarray:
        """Append one token, return the next-token logits (a view)."""
        t0 = time.perf_counter()
        out = self.model.decode([token], want="last")
        self.decode_seconds += time.perf_counter() - t0
        self.decode_calls += 1
        self.decoded_tokens += 1
        return out[0]

    def reset_timers(self) -> None:
        self.decode_seconds = 0.0
        self.decode_calls = 0
        self.decoded_tokens = 0

    @property
    def room(self) -> int:
        """Free positions left in this member's context."""
        return self.model.n_ctx - self.model.n_past()
