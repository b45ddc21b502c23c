"""A model taking part in an ensemble: its prompt, its view of the shared text, its cache, its timings."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from .alignment import SharedTrack, TokenTrack
from .decisions import EOG, Key, softmax, top_k
from .errors import IncompatibleMembersError
from .runtime import Model, common_prefix_len


def _exact_piece_ids(model: Model) -> dict[bytes, int]:
    """bytes -> the token whose piece is exactly those bytes (the first such id), for text tokens."""
    table: dict[bytes, int] = {}
    for tid, piece in enumerate(model.token_bytes):
        if piece and piece not in table:
            table[piece] = tid
    return table


class Dist:
    """One member's next-token distribution at one position.

    Cheap by default: the argmax and its probability come from one pass over the logits (float32); the full
    probabilities and the top-k are computed only if a decision reads them (verified positions), because a
    float64 softmax + top-k over 152k-262k entries per drafted token would be most of the Python time."""

    def __init__(self, logits: np.ndarray, k: int, temperature: float = 1.0) -> None:
        self.logits = np.array(logits, dtype=np.float32, copy=True)  # the caller's row is a reused buffer
        if temperature > 0 and temperature != 1.0:
            self.logits /= np.float32(temperature)
        self.k = k
        self.argmax = int(np.argmax(self.logits))
        self._probs: np.ndarray | None = None
        self._top: tuple[np.ndarray, np.ndarray] | None = None
        self.proposal: np.ndarray | None = None  # filtered probabilities a sampled token was drawn from

    @property
    def top1(self) -> float:
        """Probability of the most likely token: 1 / sum(exp(l - max))."""
        if self._probs is not None:
            return float(self._probs[self.argmax])
        m = self.logits[self.argmax]
        return float(1.0 / np.exp(self.logits - m).sum(dtype=np.float64))

    @property
    def probs(self) -> np.ndarray:
        if self._probs is None:
            self._probs = softmax(self.logits)
        return self._probs

    @property
    def top_ids(self) -> np.ndarray:
        return self._topk()[0]

    @property
    def top_probs(self) -> np.ndarray:
        return self._topk()[1]

    def _topk(self) -> tuple[np.ndarray, np.ndarray]:
        if self._top is None:
            self._top = top_k(self.probs, self.k)
        return self._top


class Member:
    """Wraps a :class:`Model` with the per-generation state an ensemble needs."""

    def __init__(self, model: Model, *, name: str | None = None, weight: float = 1.0, union_k: int = 10) -> None:
        self.model = model
        self.name = name or model.name
        self.weight = weight
        self.k = union_k  # candidates in the union; each policy sets its own (PolicyBase)
        self.prompt: list[int] = []
        self.track: TokenTrack | SharedTrack = TokenTrack(self._tokenize_text, model.token_bytes)
        self.by_id = False  # candidates keyed by token id (every member shares one tokenizer), else by bytes
        self.decode_seconds = 0.0
        self.decode_calls = 0
        self.decoded_tokens = 0
        self._first_token_cache: dict[bytes, int] = {}
        self._exact = _exact_piece_ids(model)
        self._eog = model.eog_ids
        self._eog_mask = np.zeros(model.n_vocab, dtype=bool)
        self._eog_mask[self._eog] = True
        # Empty-bytes tokens (control tokens that are not EOG) are never candidates: they carry no text.
        self._bytes = model.token_bytes

    # -- alignment -------------------------------------------------------------------------------------------

    @property
    def tokenizer_id(self) -> str:
        """Fingerprint of this member's tokenizer: equal fingerprints mean the token ids mean the same."""
        return self.model.tokenizer_fingerprint

    def align(self, *, follows_drafter: bool, by_id: bool) -> None:
        """Choose how this member sees the shared text for the next generation: the drafter's own token ids
        (same tokenizer) or its canonical re-tokenization; and whether candidates are keyed by token id."""
        self.track = SharedTrack(self._bytes) if follows_drafter else TokenTrack(self._tokenize_text, self._bytes)
        self.by_id = by_id

    @property
    def follows_drafter(self) -> bool:
        return self.track.follows_drafter

    # -- text --------------------------------------------------------------------------------------------

    def _tokenize_text(self, data: bytes) -> list[int]:
        return self.tokens_for(data)

    def tokens_for(self, data: bytes) -> list[int]:
        """This member's tokens for a piece of generated text, exact for any bytes.

        llama.cpp's tokenizer turns invalid UTF-8 (a character split between tokens, a stray byte) into
        U+FFFD; such bytes are mapped to the member's own single-byte tokens instead."""
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            head, bad, rest = data[: err.start], data[err.start : err.end], data[err.end :]
            out = self.model.tokenize(head, add_bos=False, special=False) if head else []
            for byte in bad:
                tok = self._exact.get(bytes([byte]))
                if tok is None:
                    raise IncompatibleMembersError(f"{self.name} has no token for the byte {byte:#04x}") from None
                out.append(tok)
            return out + (self.tokens_for(rest) if rest else [])
        return self.model.tokenize(data, add_bos=False, special=False)

    def key_of(self, token: int) -> Key:
        """Candidate key of a token: EOG for any end-of-generation token, else its id (when every member
        shares the tokenizer) or its bytes."""
        if self._eog_mask[token]:
            return EOG
        return token if self.by_id else self._bytes[token]

    def key_bytes(self, key: Key) -> bytes:
        """The text a (non-EOG) candidate key stands for."""
        return self._bytes[key] if isinstance(key, int) else key  # type: ignore[return-value]

    def key_tokens(self, key: Key) -> list[int]:
        """This member's tokens for a (non-EOG) candidate key."""
        return [key] if isinstance(key, int) else self.tokens_for(key)  # type: ignore[list-item, arg-type]

    def first_token(self, data: bytes | int) -> int:
        """First token of this member's tokenization of ``data`` (UniTE's rule for missing candidates);
        a piece that is exactly one of its tokens maps to that token; a token-id key is itself."""
        if isinstance(data, int):
            return data
        tok = self._exact.get(data)
        if tok is not None:
            return tok
        tok = self._first_token_cache.get(data)
        if tok is None:
            toks = self.tokens_for(data)
            tok = toks[0] if toks else -1
            self._first_token_cache[data] = tok
        return tok

    def prob_of(self, dist: Dist, key: Key) -> float:
        """This member's probability of a candidate key."""
        if key == EOG:
            if not self._eog.size:
                return 0.0
            # Keyed by id, EOG stands for the likeliest end token (so identical members rank it as each
            # ranks its own tokens); across tokenizers it is the probability of ending at all.
            eog = dist.probs[self._eog]
            return float(eog.max() if self.by_id else eog.sum())
        tok = self.first_token(key)  # type: ignore[arg-type]
        return float(dist.probs[tok]) if tok >= 0 else 0.0

    def argmax_key(self, dist: Dist) -> Key:
        return self.key_of(dist.argmax)

    def dist(self, logits: np.ndarray, temperature: float = 1.0) -> Dist:
        """Summarise one row of logits (copied: llama.cpp reuses the buffer)."""
        return Dist(logits, self.k, temperature)

    def top_keys(self, dist: Dist) -> dict[Key, float]:
        """Top-k candidates as {key: probability}; EOG tokens pooled; empty control pieces dropped."""
        out: dict[Key, float] = {}
        for tid, p in zip(dist.top_ids.tolist(), dist.top_probs.tolist()):
            key = self.key_of(tid)
            if key == EOG:
                out[EOG] = self.prob_of(dist, EOG)
            elif self._bytes[tid] and out.get(key, -1.0) < p:
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
