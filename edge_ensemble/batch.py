"""The batch a context decodes, and what a multi-sequence decode is asked and gives back.

:class:`Batch` is one ``llama_batch`` (llama-cpp-python's ``LlamaBatch``) reused for every decode of a
context and filled through NumPy views of its C arrays: no per-token ctypes call. :class:`SeqRequest` and
:class:`BatchResult` are the request and result of :meth:`~edge_ensemble.context.Context.decode_many`.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Sequence

import numpy as np

import llama_cpp as L


class Batch:
    """A ``llama_batch`` of up to ``capacity`` tokens, one sequence id per token, open until :meth:`close`.

    ``token``, ``pos`` and ``logits`` (the wants-logits flags) are NumPy views of the C arrays: fill their
    first ``m`` entries, :meth:`set_seqs` for the same ``m``, then set ``batch.n_tokens = m``.
    """

    def __init__(self, capacity: int, n_seq_max: int) -> None:
        self._stack = ExitStack()
        self.capacity = capacity
        self.batch = L.llama_batch_init(capacity, 0, n_seq_max)
        self._stack.callback(self._free)
        b = self.batch
        self.token = np.ctypeslib.as_array(b.token, shape=(capacity,))
        self.pos = np.ctypeslib.as_array(b.pos, shape=(capacity,))
        self.logits = np.ctypeslib.as_array(b.logits, shape=(capacity,))
        np.ctypeslib.as_array(b.n_seq_id, shape=(capacity,))[:] = 1  # one sequence per token, always
        # seq_id[i] is a separate C array per slot (no NumPy view): remember what each slot holds and write
        # only the slots whose sequence changes.
        self._seq = np.zeros(capacity, dtype=np.int32)
        for i in range(capacity):
            b.seq_id[i][0] = 0

    def set_seqs(self, seqs: np.ndarray) -> None:
        """Set the sequence ids of the first ``len(seqs)`` slots."""
        m = len(seqs)
        for i in np.flatnonzero(self._seq[:m] != seqs).tolist():
            self.batch.seq_id[i][0] = int(seqs[i])
        self._seq[:m] = seqs

    def _free(self) -> None:
        L.llama_batch_free(self.batch)
        self.batch = None

    def close(self) -> None:
        """Free the batch. Safe to call twice."""
        self._stack.close()

    def __del__(self) -> None:  # a safety net; the owning context closes it
        try:
            self.close()
        except Exception:
            pass


def wanted_rows(want: str | Sequence[int] | None, n: int) -> np.ndarray:
    """Indices of the rows among ``n`` tokens whose logits ``want`` asks for: "last", "all", None (none) or
    indices (negative ones count from the end), ascending and without repeats."""
    if want is None:
        return np.empty(0, dtype=np.int64)
    if isinstance(want, str):
        if want == "last":
            return np.array([n - 1])
        if want == "all":
            return np.arange(n)
        raise ValueError(f"want must be 'last', 'all', None or indices, not {want!r}")
    rows = np.unique(np.asarray(want, dtype=np.int64) % n) if len(want) else np.empty(0, dtype=np.int64)
    return rows


@dataclass
class SeqRequest:
    """Tokens to append to one sequence in a multi-sequence batch (:meth:`Context.decode_many`), and which of
    them need logits: "last", "all", None or indices into ``tokens``."""

    seq: int
    tokens: Sequence[int]
    want: str | Sequence[int] | None = "last"


@dataclass
class BatchResult:
    """What one multi-sequence batch produced."""

    logits: dict[int, np.ndarray]  # sequence -> (rows asked for, n_vocab) float32, ascending positions
    hidden: dict[int, np.ndarray]  # sequence -> (rows, n_embd) last hidden states, when the context makes them
    full: list[int]  # sequences left out because their tokens do not fit: they end with finish_reason "length"

    def row(self, seq: int, i: int = -1) -> np.ndarray:
        """Logits of one (sequence, row)."""
        return self.logits[seq][i]
