"""One GGUF model over the llama.cpp C API (through llama-cpp-python's ctypes bindings).

Why not ``llama_cpp.Llama``: its ``eval`` path either gives logits for the last position only or, with
``logits_all``, keeps an ``n_ctx x n_vocab`` float array (4 GiB for Gemma 3). An ensemble needs logits at a
few chosen positions of a multi-token batch, explicit cache rollback and several sequences per context, so
this module drives ``llama_decode`` directly:

* :meth:`Model.decode` feeds any number of tokens (chunked by ``n_batch``) and returns logits only for
  the positions asked for, as NumPy views of llama.cpp's output buffer.
* :meth:`Model.trim` rolls a sequence's KV cache back (``llama_memory_seq_rm``); :meth:`Model.fork`
  copies a sequence (``llama_memory_seq_cp``) for branching.
* Tokenization works in bytes: :meth:`Model.piece` gives a token's exact bytes (no 32-byte truncation),
  :attr:`Model.token_bytes` caches the whole vocabulary.

One ``Model`` must be used by one thread at a time (llama.cpp contexts are not thread-safe).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

import llama_cpp as L

from .chat import render_messages
from .errors import ContextOverflowError, ModelLoadError
from .gguf import check_magic
from .options import LOAD

# ----------------------------------------------------------------------------------------------------------
# Logging: llama.cpp logs through one process-wide callback. We keep its recent error lines so that a failed
# load can say *why* in one line, and stay silent unless EDGE_ENSEMBLE_VERBOSE is set.

_LOG_LEVEL_ERROR = 4  # GGML_LOG_LEVEL_ERROR
_LOG_LEVEL_WARN = 3
_recent_errors: deque[str] = deque(maxlen=8)
_log_lock = threading.Lock()


@L.llama_log_callback
def _log_callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", errors="replace") if text else ""
    if level in (_LOG_LEVEL_ERROR, _LOG_LEVEL_WARN) and message.strip():
        with _log_lock:
            _recent_errors.append(message.strip())
    if os.environ.get("EDGE_ENSEMBLE_VERBOSE"):
        os.write(2, message.encode("utf-8", errors="replace"))


_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        L.llama_backend_init()
        L.llama_log_set(_log_callback, ctypes.c_void_p(0))
        _backend_ready = True


def _last_llama_error() -> str:
    with _log_lock:
        errors = [e for e in _recent_errors if e]
        _recent_errors.clear()
    return errors[-1] if errors else ""


# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadOptions:
    """How to load one model. Validated once, at the edge (CLI / API)."""

    n_ctx: int = LOAD["n_ctx"].default
    n_threads: int | None = LOAD["n_threads"].default  # single-token steps; None = all cores
    n_threads_batch: int | None = None  # multi-token batches; None = n_threads
    n_gpu_layers: int = LOAD["n_gpu_layers"].default  # -1 = offload everything (Metal / CUDA builds); 0 = CPU only
    flash_attn: bool | None = LOAD["flash_attn"].default  # off = llama-cpp-python's default (exact same logits); None = auto
    n_batch: int = 512
    n_seq_max: int = 1  # > 1 for several sequences (branches, requests) in one context; the KV cache is then unified
    hidden_states: bool = False  # also output the last hidden state at the rows asked for (a router reads it)
    vocab_only: bool = False  # tokenizer only: loads in milliseconds, no decoding
    # Parse control-token text inside message contents as control tokens (llama-cpp-python's behaviour, a
    # prompt-injection hole); off: only the chat template's own markup yields control tokens.
    control_tokens_in_messages: bool = LOAD["control_tokens_in_messages"].default


def check_gguf_file(path: Path) -> None:
    """Refuse, with one line, a path that is missing, not a file, or not a GGUF file."""
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a file; give the path of a .gguf model file")
    check_magic(path)


class Model:
    """One GGUF model: tokenizer, KV cache, batched decoding with chosen logit rows.

    The model tracks, per sequence, the tokens that are in its KV cache (``tokens(seq)``); positions are
    implicit: the next token of a sequence goes at ``len(tokens(seq))``.
    """

    def __init__(self, path: str | os.PathLike[str], options: LoadOptions = LoadOptions()) -> None:
        _init_backend()
        self.path = Path(path)
        self.options = options
        check_gguf_file(self.path)
        self._model = None
        self._ctx = None
        self._batch = None
        self._token_bytes: list[bytes] | None = None
        self._control_re: re.Pattern[bytes] | None = None  # built on first prompt (a vocabulary scan)
        self._control_ids: dict[bytes, int] = {}

        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = options.n_gpu_layers
        mparams.vocab_only = options.vocab_only
        _last_llama_error()  # drop stale messages
        self._model = L.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            reason = _last_llama_error() or "llama.cpp could not read it"
            raise ModelLoadError(f"cannot load {self.path}: {reason} (truncated or corrupt GGUF?)")
        self._vocab = L.llama_model_get_vocab(self._model)
        self.n_vocab: int = L.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train: int = L.llama_model_n_ctx_train(self._model)
        self.name: str = self.metadata("general.name") or self.path.stem
        self.architecture: str = self.metadata("general.architecture") or "unknown"
        self.bos_id: int = L.llama_vocab_bos(self._vocab)
        self.eos_id: int = L.llama_vocab_eos(self._vocab)
        self.add_bos: bool = bool(L.llama_vocab_get_add_bos(self._vocab))
        self.chat_template: str | None = self.metadata("tokenizer.chat_template")

        if L.llama_model_is_recurrent(self._model) or L.llama_model_is_hybrid(self._model):
            self.close()
            raise ModelLoadError(
                f"{self.path.name} ({self.architecture}) uses recurrent memory, which cannot be rolled back "
                "token by token; edge-ensemble needs a transformer model"
            )
        self.n_ctx = 0
        self.llama_decode_seconds = 0.0  # time spent inside llama_decode itself (for profiling)
        self._seq_tokens: list[list[int]] = []
        if not options.vocab_only:
            self._init_context()

    # -- setup ---------------------------------------------------------------------------------------------

    def _init_context(self) -> None:
        o = self.options
        cparams = L.llama_context_default_params()
        cparams.n_ctx = o.n_ctx
        cparams.n_batch = o.n_batch
        cparams.n_ubatch = o.n_batch
        cparams.n_seq_max = o.n_seq_max
        cparams.kv_unified = o.n_seq_max > 1  # shared prefix cells after fork instead of copies
        threads = o.n_threads or usable_cores()
        cparams.n_threads = threads
        cparams.n_threads_batch = o.n_threads_batch or threads
        if o.flash_attn is not None:
            cparams.flash_attn_type = 1 if o.flash_attn else 0
        cparams.no_perf = True
        # Sliding-window models (Gemma 3) otherwise evict cells older than the window; after a rollback the
        # re-decoded positions would then miss keys they need. A full-size SWA cache keeps trim exact.
        cparams.swa_full = True
        if o.hidden_states:  # per-token hidden states next to the logits (no pooling)
            cparams.embeddings = True
            cparams.pooling_type = L.LLAMA_POOLING_TYPE_NONE
        self._ctx = L.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            reason = _last_llama_error() or "out of memory?"
            self.close()
            raise ModelLoadError(f"cannot create a context for {self.path.name} (n_ctx={o.n_ctx}): {reason}")
        self.n_ctx = L.llama_n_ctx(self._ctx)
        self._memory = L.llama_get_memory(self._ctx)
        self._seq_tokens = [[] for _ in range(o.n_seq_max)]
        self.n_embd: int = int(L.llama_model_n_embd(self._model))
        # KV-cell ledger: which cells each sequence's positions use. A fork shares its parent's cells (unified
        # cache), so cells are counted once however many sequences use them.
        self._cells: list[list[int]] = [[] for _ in range(o.n_seq_max)]
        self._cell_refs: dict[int, int] = {}
        self._next_cell = 0

        # One batch reused for every decode; NumPy views let us fill it without per-token ctypes calls.
        # llama.cpp may clamp n_batch (e.g. to a small n_ctx): chunk by what the context really accepts.
        self._n_batch = min(o.n_batch, int(L.llama_n_batch(self._ctx)), int(L.llama_n_ubatch(self._ctx)))
        self._batch = L.llama_batch_init(self._n_batch, 0, o.n_seq_max)
        b = self._batch
        self._b_token = np.ctypeslib.as_array(b.token, shape=(self._n_batch,))
        self._b_pos = np.ctypeslib.as_array(b.pos, shape=(self._n_batch,))
        self._b_nseq = np.ctypeslib.as_array(b.n_seq_id, shape=(self._n_batch,))
        self._b_logits = np.ctypeslib.as_array(b.logits, shape=(self._n_batch,))
        self._b_nseq[:] = 1
        # seq_id[i] is a separate C array per slot (no NumPy view): remember what each slot holds and write
        # only the slots whose sequence changes.
        self._b_seq = np.zeros(self._n_batch, dtype=np.int32)
        for i in range(self._n_batch):
            self._batch.seq_id[i][0] = 0

    def _fill_seq_ids(self, seqs: np.ndarray) -> None:
        m = len(seqs)
        for i in np.flatnonzero(self._b_seq[:m] != seqs).tolist():
            self._batch.seq_id[i][0] = int(seqs[i])
        self._b_seq[:m] = seqs

    def close(self) -> None:
        """Free the context, batch and model. Safe to call twice."""
        if self._batch is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            L.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            L.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a safety net; explicit close() is the contract
        try:
            self.close()
        except Exception:
            pass

    # -- metadata ------------------------------------------------------------------------------------------

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as a string, or None when the key is absent."""
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = L.llama_model_meta_val_str(self._model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n + 1

    @property
    def size_bytes(self) -> int:
        """Size of the model's weights in bytes."""
        return int(L.llama_model_size(self._model))

    # -- tokens and text -----------------------------------------------------------------------------------

    def tokenize(self, text: bytes | str, *, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Token ids of ``text``. ``add_bos=None`` follows the GGUF; ``special`` parses control tokens.

        Generated text is tokenized with ``special=False`` so a model writing "<|im_end|>" as text cannot
        inject a control token; rendered prompts use ``special=True``.
        """
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        add = self.add_bos if add_bos is None else add_bos
        capacity = len(data) + 8
        while True:
            out = (L.llama_token * capacity)()
            n = L.llama_tokenize(self._vocab, data, len(data), out, capacity, add, special)
            if n >= 0:
                return list(out[:n])
            capacity = -n

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """Exact bytes of one token. Control tokens are empty unless ``special``."""
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:  # piece longer than the buffer: -n is the size needed
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    @property
    def token_bytes(self) -> list[bytes]:
        """Bytes of every token id (text pieces; control tokens are b""), built once and cached."""
        if self._token_bytes is None:
            vocab, to_piece = self._vocab, L.llama_token_to_piece
            buf = ctypes.create_string_buffer(256)
            table: list[bytes] = []
            for tid in range(self.n_vocab):
                n = to_piece(vocab, tid, buf, 256, 0, False)
                table.append(buf.raw[:n] if n >= 0 else self.piece(tid))
            self._token_bytes = table
        return self._token_bytes

    def detokenize(self, tokens: Iterable[int]) -> bytes:
        """Bytes of a token sequence (concatenated pieces; control tokens omitted)."""
        table = self.token_bytes
        return b"".join(table[t] for t in tokens)

    def llama_detokenize(self, tokens: Sequence[int], *, special: bool = False) -> bytes:
        """llama.cpp's own detokenizer (reference for tests)."""
        arr = (L.llama_token * len(tokens))(*tokens)
        capacity = max(64, 8 * len(tokens))
        while True:
            buf = ctypes.create_string_buffer(capacity)
            n = L.llama_detokenize(self._vocab, arr, len(tokens), buf, capacity, False, special)
            if n >= 0:
                return buf.raw[:n]
            capacity = -n

    def is_eog(self, token: int) -> bool:
        """True for any end-of-generation token (EOS, EOT, <|im_end|>, <end_of_turn>, ...)."""
        return bool(L.llama_vocab_is_eog(self._vocab, token))

    def is_control(self, token: int) -> bool:
        """True for control tokens (chat markers, BOS/EOS) that carry no text."""
        return bool(L.llama_vocab_get_attr(self._vocab, token) & L.LLAMA_TOKEN_ATTR_CONTROL)

    @property
    def special_ids(self) -> np.ndarray:
        """Ids of control and user-defined tokens (chat markers, BOS/EOS, ...), scanned once."""
        if not hasattr(self, "_special_ids"):
            attrs, vocab = L.llama_vocab_get_attr, self._vocab
            special = L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_USER_DEFINED
            self._special_ids = np.array([t for t in range(self.n_vocab) if attrs(vocab, t) & special], dtype=np.int64)
        return self._special_ids

    @property
    def eog_ids(self) -> np.ndarray:
        """All end-of-generation token ids (among the special tokens, plus EOS)."""
        if not hasattr(self, "_eog_ids"):
            ids = [int(t) for t in self.special_ids if self.is_eog(int(t))]
            if self.eos_id >= 0 and self.is_eog(self.eos_id) and self.eos_id not in ids:
                ids.append(self.eos_id)
            self._eog_ids = np.array(sorted(ids), dtype=np.int64)
        return self._eog_ids

    @property
    def tokenizer_fingerprint(self) -> str:
        """A hash of everything that fixes what a token id means: the tokenizer kind and pre-tokenizer, every
        token's exact bytes, the special tokens (ids and text), BOS/EOS and end-of-generation ids. Two models
        with the same fingerprint can share token ids (no re-tokenization between them)."""
        if not hasattr(self, "_fingerprint"):
            h = hashlib.sha256()
            for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
                h.update(f"{key}={self.metadata(key)}\n".encode())
            table = self.token_bytes
            h.update(np.fromiter((len(b) for b in table), dtype=np.int32, count=len(table)).tobytes())
            h.update(b"".join(table))
            for t in self.special_ids.tolist():
                h.update(t.to_bytes(4, "little") + self.piece(t, special=True) + b"\0")
            h.update(np.array([self.bos_id, self.eos_id, int(self.add_bos)], dtype=np.int64).tobytes())
            h.update(self.eog_ids.tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # -- chat ----------------------------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The conversation in this model's own chat template, or a plain rendering for base models."""
        return render_messages(self, messages, add_generation_prompt=add_generation_prompt)

    def prompt_tokens(self, rendered: str) -> list[int]:
        """Tokens of a rendered prompt, BOS added once as the GGUF asks.

        The template's markup is parsed for control tokens; the message contents that a
        :class:`~edge_ensemble.chat.RenderedPrompt` marks are plain text, so a user who types "<|im_start|>"
        gets those characters, not the control token (unless ``control_tokens_in_messages``). Text on both
        sides of a content boundary is tokenized in one piece, so tokens break only where they did before.
        A plain ``str`` is all markup.
        """
        parts = getattr(rendered, "parts", None)
        if parts is None or self.options.control_tokens_in_messages:
            parts = ((str(rendered), False),)
        bos_text = self.piece(self.bos_id, special=True) if self.bos_id >= 0 else b""
        add_bos = self.add_bos and not (bos_text and str(rendered).encode("utf-8").startswith(bos_text))
        out = [self.bos_id] if add_bos else []
        text = b""  # plain text not yet tokenized: content and the markup text around it
        for piece, is_content in parts:
            data = piece.encode("utf-8")
            if is_content:
                text += data
                continue
            for before, token in self._split_at_control_tokens(data):
                text += before
                if token is not None:
                    out += self.tokenize(text, add_bos=False, special=False) if text else []
                    out.append(token)
                    text = b""
        return out + (self.tokenize(text, add_bos=False, special=False) if text else [])

    def _split_at_control_tokens(self, markup: bytes) -> list[tuple[bytes, int | None]]:
        """``markup`` as (text before, control token) pairs, the last one's token None: the split llama.cpp's
        ``parse_special`` makes (control and unknown tokens, longest text first)."""
        if self._control_re is None:
            attrs = L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_UNKNOWN
            by_text: dict[bytes, int] = {}
            for t in range(self.n_vocab):
                if L.llama_vocab_get_attr(self._vocab, t) & attrs:
                    by_text.setdefault(self.piece(t, special=True), t)
            by_text.pop(b"", None)
            self._control_ids = by_text
            alternatives = sorted(by_text, key=len, reverse=True)
            self._control_re = re.compile(b"|".join(map(re.escape, alternatives))) if alternatives else re.compile(b"(?!)")
        out: list[tuple[bytes, int | None]] = []
        pos = 0
        for m in self._control_re.finditer(markup):
            out.append((markup[pos:m.start()], self._control_ids[m.group(0)]))
            pos = m.end()
        out.append((markup[pos:], None))
        return out

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
        the next decode on this model: ``.copy()`` what you keep.
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
        flags[self._wanted_rows(want, n)] = 1
        logits, _ = self._decode_stream(np.full(n, seq, dtype=np.int32), np.arange(start, start + n, dtype=np.int32),
                                        np.asarray(tokens, dtype=np.int32), flags)
        if not logits:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        return logits[0] if len(logits) == 1 else np.concatenate(logits, axis=0)

    def decode_many(self, requests: Sequence["SeqRequest"]) -> "BatchResult":
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
            rows = self._wanted_rows(r.want, len(r.tokens))
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
            raise ModelLoadError(f"{self.path.name} was loaded vocab_only (or closed); it cannot decode")

    def _decode_stream(self, seqs: np.ndarray, pos: np.ndarray, tok: np.ndarray,
                       flags: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """llama_decode over parallel (sequence, position, token, wants-logits) arrays, chunked by n_batch.
        Returns the flagged rows' logits (and hidden states, when on) per chunk, in stream order: the last
        chunk's as views of llama.cpp's buffers, earlier chunks' copied before the buffers are reused."""
        n = len(tok)
        logits: list[np.ndarray] = []
        hidden: list[np.ndarray] = []
        for lo in range(0, n, self._n_batch):
            hi = min(n, lo + self._n_batch)
            m = hi - lo
            self._fill_seq_ids(seqs[lo:hi])
            self._b_token[:m] = tok[lo:hi]
            self._b_pos[:m] = pos[lo:hi]
            self._b_logits[:m] = flags[lo:hi]
            self._batch.n_tokens = m
            t0 = time.perf_counter()
            rc = L.llama_decode(self._ctx, self._batch)
            self.llama_decode_seconds += time.perf_counter() - t0
            if rc != 0:
                for s in np.unique(seqs[lo:hi]).tolist():  # drop cells a failed call may have written
                    L.llama_memory_seq_rm(self._memory, s, len(self._seq_tokens[s]), -1)
                if rc == 1:
                    raise ContextOverflowError(f"{self.name}: no KV cache slot for {m} tokens (context full)")
                raise ModelLoadError(f"{self.name}: llama_decode failed with code {rc}")
            self._record(seqs[lo:hi], tok[lo:hi])
            n_out = int(flags[lo:hi].sum())
            if n_out and not self.options.hidden_states:
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

    @staticmethod
    def _wanted_rows(want: str | Sequence[int] | None, n: int) -> np.ndarray:
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

    def keep_only(self, seq: int) -> None:
        """Drop every sequence but ``seq`` (llama_memory_seq_keep)."""
        L.llama_memory_seq_keep(self._memory, seq)
        for s in range(len(self._seq_tokens)):
            if s != seq:
                self._seq_tokens[s] = []
                self._release(s, 0)

    def reset(self, seq: int | None = None) -> None:
        """Empty one sequence's cache, or all of them."""
        for s in range(len(self._seq_tokens)) if seq is None else [seq]:
            self.drop(s)


@dataclass
class SeqRequest:
    """Tokens to append to one sequence in a multi-sequence batch (:meth:`Model.decode_many`), and which of
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


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n])
    y = np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, so `taskset` and cgroup pinning are honoured;
    llama.cpp's spinning threads oversubscribe a core badly)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
