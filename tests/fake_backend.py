"""A scripted backend: a member whose next-token distributions are given by the test, keyed by the text
generated so far. It implements the whole :class:`edge_ensemble.backends.Backend` protocol, so SAFE's and
every-token's decisions can be driven position by position without a real model (as `llm`'s tests drive a
fake model that replays queued output).

The vocabulary is a list of byte pieces (plus a prompt marker and an end token, both with empty text);
tokenization is greedy longest match, so two fakes with different pieces tokenize the same text differently.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Mapping, Sequence

import numpy as np

from edge_ensemble.decisions import EOG
from edge_ensemble.dist import Dist, FullDist, TopDist

Script = Callable[[bytes], Mapping[object, float]]  # generated text -> {piece bytes or EOG: probability}


class FakeBackend:
    """Replays ``script``: the distribution after generated text ``t`` is ``script(t)`` (pieces not in the
    script share whatever mass is left). ``kind`` is "full" (a logits row) or "top" (top-n only, as a
    remote server gives)."""

    PROMPT, END = 0, 1  # token ids of the prompt marker and the end-of-generation token

    def __init__(self, pieces: Sequence[bytes], script: Script | Mapping[bytes, Mapping[object, float]], *,
                 name: str = "fake", kind: str = "full", n_ctx: int = 256, n_seq_max: int = 4) -> None:
        self.name = name
        self.kind = kind
        self.token_bytes: list[bytes] = [b"", b""] + [bytes(p) for p in pieces]
        self.n_vocab = len(self.token_bytes)
        self.n_ctx = n_ctx
        self.eog_ids = np.array([self.END], dtype=np.int64)
        self.tokenizer_fingerprint = hashlib.sha256(b"\0".join(self.token_bytes)).hexdigest()
        self._script = script if callable(script) else (lambda text, table=script: table.get(text, {EOG: 1.0}))
        self._ids = {p: i for i, p in enumerate(self.token_bytes) if p}
        self._longest = max(len(p) for p in self._ids)
        self._seqs: dict[int, list[int]] = {}
        self._free = list(range(n_seq_max))
        self.feeds: list[tuple[int, int, tuple[int, ...]]] = []  # (seq, tokens decoded, rows) per feed call
        self.steps = 0

    # -- vocabulary ----------------------------------------------------------------------------------------

    def is_eog(self, token: int) -> bool:
        return token == self.END

    def tokenize(self, data: bytes) -> list[int]:
        out, i = [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                tok = self._ids.get(data[i:i + n])
                if tok is not None:
                    out.append(tok)
                    i += n
                    break
            else:
                raise ValueError(f"{self.name}: no piece for {data[i:i + 1]!r}")
        return out

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return [self.PROMPT]

    def raw_prompt(self, text: str) -> list[int]:
        return [self.PROMPT] + self.tokenize(text.encode())

    # -- sequences -----------------------------------------------------------------------------------------

    def open_seq(self) -> int:
        seq = min(self._free)
        self._free.remove(seq)
        self._seqs.setdefault(seq, [])
        return seq

    def fork_seq(self, src: int) -> int:
        seq = self.open_seq()
        self._seqs[seq] = list(self._seqs[src])
        return seq

    def close_seq(self, seq: int, *, keep_cache: bool = True) -> None:
        if not keep_cache:
            self._seqs[seq] = []
        self._free.append(seq)

    def cached(self, seq: int) -> list[int]:
        return self._seqs[seq]

    def room(self, seq: int) -> int:
        return self.n_ctx - len(self._seqs[seq])

    # -- distributions -------------------------------------------------------------------------------------

    def dist_after(self, tokens: Sequence[int], temperature: float = 1.0) -> Dist:
        """The scripted distribution after ``tokens`` (prompt marker first)."""
        text = b"".join(self.token_bytes[t] for t in tokens[1:])
        table = {(self.END if k == EOG else self._ids[k]): p for k, p in self._script(text).items()}
        ids = np.array(list(table), dtype=np.int64)
        probs = np.array(list(table.values()), dtype=np.float64)
        if self.kind == "top":
            return TopDist(ids, probs, self.n_vocab, temperature)
        full = np.full(self.n_vocab, max(1.0 - probs.sum(), 0.0) / max(self.n_vocab - len(ids), 1))
        full[ids] = probs
        return FullDist(np.log(np.maximum(full, 1e-12)), temperature)

    def feed(self, seq: int, target: Sequence[int], rows: Sequence[int], temperature: float) -> tuple[dict[int, Dist], int]:
        cached = self._seqs[seq]
        common = 0
        while common < min(len(cached), len(target)) and cached[common] == target[common]:
            common += 1
        start = min([common, *rows]) if rows else common
        if start == len(target) and rows:
            start -= 1
        self._seqs[seq] = list(target)
        n = len(target) - start
        if n:
            self.feeds.append((seq, n, tuple(sorted(rows))))
        return {r: self.dist_after(target[: r + 1], temperature) for r in rows}, n

    def feed_many(self, requests, temperature):
        return [self.feed(seq, target, rows, temperature) for seq, target, rows in requests]

    def step(self, seq: int, token: int, temperature: float) -> Dist:
        if len(self._seqs[seq]) >= self.n_ctx:
            from edge_ensemble.errors import ContextOverflowError

            raise ContextOverflowError(f"{self.name}: context full")
        self._seqs[seq].append(token)
        self.steps += 1
        return self.dist_after(self._seqs[seq], temperature)
