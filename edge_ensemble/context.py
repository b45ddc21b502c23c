"""A llama.cpp context over a :class:`~edge_ensemble.model_file.ModelFile`: KV memory, sequences, decoding.

Why not ``llama_cpp.Llama``: its ``eval`` path either gives logits for the last position only or, with
``logits_all``, keeps an ``n_ctx x n_vocab`` float array (4 GiB for Gemma 3). An ensemble needs logits at a
few chosen positions of a multi-token batch, explicit cache rollback and several sequences per context, so
:class:`Context` (llama-cpp-python's ``LlamaContext``, plus a ledger) drives ``llama_decode`` directly:

* :meth:`Context.decode` feeds any number of tokens (chunked by ``n_batch``) and returns logits only for
  the positions asked for, as NumPy views of llama.cpp's output buffer.
* :meth:`Context.trim` rolls a sequence's KV cache back (``llama_memory_seq_rm``); :meth:`Context.fork`
  copies a sequence (``llama_memory_seq_cp``) for branching.
* A ledger tracks, per sequence, the tokens in its cache and the KV cells they use (a fork shares its
  parent's cells), so the cells still free are known without asking llama.cpp.

One context must be used by one thread at a time (llama.cpp contexts are not thread-safe).
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from typing import Iterable, Sequence

import numpy as np

import llama_cpp as L

from .batch import Batch, BatchResult, SeqRequest, wanted_rows
from .errors import ContextOverflowError, ModelLoadError
from .llama_backend import Owned, last_llama_error
from .model_file import ModelFile

CANNOT_DECODE = "{} was loaded vocab_only (or closed); it cannot decode"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, so `taskset` and cgroup pinning are honoured;
    llama.cpp's spinning threads oversubscribe a core badly)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


class Context(Owned):
    """KV memory of ``n_seq_max`` sequences over an open :class:`ModelFile`, and batched decoding with chosen
    logit rows. The file must stay open until this context is closed.

    Positions are implicit: the next token of a sequence goes at ``len(tokens(seq))``.
    """

    def __init__(self, file: ModelFile, *, n_ctx: int, n_batch: int = 512, n_seq_max: int = 1,
                 n_threads: int | None = None, n_threads_batch: int | None = None, flash_attn: bool | None = False,
                 hidden_states: bool = False) -> None:
        """``n_threads``: for single-token steps (None: all usable cores); ``n_threads_batch``: for multi-token
        batches (None: ``n_threads``); ``flash_attn`` None: llama.cpp's auto; ``hidden_states``: also output
        the last hidden state at the rows asked for (a router reads it)."""
        self.file = file
        self.path = file.path
        self.name = file.name
        self.n_vocab = file.n_vocab
        self.n_embd = file.n_embd
        self.hidden_states = hidden_states
        self.llama_decode_seconds = 0.0  # time spent inside llama_decode itself (for profiling)
        self._stack = ExitStack()
        self._ctx = None

        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq_max
        cparams.kv_unified = n_seq_max > 1  # shared prefix cells after fork instead of copies
        threads = n_threads or usable_cores()
        cparams.n_threads = threads
        cparams.n_threads_batch = n_threads_batch or threads
        if flash_attn is not None:
            cparams.flash_attn_type = 1 if flash_attn else 0
        cparams.no_perf = True
        # Sliding-window models (Gemma 3) otherwise evict cells older than the window; after a rollback the
        # re-decoded positions would then miss keys they need. A full-size SWA cache keeps trim exact.
        cparams.swa_full = True
        if hidden_states:  # per-token hidden states next to the logits (no pooling)
            cparams.embeddings = True
            cparams.pooling_type = L.LLAMA_POOLING_TYPE_NONE
        self._ctx = L.llama_init_from_model(file.llama_model, cparams)
        if not self._ctx:
            reason = last_llama_error() or "out of memory?"
            raise ModelLoadError(f"cannot create a context for {self.path.name} (n_ctx={n_ctx}): {reason}")
        self._stack.callback(self._free)
        self.n_ctx: int = L.llama_n_ctx(self._ctx)
        self._memory = L.llama_get_memory(self._ctx)
        self._seq_tokens: list[list[int]] = [[] for _ in range(n_seq_max)]
        # KV-cell ledger: which cells each sequence's positions use. A fork shares its parent's cells (unified
        # cache), so cells are counted once however many sequences use them.
        self._cells: list[list[int]] = [[] for _ in range(n_seq_max)]
        self._cell_refs: dict[int, int] = {}
        self._next_cell = 0
        # One batch reused for every decode. llama.cpp may clamp n_batch (e.g. to a small n_ctx): chunk by what
        # the context really accepts.
        self._n_batch = min(n_batch, int(L.llama_n_batch(self._ctx)), int(L.llama_n_ubatch(self._ctx)))
        self._batch = Batch(self._n_batch, n_seq_max)
        self._stack.callback(self._batch.close)  # freed before the context (the stack unwinds in reverse)

    def _free(self) -> None:
        L.llama_free(self._ctx)
        self._ctx = None

    # -- decoding ------------------------------------------------------------------------------------------

    def tokens(self, seq: int = 0) -> list[int]:
        """The tokens currently in the KV cache of ``seq`` (do not mutate)."""
        return self._seq_tokens[seq]

    def n_past(self, seq: int = 0) -> int:
        """Number of tokens in ``seq``'s cache = position of its next token."""
        return len(self._seq_tokens[seq])

    def decode(self, tokens: Sequence[int], *, want: str | Sequence[int] | None = "last", seq: int = 0) -> np.ndarray:
        """Append ``tokens`` to sequence ``seq`` and return logits only where asked.

        ``want``: "last" (one row), "all", None (no logits), or indices into ``tokens`` (negative allowed).
        Returns a float32 array of shape (len(rows), n_vocab), rows in ascending position order. When all
        rows come from the final llama_decode call the result is a *view* of llama.cpp's buffer, valid until
        the next decode on this context: ``.copy()`` what you keep.
        """
        n = len(tokens)
        self._check_can_decode()
        if n == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        start = len(self._seq_tokens[seq])
        if start + n > self.n_ctx or n > self.free_cells():
            raise ContextOverflowError(
                f"{self.name}: context full ({start} + {n} tokens > n_ctx {self.n_ctx}); raise --n-ctx or shorten"
            )
        flags = np.zeros(n, dtype=np.int8)
        flags[wanted_rows(want, n)] = 1
        logits, _ = self._decode_stream(np.full(n, seq, dtype=np.int32), np.arange(start, start + n, dtype=np.int32),
                                        np.asarray(tokens, dtype=np.int32), flags)
        if not logits:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        return logits[0] if len(logits) == 1 else np.concatenate(logits, axis=0)

    def decode_many(self, requests: Sequence[SeqRequest]) -> BatchResult:
        """Append tokens to several sequences in one batch — each at its own positions, logits only at the
        rows asked for — with one llama_decode per ``n_batch`` tokens.

        A request whose tokens do not fit (its positions past ``n_ctx``, or no free cells left for it after
        the requests before it) is left out and listed in ``BatchResult.full``; the others go on. Results are
        copies, addressable per sequence (and as (sequence, row) through :meth:`BatchResult.row`).
        """
        self._check_can_decode()
        free = self.free_cells()
        taken, full = [], []
        for r in requests:
            if not (0 <= r.seq < len(self._seq_tokens)):
                raise ValueError(f"sequence {r.seq} out of range: the context has n_seq_max={len(self._seq_tokens)}")
            n = len(r.tokens)
            if n and (len(self._seq_tokens[r.seq]) + n > self.n_ctx or n > free):
                full.append(r.seq)
            elif n:
                taken.append(r)
                free -= n
        result = BatchResult({}, {}, full)
        if not taken:
            return result
        seqs = np.concatenate([np.full(len(r.tokens), r.seq, dtype=np.int32) for r in taken])
        pos = np.concatenate([np.arange(len(self._seq_tokens[r.seq]), len(self._seq_tokens[r.seq]) + len(r.tokens),
                                        dtype=np.int32) for r in taken])
        toks = np.concatenate([np.asarray(r.tokens, dtype=np.int32) for r in taken])
        flag_parts, owners = [], []
        for r in taken:
            f = np.zeros(len(r.tokens), dtype=np.int8)
            rows = wanted_rows(r.want, len(r.tokens))
            f[rows] = 1
            flag_parts.append(f)
            owners += [r.seq] * len(rows)
        logits, hidden = self._decode_stream(seqs, pos, toks, np.concatenate(flag_parts))
        owner = np.asarray(owners, dtype=np.int64)
        all_logits = np.concatenate(logits, axis=0) if logits else np.empty((0, self.n_vocab), dtype=np.float32)
        all_hidden = np.concatenate(hidden, axis=0) if hidden else None
        for r in taken:
            sel = owner == r.seq
            result.logits[r.seq] = all_logits[sel]  # boolean indexing copies: safe past the next decode
            if all_hidden is not None:
                result.hidden[r.seq] = all_hidden[sel]
        return result

    def _check_can_decode(self) -> None:
        if self._ctx is None:
            raise ModelLoadError(CANNOT_DECODE.format(self.path.name))

    def _decode_stream(self, seqs: np.ndarray, pos: np.ndarray, tok: np.ndarray,
                       flags: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """llama_decode over parallel (sequence, position, token, wants-logits) arrays, chunked by n_batch.
        Returns the flagged rows' logits (and hidden states, when on) per chunk, in stream order: the last
        chunk's as views of llama.cpp's buffers, earlier chunks' copied before the buffers are reused."""
        n = len(tok)
        batch = self._batch
        logits: list[np.ndarray] = []
        hidden: list[np.ndarray] = []
        for lo in range(0, n, self._n_batch):
            hi = min(n, lo + self._n_batch)
            m = hi - lo
            batch.set_seqs(seqs[lo:hi])
            batch.token[:m] = tok[lo:hi]
            batch.pos[:m] = pos[lo:hi]
            batch.logits[:m] = flags[lo:hi]
            batch.batch.n_tokens = m
            t0 = time.perf_counter()
            rc = L.llama_decode(self._ctx, batch.batch)
            self.llama_decode_seconds += time.perf_counter() - t0
            if rc != 0:
                for s in np.unique(seqs[lo:hi]).tolist():  # drop cells a failed call may have written
                    L.llama_memory_seq_rm(self._memory, s, len(self._seq_tokens[s]), -1)
                if rc == 1:
                    raise ContextOverflowError(f"{self.name}: no KV cache slot for {m} tokens (context full)")
                raise ModelLoadError(f"{self.name}: llama_decode failed with code {rc}")
            self._record(seqs[lo:hi], tok[lo:hi])
            n_out = int(flags[lo:hi].sum())
            if n_out and not self.hidden_states:
                view = np.ctypeslib.as_array(L.llama_get_logits(self._ctx), shape=(n_out, self.n_vocab))
                logits.append(view if hi == n else view.copy())
            elif n_out:
                # With embeddings on, llama.cpp outputs every row of the batch: pick the flagged ones by index.
                idx = np.flatnonzero(flags[lo:hi]).tolist()
                logits.append(np.stack([np.ctypeslib.as_array(L.llama_get_logits_ith(self._ctx, i), shape=(self.n_vocab,))
                                        for i in idx]))
                hidden.append(np.stack([np.ctypeslib.as_array(L.llama_get_embeddings_ith(self._ctx, i), shape=(self.n_embd,))
                                        for i in idx]))
        return logits, hidden

    # -- the ledger: tokens and KV cells per sequence ------------------------------------------------------

    def _record(self, seqs: np.ndarray, tok: np.ndarray) -> None:
        """Note decoded tokens in the per-sequence token lists and the cell ledger."""
        if not np.any(seqs != seqs[0]):  # the usual case: one sequence
            groups = [(int(seqs[0]), tok.tolist())]
        else:
            cuts = np.flatnonzero(np.diff(seqs)) + 1
            groups = [(int(g[0]), t.tolist()) for g, t in zip(np.split(seqs, cuts), np.split(tok, cuts))]
        for s, t in groups:
            self._seq_tokens[s].extend(t)
            cells = range(self._next_cell, self._next_cell + len(t))
            self._next_cell += len(t)
            self._cells[s].extend(cells)
            for c in cells:
                self._cell_refs[c] = 1

    def _release(self, seq: int, keep: int) -> None:
        """Forget the cells of ``seq`` past its first ``keep`` positions (a cell shared by a fork stays)."""
        refs = self._cell_refs
        for c in self._cells[seq][keep:]:
            left = refs.get(c, 1) - 1
            if left > 0:
                refs[c] = left
            else:
                refs.pop(c, None)
        del self._cells[seq][keep:]

    @property
    def cells_used(self) -> int:
        """KV cells in use across all sequences (cells shared between a fork and its parent count once)."""
        return len(self._cell_refs)

    def free_cells(self) -> int:
        """KV cells still free in this context."""
        return self.n_ctx - len(self._cell_refs)

    def cells_only_in(self, seqs: Iterable[int]) -> int:
        """KV cells that dropping ``seqs`` would free: theirs, shared with no other sequence."""
        seqs = set(seqs)
        held = [c for s in seqs for c in self._cells[s]]
        if not held:
            return 0
        others = {c for s, cells in enumerate(self._cells) if s not in seqs for c in cells}
        return len(set(held) - others)

    # -- sequences -----------------------------------------------------------------------------------------

    def trim(self, n: int, seq: int = 0) -> None:
        """Keep only the first ``n`` tokens of ``seq`` in the cache (roll back the rest)."""
        if n < 0:
            raise ValueError(f"trim length must be >= 0, got {n}")
        if n >= len(self._seq_tokens[seq]) and self.cached_len(seq) <= n:
            return
        # Always ask llama.cpp, even when the token list says there is nothing to drop: an interrupted
        # decode (Ctrl-C) may have left cells the list does not know about.
        if not L.llama_memory_seq_rm(self._memory, seq, n, -1):
            raise ModelLoadError(f"{self.name}: llama.cpp refused to roll back the KV cache to {n} tokens")
        del self._seq_tokens[seq][n:]
        self._release(seq, n)

    def cached_len(self, seq: int = 0) -> int:
        """Number of positions llama.cpp really holds for ``seq`` (max position + 1)."""
        return int(L.llama_memory_seq_pos_max(self._memory, seq)) + 1

    def reconcile(self, seq: int = 0) -> None:
        """Make the token list and the KV cache agree again after an interrupted call (keep the shorter)."""
        cached, listed = self.cached_len(seq), len(self._seq_tokens[seq])
        if cached != listed:
            keep = min(cached, listed)
            L.llama_memory_seq_rm(self._memory, seq, keep, -1)
            del self._seq_tokens[seq][keep:]
            self._release(seq, keep)

    def fork(self, src: int, dst: int) -> None:
        """Make sequence ``dst`` a copy of ``src`` (shared cells in the unified cache)."""
        if not (0 <= dst < len(self._seq_tokens)):
            raise ValueError(f"sequence {dst} out of range: the context has n_seq_max={len(self._seq_tokens)}")
        if dst == src:
            return
        self.drop(dst)
        L.llama_memory_seq_cp(self._memory, src, dst, -1, -1)
        self._seq_tokens[dst] = list(self._seq_tokens[src])
        self._cells[dst] = list(self._cells[src])
        for c in self._cells[dst]:
            self._cell_refs[c] += 1

    def drop(self, seq: int) -> None:
        """Remove a whole sequence; cells no other sequence shares become free."""
        L.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self._seq_tokens[seq] = []
        self._release(seq, 0)

    def reset(self, seq: int | None = None) -> None:
        """Empty one sequence's cache, or all of them."""
        for s in range(len(self._seq_tokens)) if seq is None else [seq]:
            self.drop(s)
