"""A member's next-token distribution at one position, in the two kinds a backend can give.

- :class:`FullDist` wraps a whole logits row (a local llama.cpp model).
- :class:`TopDist` holds only the top-n token ids and probabilities (what a remote server returns).

Every decision reads a distribution through the same small surface — ``argmax``, ``top1``, ``prob(ids)``,
``top(k)``, ``entropy()``, ``sampling_probs()`` — so it works with either kind.
"""

from __future__ import annotations

from typing import Union

import numpy as np

from .decisions import entropy, softmax, top_k


class FullDist:
    """A distribution from a full row of logits.

    Cheap by default: the argmax and its probability come from one pass over the logits (float32); the full
    probabilities and the top-k are computed only if a decision reads them (verified positions), because a
    float64 softmax + top-k over 152k-262k entries per drafted token would be most of the Python time."""

    kind = "full"

    def __init__(self, logits: np.ndarray, temperature: float = 1.0) -> None:
        self.logits = np.array(logits, dtype=np.float32, copy=True)  # the caller's row is a reused buffer
        if temperature > 0 and temperature != 1.0:
            self.logits /= np.float32(temperature)
        self.n_vocab = self.logits.size
        self.argmax = int(np.argmax(self.logits))
        self._probs: np.ndarray | None = None
        self._top: tuple[int, np.ndarray, np.ndarray] | None = None
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
        """All probabilities (float64)."""
        if self._probs is None:
            self._probs = softmax(self.logits)
        return self._probs

    def prob(self, ids: int | np.ndarray) -> float | np.ndarray:
        """Probability of one token id (a float) or of an array of ids."""
        return float(self.probs[ids]) if isinstance(ids, (int, np.integer)) else self.probs[ids]

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids and probabilities of the k likeliest tokens, likeliest first."""
        if self._top is None or self._top[0] != k:
            ids, probs = top_k(self.probs, k)
            self._top = (k, ids, probs)
        return self._top[1], self._top[2]

    def entropy(self) -> float:
        """Shannon entropy of the whole distribution, in nats."""
        return entropy(self.probs)

    def sampling_probs(self) -> np.ndarray:
        """A full-length probability vector to filter and sample from."""
        return self.probs


class TopDist:
    """A distribution known only through its top-n tokens (ids and probabilities, likeliest first).

    Tokens outside the top-n have probability 0 here: the mass a server did not report is unknown, so every
    decision treats them as not proposed (as UniTE's union does with tokens outside a member's top-k)."""

    kind = "top"

    def __init__(self, ids: np.ndarray, probs: np.ndarray, n_vocab: int, temperature: float = 1.0) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        probs = np.asarray(probs, dtype=np.float64)
        if ids.size == 0 or ids.shape != probs.shape:
            raise ValueError("a top-n distribution needs at least one (id, probability) pair")
        if temperature > 0 and temperature != 1.0:  # p^(1/T) renormalised over the known mass
            known = probs.sum()
            probs = probs ** (1.0 / temperature)
            probs = probs / probs.sum() * known
        order = np.argsort(-probs, kind="stable")
        self.ids, self._p = ids[order], probs[order]
        self.n_vocab = n_vocab
        self.argmax = int(self.ids[0])
        self.proposal: np.ndarray | None = None
        self._lookup = dict(zip(self.ids.tolist(), self._p.tolist()))

    @property
    def top1(self) -> float:
        return float(self._p[0])

    def prob(self, ids: int | np.ndarray) -> float | np.ndarray:
        if isinstance(ids, (int, np.integer)):
            return self._lookup.get(int(ids), 0.0)
        return np.array([self._lookup.get(int(i), 0.0) for i in np.asarray(ids).tolist()])

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.ids[:k], self._p[:k]

    def entropy(self) -> float:
        """Entropy of the top-n renormalised (vLLM's top-20 convention; a lower bound of the true one)."""
        return entropy(self._p / self._p.sum())

    def sampling_probs(self) -> np.ndarray:
        out = np.zeros(self.n_vocab, dtype=np.float64)
        out[self.ids] = self._p / self._p.sum()
        return out


Dist = Union[FullDist, TopDist]
