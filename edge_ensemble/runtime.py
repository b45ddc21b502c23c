"""One GGUF model over the llama.cpp C API (through llama-cpp-python's ctypes bindings), ready to decode.

The work is split the way llama-cpp-python's ``_internals`` splits it, one lifetime per object:

* :class:`~edge_ensemble.model_file.ModelFile` — weights, vocabulary, metadata, token bytes tables
  (``ModelFile.open_vocab(path)``: vocabulary and metadata only, no context, for probes);
* :class:`~edge_ensemble.context.Context` — KV memory, sequences and their cell ledger, decoding, logits
  rows as NumPy views; it owns its :class:`~edge_ensemble.batch.Batch`;
* chat rendering and prompt tokenization live in :mod:`edge_ensemble.chat`.

:class:`Model` opens a file and then a context over it (closed in reverse) and offers both through one
object, the handle the rest of edge-ensemble holds. One ``Model`` must be used by one thread at a time
(llama.cpp contexts are not thread-safe).
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .batch import BatchResult, SeqRequest
from .chat import RenderedPrompt, prompt_tokens, render_messages
from .context import CANNOT_DECODE, Context, usable_cores
from .errors import ModelLoadError
from .llama_backend import Owned
from .model_file import ModelFile, check_gguf_file
from .options import LOAD, option

__all__ = ["LoadOptions", "Model", "ModelFile", "Context", "SeqRequest", "BatchResult", "check_gguf_file",
           "common_prefix_len", "usable_cores", "available_memory_bytes"]


@dataclass(frozen=True)
class LoadOptions:
    """How to load one model. Validated once, at the edge (CLI / API).

    From :data:`~edge_ensemble.options.LOAD_OPTIONS`: ``n_ctx``; ``n_threads`` (single-token steps, None = all
    cores); ``n_gpu_layers`` (-1 = offload everything on Metal / CUDA builds, 0 = CPU only); ``flash_attn``
    (off = llama-cpp-python's default, the exact same logits; None = llama.cpp's auto);
    ``control_tokens_in_messages`` (parse control-token text inside message contents as control tokens, as
    llama-cpp-python does: a prompt-injection hole; off: only the template's own markup yields them).
    """

    # The load options the user sets, declared once in options.LOAD_OPTIONS (name, type, default, help) ...
    n_ctx: int = option(LOAD["n_ctx"])
    n_threads: int | None = option(LOAD["n_threads"])
    n_gpu_layers: int = option(LOAD["n_gpu_layers"])
    flash_attn: bool | None = option(LOAD["flash_attn"])
    control_tokens_in_messages: bool = option(LOAD["control_tokens_in_messages"])
    # ... and the runtime's own.
    n_threads_batch: int | None = None  # multi-token batches; None = n_threads
    n_batch: int = 512
    n_seq_max: int = 1  # > 1 for several sequences (branches, requests) in one context; the KV cache is then unified
    hidden_states: bool = False  # also output the last hidden state at the rows asked for (a router reads it)
    vocab_only: bool = False  # tokenizer only: loads in milliseconds, no decoding (see also ModelFile.open_vocab)


class _NoContext:
    """The context of a vocab-only model: it holds nothing (``n_ctx`` 0, :meth:`reset` does nothing) and any
    other use raises the one-line error a decode on it always raised."""

    n_ctx = 0
    llama_decode_seconds = 0.0

    def __init__(self, file_name: str) -> None:
        self._why = CANNOT_DECODE.format(file_name)

    def reset(self, seq: int | None = None) -> None:
        """Nothing to empty."""

    def close(self) -> None:
        """Nothing to free."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # keep Python's protocols (copy, pickle, hasattr) working
            raise AttributeError(attr)
        raise ModelLoadError(self._why)


class Model(Owned):
    """One GGUF model: its :class:`ModelFile` (``file``) and a :class:`Context` over it (``context``; none for
    ``vocab_only``), with the methods of both.

    The model tracks, per sequence, the tokens that are in its KV cache (``tokens(seq)``); positions are
    implicit: the next token of a sequence goes at ``len(tokens(seq))``. Each method is a plain delegation;
    code on the hot path may hold ``model.context`` and call it directly.
    """

    def __init__(self, path: str | os.PathLike[str], options: LoadOptions = LoadOptions()) -> None:
        self.path = Path(path)
        self.options = options
        self._stack = ExitStack()
        with ExitStack() as opened:  # what is open so far is closed again if a later step fails
            self.file: ModelFile = ModelFile(self.path, vocab_only=options.vocab_only,
                                             n_gpu_layers=options.n_gpu_layers)
            opened.callback(self.file.close)
            self.context: Context | _NoContext = _NoContext(self.path.name)
            if not options.vocab_only:
                self.context = Context(self.file, n_ctx=options.n_ctx, n_batch=options.n_batch,
                                       n_seq_max=options.n_seq_max, n_threads=options.n_threads,
                                       n_threads_batch=options.n_threads_batch, flash_attn=options.flash_attn,
                                       hidden_states=options.hidden_states)
                opened.callback(self.context.close)
            self._stack = opened.pop_all()
        # Facts fixed at load, copied as plain attributes.
        f = self.file
        self.n_vocab: int = f.n_vocab
        self.n_ctx_train: int = f.n_ctx_train
        self.n_embd: int = f.n_embd
        self.name: str = f.name
        self.architecture: str = f.architecture
        self.bos_id: int = f.bos_id
        self.eos_id: int = f.eos_id
        self.add_bos: bool = f.add_bos
        self.chat_template: str | None = f.chat_template
        self.n_ctx: int = self.context.n_ctx

    # -- the model file: metadata, tokens and text ---------------------------------------------------------

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as a string, or None when the key is absent."""
        return self.file.metadata(key)

    @property
    def size_bytes(self) -> int:
        """Size of the model's weights in bytes."""
        return self.file.size_bytes

    def tokenize(self, text: bytes | str, *, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Token ids of ``text`` (:meth:`ModelFile.tokenize`)."""
        return self.file.tokenize(text, add_bos=add_bos, special=special)

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """Exact bytes of one token. Control tokens are empty unless ``special``."""
        return self.file.piece(token, special=special)

    @property
    def token_bytes(self) -> list[bytes]:
        """Bytes of every token id (text pieces; control tokens are b""), built once and cached."""
        return self.file.token_bytes

    def detokenize(self, tokens: Iterable[int]) -> bytes:
        """Bytes of a token sequence (concatenated pieces; control tokens omitted)."""
        return self.file.detokenize(tokens)

    def llama_detokenize(self, tokens: Sequence[int], *, special: bool = False) -> bytes:
        """llama.cpp's own detokenizer (reference for tests)."""
        return self.file.llama_detokenize(tokens, special=special)

    def is_eog(self, token: int) -> bool:
        """True for any end-of-generation token (EOS, EOT, <|im_end|>, <end_of_turn>, ...)."""
        return self.file.is_eog(token)

    def is_control(self, token: int) -> bool:
        """True for control tokens (chat markers, BOS/EOS) that carry no text."""
        return self.file.is_control(token)

    @property
    def special_ids(self) -> np.ndarray:
        """Ids of control and user-defined tokens (chat markers, BOS/EOS, ...), scanned once."""
        return self.file.special_ids

    @property
    def eog_ids(self) -> np.ndarray:
        """All end-of-generation token ids (among the special tokens, plus EOS)."""
        return self.file.eog_ids

    @property
    def tokenizer_fingerprint(self) -> str:
        """A hash of everything that fixes what a token id means (:attr:`ModelFile.tokenizer_fingerprint`)."""
        return self.file.tokenizer_fingerprint

    # -- chat (edge_ensemble.chat) -------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> RenderedPrompt:
        """The conversation in this model's own chat template, or a plain rendering for base models."""
        return render_messages(self.file, messages, add_generation_prompt=add_generation_prompt)

    def prompt_tokens(self, rendered: str) -> list[int]:
        """Tokens of a rendered prompt, BOS added once as the GGUF asks; control tokens are parsed in the
        template's markup only, unless ``control_tokens_in_messages`` (:func:`edge_ensemble.chat.prompt_tokens`)."""
        return prompt_tokens(self.file, rendered,
                             control_tokens_in_messages=self.options.control_tokens_in_messages)

    # -- the context: sequences and decoding ---------------------------------------------------------------

    def tokens(self, seq: int = 0) -> list[int]:
        """The tokens currently in the KV cache of ``seq`` (do not mutate)."""
        return self.context.tokens(seq)

    def n_past(self, seq: int = 0) -> int:
        """Number of tokens in ``seq``'s cache = position of its next token."""
        return self.context.n_past(seq)

    def decode(self, tokens: Sequence[int], *, want: str | Sequence[int] | None = "last", seq: int = 0) -> np.ndarray:
        """Append ``tokens`` to ``seq``; logits only at the rows ``want`` asks for, possibly a view valid until
        the next decode (:meth:`Context.decode`)."""
        return self.context.decode(tokens, want=want, seq=seq)

    def decode_many(self, requests: Sequence[SeqRequest]) -> BatchResult:
        """Append tokens to several sequences in one batch (:meth:`Context.decode_many`)."""
        return self.context.decode_many(requests)

    @property
    def llama_decode_seconds(self) -> float:
        """Time spent inside llama_decode itself (for profiling)."""
        return self.context.llama_decode_seconds

    @property
    def cells_used(self) -> int:
        """KV cells in use across all sequences (cells shared between a fork and its parent count once)."""
        return self.context.cells_used

    def free_cells(self) -> int:
        """KV cells still free in this context."""
        return self.context.free_cells()

    def cells_only_in(self, seqs: Iterable[int]) -> int:
        """KV cells that dropping ``seqs`` would free: theirs, shared with no other sequence."""
        return self.context.cells_only_in(seqs)

    def trim(self, n: int, seq: int = 0) -> None:
        """Keep only the first ``n`` tokens of ``seq`` in the cache (roll back the rest)."""
        self.context.trim(n, seq)

    def cached_len(self, seq: int = 0) -> int:
        """Number of positions llama.cpp really holds for ``seq`` (max position + 1)."""
        return self.context.cached_len(seq)

    def reconcile(self, seq: int = 0) -> None:
        """Make the token list and the KV cache agree again after an interrupted call (keep the shorter)."""
        self.context.reconcile(seq)

    def fork(self, src: int, dst: int) -> None:
        """Make sequence ``dst`` a copy of ``src`` (shared cells in the unified cache)."""
        self.context.fork(src, dst)

    def drop(self, seq: int) -> None:
        """Remove a whole sequence; cells no other sequence shares become free."""
        self.context.drop(seq)

    def reset(self, seq: int | None = None) -> None:
        """Empty one sequence's cache, or all of them."""
        self.context.reset(seq)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n])
    y = np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


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
