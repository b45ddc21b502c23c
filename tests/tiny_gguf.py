"""Write tiny random-weight GGUF models for fast unit tests (no pytest dependency).

The models use the llama architecture (2 layers, n_embd 32 by default), so llama.cpp loads one in a few
milliseconds and generates real (meaningless) tokens.  Three tokenizers are available:

* ``vocab="spm"``: SentencePiece-style (``tokenizer.ggml.model = "llama"``): ``<unk>`` ``<s>`` ``</s>``, the 256
  ``<0xNN>`` byte-fallback tokens, Gemma-style ``<start_of_turn>``/``<end_of_turn>`` control tokens and a few
  hundred "▁"-pieces learnt from a built-in English/code text.  No dummy-prefix space (like Gemma 3), so pieces
  concatenate to exactly the input bytes.  Any UTF-8 text tokenizes (emoji, CJK go through byte fallback).
* ``vocab="bpe"``: byte-level BPE (``"gpt2"`` with the ``gpt-2`` pre-tokenizer): the 256 GPT-2 byte symbols, a
  few hundred learnt merges and their tokens, ``<|endoftext|>`` (bos/eos) and ChatML ``<|im_start|>``/``<|im_end|>``
  as CONTROL tokens.
* ``borrow_tokenizer_from=<real.gguf>``: every ``tokenizer.*`` key copied from a real model, so the tiny model
  tokenizes exactly like it (n_vocab follows; the embedding/output matrices are then F16 to keep the file small).

Token ids: spm - 0 ``<unk>``, 1 ``<s>``, 2 ``</s>``, 3+b the byte token ``<0xbb>``, 259/260 ``<start_of_turn>``/
``<end_of_turn>``, then single characters and merged pieces (656 tokens).  bpe - id b is the byte symbol of byte b
(0..255), then merged tokens, then ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` (559 tokens).

``write_tiny_mamba`` writes a tiny Mamba (architecture ``mamba``, a recurrent model: llama.cpp's
``llama_model_is_recurrent`` is true) with the same two built-in vocabularies, for refusal tests.

Everything is deterministic: the same arguments give a byte-identical file.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "CHATML_TEMPLATE",
    "GEMMA_TEMPLATE",
    "TOKEN_NORMAL",
    "TOKEN_UNKNOWN",
    "TOKEN_CONTROL",
    "TOKEN_USER_DEFINED",
    "TOKEN_UNUSED",
    "TOKEN_BYTE",
    "bytes_to_unicode",
    "write_tiny_llama",
    "write_tiny_mamba",
    "write_not_gguf",
    "write_truncated_gguf",
]

# llama.cpp / gguf token types
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# Seed of the weights every model made with share > 0 has in common.
_SHARED_SEED = 20240229
# Std of the logits (the final RMS norm makes the hidden state RMS ~1): mean entropy ~2 nats, top-1 p ~0.47.
_OUT_SCALE = 4.0

_TEMPLATE_ALIASES = {"chatml": CHATML_TEMPLATE, "gemma": GEMMA_TEMPLATE}

# Text the tiny vocabularies are learnt from (prose, numbers, code) - changing it changes every tiny model.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran into the forest.
In the beginning there was a small model that could only count: one, two, three, four, five, six, seven.
It learned to read and to write, and then it learned that reading is the thing that makes writing possible.
Hello world! Hello again, world. How are you today? I am fine, thank you, and how are you?
There are 12 months in a year, 7 days in a week, 24 hours in a day and 60 minutes in an hour.
The answer is 42. The total is 1024 + 2048 = 3072, and 365 days make a year, except in 2024.
def main():
    for i in range(10):
        print("hello", i)
    return 0

if __name__ == "__main__":
    main()
Question: what is the capital of France? Answer: the capital of France is Paris.
Question: what is 2 + 2? Answer: 2 + 2 = 4. Let me think step by step about the problem first.
We are going to solve this problem together, one step at a time, thinking about each of the steps.
The ensemble of models writes one answer together, token by token, and the models agree most of the time.
When they disagree, they vote, and the token with the highest probability is chosen for the answer.
She said that she would be there in the morning, but she was not there when they arrived in the evening.
They have been working on this for a long time and they will continue working on it until it is done.
This is a test of the system. This is only a test. If this had been a real emergency, you would know.
Reading, writing, thinking, learning, running, testing, working, making, taking, being, going, doing.
The string "abc" has 3 characters; the list [1, 2, 3] has 3 items; the dict {"a": 1} has 1 key.
"""

_GPT2_SPLIT = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character mapping (space -> 'Ġ', newline -> 'Ċ')."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _train_bpe(words: dict[tuple[str, ...], int], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on word counts; ties broken lexicographically so the result is deterministic."""
    words = dict(words)
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: dict[tuple[str, str], int] = {}
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + c
        if not pairs:
            break
        best, count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < 1:
            break
        merges.append(best)
        a, b = best
        new_words: dict[tuple[str, ...], int] = {}
        for w, c in words.items():
            out: list[str] = []
            i = 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            key = tuple(out)
            new_words[key] = new_words.get(key, 0) + c
        words = new_words
    return merges


def _corpus_words() -> list[str]:
    return _GPT2_SPLIT.findall(_CORPUS)


@lru_cache(maxsize=None)
def _bpe_vocab(n_merges: int = 300) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token_types, merges) of the byte-level BPE vocabulary."""
    b2u = bytes_to_unicode()
    counts: dict[tuple[str, ...], int] = {}
    for w in _corpus_words():
        key = tuple(b2u[b] for b in w.encode("utf-8"))
        counts[key] = counts.get(key, 0) + 1
    merges = _train_bpe(counts, n_merges)
    tokens = [b2u[b] for b in range(256)]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    types = [TOKEN_NORMAL] * len(tokens)
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        tokens.append(special)
        types.append(TOKEN_CONTROL)
    return tokens, types, [f"{a} {b}" for a, b in merges]


@lru_cache(maxsize=None)
def _spm_vocab(n_merges: int = 300) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token_types) of the SentencePiece-style vocabulary."""
    counts: dict[tuple[str, ...], int] = {}
    for w in _corpus_words():
        key = tuple(w.replace(" ", "\u2581"))
        counts[key] = counts.get(key, 0) + 1
    merges = _train_bpe(counts, n_merges)
    tokens = ["<unk>", "<s>", "</s>"]
    scores = [0.0, 0.0, 0.0]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(TOKEN_BYTE)
    for special in ("<start_of_turn>", "<end_of_turn>"):
        tokens.append(special)
        scores.append(0.0)
        types.append(TOKEN_CONTROL)
    # single characters: every printable ASCII character (newline/tab go through byte fallback) and "▁"
    chars = ["\u2581"] + [chr(c) for c in range(0x21, 0x7F)]
    for ch in chars:
        tokens.append(ch)
        scores.append(-1000.0)
        types.append(TOKEN_NORMAL)
    seen = set(tokens)
    # merged pieces: earlier (more frequent) merges get higher scores, which is the order llama.cpp's SPM
    # tokenizer applies them in
    for rank, (a, b) in enumerate(merges):
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
            scores.append(-float(rank + 1))
            types.append(TOKEN_NORMAL)
    return tokens, scores, types


def _add_builtin_vocab(w: Any, vocab: str, chat_template: str | None, space_prefix: bool = False) -> None:
    """Write the ``tokenizer.*`` keys of the built-in "spm" or "bpe" vocabulary (and a chat template)."""
    if vocab == "spm":
        spm_tokens, spm_scores, token_types = _spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(spm_tokens)
        w.add_token_scores(spm_scores)
        w.add_token_types(token_types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_add_space_prefix(space_prefix)  # True: a llama-2-style "dummy prefix" tokenizer
    else:
        bpe_tokens, token_types, bpe_merges = _bpe_vocab()
        eot = bpe_tokens.index("<|endoftext|>")
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(bpe_tokens)
        w.add_token_types(token_types)
        w.add_token_merges(bpe_merges)
        w.add_bos_token_id(eot)
        w.add_eos_token_id(eot)
        w.add_pad_token_id(eot)
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)


# --------------------------------------------------------------------------------------------------------------
# Borrowing a real model's tokenizer


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9


class _RawValue:
    """A metadata value copied verbatim from another GGUF file (its encoded bytes, without the type tag)."""

    __slots__ = ("payload", "n_items")

    def __init__(self, payload: bytes, n_items: int) -> None:
        self.payload = payload
        self.n_items = n_items

    def __len__(self) -> int:  # GGUFWriter checks arrays for emptiness
        return self.n_items


def _skip_value(buf: Any, off: int, vtype: int) -> tuple[int, int]:
    """Offset just past a value of type ``vtype`` starting at ``off``, and its number of items (1 for scalars)."""
    if vtype in _SCALAR_SIZES:
        return off + _SCALAR_SIZES[vtype], 1
    if vtype == _STRING:
        (n,) = struct.unpack_from("<Q", buf, off)
        return off + 8 + n, 1
    if vtype == _ARRAY:
        sub, count = struct.unpack_from("<IQ", buf, off)
        off += 12
        if sub in _SCALAR_SIZES:
            return off + count * _SCALAR_SIZES[sub], count
        if sub == _STRING:
            unpack = struct.Struct("<Q").unpack_from
            for _ in range(count):
                off += 8 + unpack(buf, off)[0]
            return off, count
        for _ in range(count):  # nested arrays (unused by tokenizers, but skip them correctly)
            off, _n = _skip_value(buf, off, sub)
        return off, count
    raise ValueError(f"unknown GGUF value type {vtype}")


def _read_tokenizer_kv(path: Path) -> list[tuple[str, int, _RawValue]]:
    """Every ``tokenizer.*`` key of a GGUF (v2/v3, little-endian) file as (key, value type, raw value).

    A direct parse of the metadata section: ``gguf.GGUFReader`` takes seconds on a 50k-token vocabulary
    (it builds a numpy view per string), this takes milliseconds, and the values are copied byte for byte.
    """
    out: list[tuple[str, int, _RawValue]] = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: unsupported GGUF version {version}")
        off = 24
        for _ in range(n_kv):
            (klen,) = struct.unpack_from("<Q", buf, off)
            key = bytes(buf[off + 8 : off + 8 + klen]).decode("utf-8")
            off += 8 + klen
            (vtype,) = struct.unpack_from("<I", buf, off)
            off += 4
            end, n_items = _skip_value(buf, off, vtype)
            if key.startswith("tokenizer."):
                out.append((key, vtype, _RawValue(bytes(buf[off:end]), n_items)))
            off = end
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in out):
        raise ValueError(f"{path}: no tokenizer.ggml.tokens key - not a model with an embedded tokenizer")
    return out


def _decode_array(raw: _RawValue) -> list[Any]:
    """Decode a raw numeric/string array value (used for token types and the vocabulary size)."""
    sub, count = struct.unpack_from("<IQ", raw.payload, 0)
    if sub == _STRING:
        items, off = [], 12
        for _ in range(count):
            (n,) = struct.unpack_from("<Q", raw.payload, off)
            items.append(raw.payload[off + 8 : off + 8 + n])
            off += 8 + n
        return items
    fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}[sub]
    return list(struct.unpack_from(f"<{count}{fmt}", raw.payload, 12))


def _raw_writer_class() -> type:
    """GGUFWriter that writes :class:`_RawValue` metadata verbatim (its per-item packing is slow for 50k+ items)."""
    import gguf

    class RawGGUFWriter(gguf.GGUFWriter):
        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            if isinstance(val, _RawValue):
                return (self._pack("I", vtype) if add_vtype else b"") + val.payload
            return super()._pack_val(val, vtype, add_vtype, sub_type=sub_type)

    return RawGGUFWriter


# --------------------------------------------------------------------------------------------------------------
# Weights


def _weights(
    rng: np.random.Generator,
    *,
    base_rng: np.random.Generator | None = None,
    share: float = 0.0,
    n_vocab: int,
    n_embd: int,
    n_layer: int,
    n_head: int,
    n_head_kv: int,
    n_ff: int,
    token_types: Sequence[int],
    low_bytes: Sequence[int] = (),
    out_scale: float = 1.0,
) -> dict[str, np.ndarray]:
    """Random weights in llama.cpp's layout (numpy shapes are GGUF's ne reversed: (rows=out, cols=in))."""
    head_dim = n_embd // n_head
    t: dict[str, np.ndarray] = {}

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        x = rng.standard_normal(shape)
        if base_rng is not None and share > 0.0:
            # same variance, correlation `share` with every other model made with the same `share`
            x = np.sqrt(share) * base_rng.standard_normal(shape) + np.sqrt(1.0 - share) * x
        return (x * std).astype(np.float32)

    # Embeddings with unit-scale rows; RMS norm makes their absolute scale irrelevant for the first block.
    t["token_embd.weight"] = normal((n_vocab, n_embd), 1.0)
    for i in range(n_layer):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = (1.0 + normal((n_embd,), 0.1)).astype(np.float32)
        t[p + "attn_q.weight"] = normal((n_head * head_dim, n_embd), 1.0 / np.sqrt(n_embd))
        t[p + "attn_k.weight"] = normal((n_head_kv * head_dim, n_embd), 1.0 / np.sqrt(n_embd))
        t[p + "attn_v.weight"] = normal((n_head_kv * head_dim, n_embd), 1.0 / np.sqrt(n_embd))
        t[p + "attn_output.weight"] = normal((n_embd, n_head * head_dim), 1.0 / np.sqrt(n_head * head_dim))
        t[p + "ffn_norm.weight"] = (1.0 + normal((n_embd,), 0.1)).astype(np.float32)
        t[p + "ffn_gate.weight"] = normal((n_ff, n_embd), 1.0 / np.sqrt(n_embd))
        t[p + "ffn_up.weight"] = normal((n_ff, n_embd), 1.0 / np.sqrt(n_embd))
        t[p + "ffn_down.weight"] = normal((n_embd, n_ff), 1.0 / np.sqrt(n_ff))
    t["output_norm.weight"] = np.ones((n_embd,), dtype=np.float32)
    # The final RMS norm gives the hidden state a norm of ~sqrt(n_embd), so these rows give logits of std
    # ~out_scale: peaked enough that greedy choices are clear, flat enough that top-k lists are interesting.
    out = normal((n_vocab, n_embd), 1.0 / np.sqrt(n_embd))
    # Control / unknown / unused tokens get smaller logits, so generation rarely stops or emits markers
    # by chance (they are still reachable when sampling).
    scale = np.ones(n_vocab, dtype=np.float32)
    types = np.asarray(token_types)
    scale[~np.isin(types, (TOKEN_NORMAL, TOKEN_BYTE, TOKEN_USER_DEFINED))] = 0.25
    # Raw bytes (fragments of multi-byte characters, control characters) are emitted less often than pieces.
    scale[types == TOKEN_BYTE] = 0.5
    scale[np.asarray(low_bytes, dtype=np.int64)] = 0.5
    out *= scale[:, None] * out_scale
    t["output.weight"] = out
    return t


# --------------------------------------------------------------------------------------------------------------
# Public writers


def write_tiny_llama(
    path: os.PathLike[str] | str,
    *,
    vocab: str = "spm",
    seed: int = 0,
    n_ctx_train: int = 8192,  # as SmolLM2: above the default --n-ctx, so that no test meets the n_ctx warning
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 64,
    chat_template: str | None = None,
    borrow_tokenizer_from: os.PathLike[str] | str | None = None,
    share: float = 0.0,
    name: str | None = None,
    space_prefix: bool = False,
) -> Path:
    """Write a random-weight llama-architecture GGUF model to ``path`` (atomically) and return the path.

    vocab: "spm" or "bpe" (ignored when ``borrow_tokenizer_from`` is given).
    seed: weights come from ``numpy.random.default_rng(seed)``; different seeds give different greedy outputs.
    chat_template: a Jinja template stored as ``tokenizer.chat_template``; the shorthands "chatml" and "gemma"
        select :data:`CHATML_TEMPLATE` / :data:`GEMMA_TEMPLATE`.  With a borrowed tokenizer, a given template
        replaces the borrowed one.
    borrow_tokenizer_from: a real GGUF file whose ``tokenizer.*`` keys are copied verbatim (n_vocab follows;
        above 4096 tokens the embedding and output matrices are F16: ~8 MB for SmolLM2's 49k vocabulary).
    share: correlation of every weight with a fixed common model.  Two models with different seeds and the
        same ``share`` agree on the greedy next token (teacher-forced, 400 positions) about: 1% at 0.0,
        13% at 0.9, 25% at 0.95, 57% at 0.99, 70% at 0.995 - use it for "mostly agreeing" ensemble members.
    name: ``general.name`` (default ``tiny-llama-<vocab>-seed<seed>``).

    Logits have a mean entropy of ~2 nats (top-1 probability ~0.47 on average); control tokens (eos, chat
    markers) and raw-byte tokens get smaller output rows, so greedy generation rarely ends or emits byte
    fragments by chance.  Same arguments -> byte-identical file.
    """
    import gguf

    if not 0.0 <= share < 1.0:
        raise ValueError("share must be in [0, 1)")
    if vocab not in ("spm", "bpe"):
        raise ValueError(f"vocab must be 'spm' or 'bpe', not {vocab!r}")
    if n_embd % n_head or n_head % n_head_kv:
        raise ValueError("n_embd must be a multiple of n_head, and n_head a multiple of n_head_kv")
    if chat_template is not None:
        chat_template = _TEMPLATE_ALIASES.get(chat_template, chat_template)
    path = Path(path)
    head_dim = n_embd // n_head

    borrowed: list[tuple[str, int, _RawValue]] | None = None
    if borrow_tokenizer_from is not None:
        borrowed = _read_tokenizer_kv(Path(borrow_tokenizer_from))
        kv = {k: v for k, _t, v in borrowed}
        n_vocab = kv["tokenizer.ggml.tokens"].n_items
        if "tokenizer.ggml.token_type" in kv:
            token_types = [int(x) for x in _decode_array(kv["tokenizer.ggml.token_type"])]
        else:
            token_types = [TOKEN_NORMAL] * n_vocab
        kind = f"borrowed from {Path(borrow_tokenizer_from).name}"
    elif vocab == "spm":
        spm_tokens, _scores, token_types = _spm_vocab()
        n_vocab = len(spm_tokens)
        kind = "spm"
    else:
        bpe_tokens, token_types, _merges = _bpe_vocab()
        n_vocab = len(bpe_tokens)
        kind = "bpe"

    tmp = path.with_name(path.name + ".tmp")
    w = (_raw_writer_class() if borrowed is not None else gguf.GGUFWriter)(str(tmp), "llama")
    w.add_name(name or f"tiny-llama-{kind}-seed{seed}")
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if n_vocab <= 4096 else gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(n_vocab)

    if borrowed is not None:
        for key, vtype, raw in borrowed:
            if key == "tokenizer.chat_template" and chat_template is not None:
                continue
            w.add_key_value(key, raw, gguf.GGUFValueType(vtype))
        if chat_template is not None:
            w.add_chat_template(chat_template)
    else:
        _add_builtin_vocab(w, vocab, chat_template, space_prefix)

    if vocab == "bpe" and borrowed is None:
        low_bytes = [b for b in range(256) if b < 0x20 or b >= 0x7F]  # byte symbol b has id b
    else:
        low_bytes = []
    tensors = _weights(
        np.random.default_rng(seed),
        base_rng=np.random.default_rng(_SHARED_SEED) if share > 0.0 else None,
        share=share,
        low_bytes=low_bytes,
        out_scale=_OUT_SCALE,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        token_types=token_types,
    )
    for tname, arr in tensors.items():
        if n_vocab > 4096 and tname in ("token_embd.weight", "output.weight"):
            arr = arr.astype(np.float16)
        w.add_tensor(tname, arr)

    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    os.replace(tmp, path)
    return path


def write_tiny_mamba(
    path: os.PathLike[str] | str,
    *,
    vocab: str = "spm",
    seed: int = 0,
    n_ctx_train: int = 8192,  # as SmolLM2: above the default --n-ctx, so that no test meets the n_ctx warning
    n_embd: int = 32,
    n_layer: int = 2,
    d_inner: int | None = None,
    d_state: int = 8,
    d_conv: int = 4,
    dt_rank: int | None = None,
    chat_template: str | None = None,
    name: str | None = None,
) -> Path:
    """Write a random-weight Mamba (v1, architecture ``"mamba"``) GGUF model to ``path`` and return the path.

    A recurrent model: llama.cpp gives it a fixed-size state per sequence instead of a KV cache, and
    ``llama_model_is_recurrent`` is true for it - what edge-ensemble must refuse.  It loads and decodes (real,
    meaningless logits).  Same tokenizers as :func:`write_tiny_llama` (``vocab="spm"`` or ``"bpe"``).

    d_inner: width of the SSM (default ``2 * n_embd``, as in real Mamba); d_state: SSM state size per channel;
    d_conv: causal convolution width; dt_rank: rank of the time-step projection (default ``ceil(n_embd / 16)``).
    Same arguments -> byte-identical file.
    """
    import gguf

    if vocab not in ("spm", "bpe"):
        raise ValueError(f"vocab must be 'spm' or 'bpe', not {vocab!r}")
    if chat_template is not None:
        chat_template = _TEMPLATE_ALIASES.get(chat_template, chat_template)
    d_inner = 2 * n_embd if d_inner is None else d_inner
    dt_rank = -(-n_embd // 16) if dt_rank is None else dt_rank
    path = Path(path)
    token_types = _spm_vocab()[2] if vocab == "spm" else _bpe_vocab()[1]
    n_vocab = len(token_types)

    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "mamba")
    w.add_name(name or f"tiny-mamba-{vocab}-seed{seed}")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # the keys llama.cpp's convert_hf_to_gguf.py writes for Mamba (no attention: 0 heads, no FFN)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_ssm_conv_kernel(d_conv)
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_state_size(d_state)
    w.add_ssm_time_step_rank(dt_rank)
    w.add_vocab_size(n_vocab)
    _add_builtin_vocab(w, vocab, chat_template)

    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    # numpy shapes are GGUF's ne reversed (llama.cpp's create_tensor shapes, read right to left)
    tensors: dict[str, np.ndarray] = {"token_embd.weight": normal((n_vocab, n_embd), 1.0)}
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors[p + "attn_norm.weight"] = (1.0 + normal((n_embd,), 0.1)).astype(np.float32)
        tensors[p + "ssm_in.weight"] = normal((2 * d_inner, n_embd), 1.0 / np.sqrt(n_embd))
        tensors[p + "ssm_conv1d.weight"] = normal((d_inner, d_conv), 1.0 / np.sqrt(d_conv))
        tensors[p + "ssm_conv1d.bias"] = normal((d_inner,), 0.1)
        tensors[p + "ssm_x.weight"] = normal((dt_rank + 2 * d_state, d_inner), 1.0 / np.sqrt(d_inner))
        tensors[p + "ssm_dt.weight"] = normal((d_inner, dt_rank), 1.0 / np.sqrt(dt_rank))
        tensors[p + "ssm_dt.bias"] = normal((d_inner,), 0.5) - 2.0  # softplus(-2) ~ 0.13: a short memory
        # A = -exp(A_log) as stored by the converter, with Mamba's S4D-real init A_log = log(1..d_state)
        tensors[p + "ssm_a"] = np.tile(-np.arange(1, d_state + 1, dtype=np.float32), (d_inner, 1))
        tensors[p + "ssm_d"] = np.ones((d_inner,), dtype=np.float32)
        tensors[p + "ssm_out.weight"] = normal((n_embd, d_inner), 1.0 / np.sqrt(d_inner))
    tensors["output_norm.weight"] = np.ones((n_embd,), dtype=np.float32)
    tensors["output.weight"] = normal((n_vocab, n_embd), _OUT_SCALE / np.sqrt(n_embd))
    for tname, arr in tensors.items():
        w.add_tensor(tname, arr)

    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    os.replace(tmp, path)
    return path


def write_not_gguf(path: os.PathLike[str] | str) -> Path:
    """A file with a .gguf-looking name whose content is plain text (wrong magic)."""
    path = Path(path)
    path.write_bytes(b"This is not a GGUF file, just some text pretending to be a model.\n" * 64)
    return path


def write_truncated_gguf(
    src: os.PathLike[str] | str, path: os.PathLike[str] | str, fraction: float = 0.5
) -> Path:
    """Copy the first ``fraction`` of ``src`` to ``path`` (a GGUF whose tensor data is cut off)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError("fraction must be in [0, 1)")
    data = Path(src).read_bytes()
    path = Path(path)
    path.write_bytes(data[: int(len(data) * fraction)])
    return path
