"""A model taking part in an ensemble (:class:`Member`) and its part in one generation (:class:`Lane`).

A member is long-lived: a backend, a name, the tables that map text to its tokens. A lane is made per
generation (and per branch): the sequence it decodes in, its prompt, its view of the shared text, the
candidate-key convention of this generation, its timers. Two generations on one loaded ensemble are two lanes.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from .alignment import SharedTrack, TokenTrack
from .backends import Backend, LocalBackend
from .decisions import EOG, Key
from .dist import Dist
from .errors import IncompatibleMembersError
from .runtime import Model

DEFAULT_UNION_K = 10  # a lane's union size until its policy sets the call's union_k (that option's default)


def _exact_piece_ids(token_bytes: Sequence[bytes]) -> dict[bytes, int]:
    """bytes -> the token whose piece is exactly those bytes (the first such id), for text tokens."""
    table: dict[bytes, int] = {}
    for tid, piece in enumerate(token_bytes):
        if piece and piece not in table:
            table[piece] = tid
    return table


class Member:
    """One model of an ensemble behind a :class:`~edge_ensemble.backends.Backend` (a :class:`Model` is
    wrapped in a local backend)."""

    def __init__(self, backend: Backend | Model, *, name: str | None = None) -> None:
        self.backend: Backend = LocalBackend(backend) if isinstance(backend, Model) else backend
        self.name = name or self.backend.name
        self._bytes = self.backend.token_bytes
        self._exact = _exact_piece_ids(self._bytes)
        self._first_token_cache: dict[bytes, int] = {}
        self._eog = np.asarray(self.backend.eog_ids, dtype=np.int64)
        self._eog_mask = np.zeros(self.backend.n_vocab, dtype=bool)
        self._eog_mask[self._eog] = True

    @property
    def model(self) -> Model:
        """The llama.cpp model of a local member (for inspection: policies use the backend)."""
        return self.backend.model  # type: ignore[attr-defined]

    @property
    def tokenizer_id(self) -> str:
        """Fingerprint of this member's tokenizer: equal fingerprints mean the token ids mean the same."""
        return self.backend.tokenizer_fingerprint

    # -- text ----------------------------------------------------------------------------------------------

    def tokens_for(self, data: bytes) -> list[int]:
        """This member's tokens for a piece of generated text, exact for any bytes.

        llama.cpp's tokenizer turns invalid UTF-8 (a character split between tokens, a stray byte) into
        U+FFFD; such bytes are mapped to the member's own single-byte tokens instead."""
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            head, bad, rest = data[: err.start], data[err.start : err.end], data[err.end :]
            out = self.backend.tokenize(head) if head else []
            for byte in bad:
                tok = self._exact.get(bytes([byte]))
                if tok is None:
                    raise IncompatibleMembersError(f"{self.name} has no token for the byte {byte:#04x}") from None
                out.append(tok)
            return out + (self.tokens_for(rest) if rest else [])
        return self.backend.tokenize(data)

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

    def token_bytes(self, token: int) -> bytes:
        return self._bytes[token]

    def is_eog(self, token: int) -> bool:
        return bool(self._eog_mask[token])

    # -- lanes ---------------------------------------------------------------------------------------------

    @property
    def eog_ids(self) -> np.ndarray:
        """Every end-of-generation token id."""
        return self._eog

    def open_lane(self, prompt: list[int], *, follows_drafter: bool = False, by_id: bool = False,
                  twin_of: "Lane | None" = None) -> "Lane":
        """A new lane on a free sequence of this member's backend, holding (once fed) ``prompt``.
        ``twin_of``: a lane of another member with this very backend (the same weights listed twice): the new
        lane shares its sequence and never decodes on its own."""
        seq = twin_of.seq if twin_of is not None else self.backend.open_seq()
        return Lane(self, seq, prompt, follows_drafter=follows_drafter, by_id=by_id, weight=1.0,
                    owns_seq=twin_of is None)


class Lane:
    """One member's part in one generation: a sequence of its backend, the prompt, its view of the shared text
    (the drafter's ids, or its own re-tokenization), how candidates are keyed, and its timers."""

    def __init__(self, member: Member, seq: int, prompt: list[int], *, follows_drafter: bool, by_id: bool,
                 weight: float, owns_seq: bool = True) -> None:
        self.member = member
        self.backend = member.backend
        self.seq = seq
        self.prompt = prompt
        self.by_id = by_id  # candidates keyed by token id (every member shares one tokenizer), else by bytes
        self.weight = weight  # its policy sets the configured weights, when given (PolicyBase)
        self.k = DEFAULT_UNION_K  # candidates this lane brings to the union; its policy sets the call's union_k
        self.track: TokenTrack | SharedTrack = (SharedTrack(member._bytes) if follows_drafter
                                               else TokenTrack(member.tokens_for, member._bytes))
        self.decode_seconds = 0.0
        self.decode_calls = 0
        self.decoded_tokens = 0
        self.closed = not owns_seq  # a twin's lane borrows its twin's sequence: nothing to give back

    @property
    def name(self) -> str:
        return self.member.name

    @property
    def follows_drafter(self) -> bool:
        return self.track.follows_drafter

    # -- candidate keys ------------------------------------------------------------------------------------

    def key_of(self, token: int) -> Key:
        """Candidate key of a token: EOG for any end-of-generation token, else its id (when every member
        shares the tokenizer) or its bytes."""
        m = self.member
        if m._eog_mask[token]:
            return EOG
        return token if self.by_id else m._bytes[token]

    def key_bytes(self, key: Key) -> bytes:
        """The text a (non-EOG) candidate key stands for."""
        return self.member._bytes[key] if isinstance(key, int) else key  # type: ignore[return-value]

    def key_tokens(self, key: Key) -> list[int]:
        """This member's tokens for a (non-EOG) candidate key."""
        return [key] if isinstance(key, int) else self.member.tokens_for(key)  # type: ignore[list-item, arg-type]

    def first_token(self, key: bytes | int) -> int:
        return self.member.first_token(key)

    def prob_of(self, dist: Dist, key: Key) -> float:
        """This member's probability of a candidate key."""
        if key == EOG:
            eog = self.member.eog_ids
            if not eog.size:
                return 0.0
            # Keyed by id, EOG stands for the likeliest end token (so identical members rank it as each
            # ranks its own tokens); across tokenizers it is the probability of ending at all.
            p = dist.prob(eog)
            return float(p.max() if self.by_id else p.sum())
        tok = self.member.first_token(key)  # type: ignore[arg-type]
        return float(dist.prob(tok)) if tok >= 0 else 0.0

    def argmax_key(self, dist: Dist) -> Key:
        return self.key_of(dist.argmax)

    def top_keys(self, dist: Dist) -> dict[Key, float]:
        """Top-k candidates as {key: probability}; EOG tokens pooled; empty control pieces dropped."""
        out: dict[Key, float] = {}
        ids, probs = dist.top(self.k)
        for tid, p in zip(ids.tolist(), probs.tolist()):
            key = self.key_of(tid)
            if key == EOG:
                out[EOG] = self.prob_of(dist, EOG)
            elif self.member._bytes[tid] and out.get(key, -1.0) < p:
                out[key] = p
        return out

    # -- decoding ------------------------------------------------------------------------------------------

    def feed(self, target: Sequence[int], rows: Sequence[int] = (), temperature: float = 1.0) -> dict[int, Dist]:
        """Make this lane's sequence hold ``target``; distributions at absolute positions ``rows`` (each the
        distribution of the token after that position). Re-feeds from the earliest position that is new or
        wanted, in one decode call."""
        t0 = time.perf_counter()
        dists, n = self.backend.feed(self.seq, target, rows, temperature)
        self._count(t0, n)
        return dists

    def feed_hidden(self, target: Sequence[int], temperature: float = 1.0) -> tuple[Dist, np.ndarray]:
        """:meth:`feed` with the distribution and the last hidden state at the last row (a local backend loaded
        with hidden states: a router)."""
        t0 = time.perf_counter()
        dist, hidden, n = self.backend.feed_hidden(self.seq, target, temperature)  # type: ignore[attr-defined]
        self._count(t0, n)
        return dist, hidden

    def step(self, token: int, temperature: float = 1.0) -> Dist:
        """Append one token; the distribution of the next one."""
        t0 = time.perf_counter()
        dist = self.backend.step(self.seq, token, temperature)
        self._count(t0, 1)
        return dist

    @property
    def drafts_in_one_call(self) -> bool:
        """True when the backend can draft several greedy tokens in one call (a server: one request)."""
        return hasattr(self.backend, "draft")

    def draft(self, target: Sequence[int], n: int, temperature: float = 1.0) -> list[tuple[int, Dist]]:
        """Make the sequence hold ``target``; the backend's own greedy continuation of ``n`` tokens, each with the
        distribution it was drawn from (see :meth:`edge_ensemble.remote.RemoteBackend.draft`)."""
        t0 = time.perf_counter()
        out = self.backend.draft(self.seq, target, n, temperature)  # type: ignore[attr-defined]
        self._count(t0, len(out))
        return out

    def _count(self, t0: float, n: int) -> None:
        if n:
            self.decode_seconds += time.perf_counter() - t0
            self.decode_calls += 1
            self.decoded_tokens += n

    @property
    def room(self) -> int:
        """Free positions left in this lane's sequence."""
        return self.backend.room(self.seq)

    @property
    def cached(self) -> list[int]:
        """The tokens this lane's sequence holds now (prompt first)."""
        return self.backend.cached(self.seq)

    def fork(self) -> "Lane":
        """A branch: a new sequence sharing this one's cells, a copy of its track."""
        lane = Lane(self.member, self.backend.fork_seq(self.seq), list(self.prompt), follows_drafter=self.follows_drafter,
                    by_id=self.by_id, weight=self.weight)
        lane.track = self.track.copy()
        return lane

    def close(self, *, keep_cache: bool = True) -> None:
        """Give the sequence back (its cells stay for the next generation's prefix unless ``keep_cache`` is
        False)."""
        if not self.closed:
            self.closed = True
            self.backend.close_seq(self.seq, keep_cache=keep_cache)
