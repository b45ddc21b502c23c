"""One GGUF file opened in llama.cpp: weights, vocabulary, metadata and the tables built from them.

A :class:`ModelFile` is the ``llama_model`` half of a loaded model (llama-cpp-python's ``LlamaModel``): it
tokenizes, gives each token's exact bytes and reads the GGUF header, but decodes nothing: decoding needs a
:class:`~edge_ensemble.context.Context` made from it. Opened with ``vocab_only=True`` it loads in milliseconds
(no weights), which is all a probe needs to read the architecture, the vocabulary or a hyper-parameter::

    with ModelFile.open_vocab(path) as f:
        n_layer, n_vocab = f.arch_int("block_count", 0), f.n_vocab

Tokenization works in bytes: :meth:`ModelFile.piece` gives a token's exact bytes (no 32-byte truncation),
:attr:`ModelFile.token_bytes` caches the whole vocabulary.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

import llama_cpp as L

from .errors import ModelLoadError
from .gguf import check_magic
from .llama_backend import Owned, init_backend, last_llama_error


def check_gguf_file(path: Path) -> None:
    """Refuse, with one line, a path that is missing, not a file, or not a GGUF file."""
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a file; give the path of a .gguf model file")
    check_magic(path)


class ModelFile(Owned):
    """A GGUF model's weights (unless ``vocab_only``), vocabulary and metadata, open until :meth:`close`.

    Recurrent and hybrid models are refused: their memory cannot be rolled back token by token, which every
    ensemble policy needs. Contexts made from this file must be closed before it.
    """

    def __init__(self, path: str | os.PathLike[str], *, vocab_only: bool = False, n_gpu_layers: int = 0) -> None:
        init_backend()
        self.path = Path(path)
        self.vocab_only = vocab_only
        check_gguf_file(self.path)
        self._stack = ExitStack()
        self.llama_model = None  # the llama_model pointer; None once closed
        self._token_bytes: list[bytes] | None = None
        self._control_re: re.Pattern[bytes] | None = None  # built on first prompt (a vocabulary scan)
        self._control_ids: dict[bytes, int] = {}

        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        mparams.vocab_only = vocab_only
        last_llama_error()  # drop stale messages
        self.llama_model = L.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.llama_model:
            reason = last_llama_error() or "llama.cpp could not read it"
            raise ModelLoadError(f"cannot load {self.path}: {reason} (truncated or corrupt GGUF?)")
        self._stack.callback(self._free)
        self.llama_vocab = L.llama_model_get_vocab(self.llama_model)
        self.n_vocab: int = L.llama_vocab_n_tokens(self.llama_vocab)
        self.n_ctx_train: int = L.llama_model_n_ctx_train(self.llama_model)
        self.name: str = self.metadata("general.name") or self.path.stem
        self.architecture: str = self.metadata("general.architecture") or "unknown"
        # The hidden size: llama.cpp's own once loaded (the size of the hidden states a context gives); a
        # vocab-only load leaves llama.cpp's hyper-parameters unread (0), so it is read from the header then.
        self.n_embd: int = (self.arch_int("embedding_length", 0) if vocab_only
                            else int(L.llama_model_n_embd(self.llama_model)))
        self.bos_id: int = L.llama_vocab_bos(self.llama_vocab)
        self.eos_id: int = L.llama_vocab_eos(self.llama_vocab)
        self.add_bos: bool = bool(L.llama_vocab_get_add_bos(self.llama_vocab))
        self.chat_template: str | None = self.metadata("tokenizer.chat_template")

        if L.llama_model_is_recurrent(self.llama_model) or L.llama_model_is_hybrid(self.llama_model):
            self.close()
            raise ModelLoadError(
                f"{self.path.name} ({self.architecture}) uses recurrent memory, which cannot be rolled back "
                "token by token; edge-ensemble needs a transformer model"
            )

    @classmethod
    def open_vocab(cls, path: str | os.PathLike[str]) -> "ModelFile":
        """The file's vocabulary and metadata only (no weights, no context): a probe that loads in milliseconds."""
        return cls(path, vocab_only=True)

    def _free(self) -> None:
        L.llama_model_free(self.llama_model)
        self.llama_model = None

    # -- metadata ------------------------------------------------------------------------------------------

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as a string, or None when the key is absent."""
        size = 256
        while True:
            buf = ctypes.create_string_buffer(size)
            n = L.llama_model_meta_val_str(self.llama_model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n + 1

    def arch_int(self, key: str, default: int) -> int:
        """The integer hyper-parameter ``{architecture}.{key}`` (``block_count``, ``embedding_length``,
        ``attention.head_count``, ...), or ``default`` where it is absent or not one integer."""
        value = self.metadata(f"{self.architecture}.{key}")
        try:
            return int(value) if value is not None else default
        except ValueError:  # e.g. a per-layer array
            return default

    @property
    def size_bytes(self) -> int:
        """Size of the model's weights in bytes."""
        return int(L.llama_model_size(self.llama_model))

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
            n = L.llama_tokenize(self.llama_vocab, data, len(data), out, capacity, add, special)
            if n >= 0:
                return list(out[:n])
            capacity = -n

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """Exact bytes of one token. Control tokens are empty unless ``special``."""
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self.llama_vocab, token, buf, 64, 0, special)
        if n < 0:  # piece longer than the buffer: -n is the size needed
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.llama_vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    @property
    def token_bytes(self) -> list[bytes]:
        """Bytes of every token id (text pieces; control tokens are b""), built once and cached."""
        if self._token_bytes is None:
            vocab, to_piece = self.llama_vocab, L.llama_token_to_piece
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
            n = L.llama_detokenize(self.llama_vocab, arr, len(tokens), buf, capacity, False, special)
            if n >= 0:
                return buf.raw[:n]
            capacity = -n

    def is_eog(self, token: int) -> bool:
        """True for any end-of-generation token (EOS, EOT, <|im_end|>, <end_of_turn>, ...)."""
        return bool(L.llama_vocab_is_eog(self.llama_vocab, token))

    def is_control(self, token: int) -> bool:
        """True for control tokens (chat markers, BOS/EOS) that carry no text."""
        return bool(L.llama_vocab_get_attr(self.llama_vocab, token) & L.LLAMA_TOKEN_ATTR_CONTROL)

    @property
    def special_ids(self) -> np.ndarray:
        """Ids of control and user-defined tokens (chat markers, BOS/EOS, ...), scanned once."""
        if not hasattr(self, "_special_ids"):
            attrs, vocab = L.llama_vocab_get_attr, self.llama_vocab
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

    def split_at_control_tokens(self, markup: bytes) -> list[tuple[bytes, int | None]]:
        """``markup`` as (text before, control token) pairs, the last one's token None: the split llama.cpp's
        ``parse_special`` makes (control and unknown tokens, longest text first)."""
        if self._control_re is None:
            attrs = L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_UNKNOWN
            by_text: dict[bytes, int] = {}
            for t in range(self.n_vocab):
                if L.llama_vocab_get_attr(self.llama_vocab, t) & attrs:
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
