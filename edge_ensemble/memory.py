"""How much memory the members will hold, estimated from their GGUF headers before they load, and the check
that refuses an ensemble that would not fit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .errors import ModelLoadError
from .gguf import check_gguf
from .policies import registry
from .model_file import ModelFile
from .runtime import LoadOptions, available_memory_bytes


def max_logits_rows() -> int:
    """The most logits rows one decode of any registered policy asks for (a call may switch policy)."""
    return max(cls.max_logits_rows for cls in registry.policies().values())


# ggml types llama.cpp's CPU backend may repack into a second, interleaved copy at load: Q4_0, Q8_0, Q4_K, IQ4_NL.
_REPACKED_TYPES = frozenset({2, 8, 12, 20})
_MiB = 1 << 20


def estimate_memory_bytes(path: Path, n_ctx: int, n_batch: int = LoadOptions.n_batch, *,
                          hidden_states: bool = False) -> int:
    """An upper bound of the memory one member can hold resident, from its GGUF header alone.

    Weights (the mapped file) and their repacked copies; the f16 KV cache for ``n_ctx``; llama.cpp's compute
    buffer at its worst — the f32 attention scores of a full batch against a full context (every head, plus
    the mask) or the logits of the most rows a decode asks for, whichever is larger, plus the layer
    activations; the output buffer holding those logits; and our per-token tables. Checked against measured peaks in
    tests/test_faults.py. ``hidden_states`` (a router): llama.cpp then outputs logits and the hidden state at every
    row of a batch, not only at the rows asked for.
    """
    repacked = sum(t.nbytes for t in check_gguf(path)
                   if t.ggml_type in _REPACKED_TYPES and t.name != "token_embd.weight")  # embeddings stay mapped
    with ModelFile.open_vocab(path) as probe:
        n_layer = probe.arch_int("block_count", 0)
        n_embd = probe.arch_int("embedding_length", 0)
        n_ff = probe.arch_int("feed_forward_length", 4 * n_embd)
        n_head = max(1, probe.arch_int("attention.head_count", 1))
        n_head_kv = probe.arch_int("attention.head_count_kv", n_head)
        k_dim = probe.arch_int("attention.key_length", n_embd // n_head)
        v_dim = probe.arch_int("attention.value_length", k_dim)
        n_vocab = probe.n_vocab
    kv = n_layer * n_ctx * n_head_kv * (k_dim + v_dim) * 2  # K and V, f16
    # Logits are computed and kept only for the rows a decode asks for: at most a whole draft plus one.
    logits = (n_batch * (n_vocab + n_embd) if hidden_states else min(n_batch, max_logits_rows()) * n_vocab) * 4
    scores = n_batch * n_ctx * (n_head + 1) * 4
    compute = max(scores, logits) + n_batch * (4 * n_embd + 2 * n_ff) * 4
    tables = n_vocab * 128 + 32 * _MiB  # token bytes, masks, probability rows on the Python side
    return path.stat().st_size + repacked + kv + compute + logits + tables


def check_memory(paths: Sequence[Path], hidden_paths: Sequence[Path], n_ctx: int, parallel: int) -> None:
    """Refuse models that would not fit in the memory available (one line: what they need, what is there, what to
    change); ``hidden_paths``: the files loaded with hidden states (a router)."""
    available = available_memory_bytes()
    if available is None:
        return
    unique = list(dict.fromkeys(os.path.realpath(p) for p in paths))  # one load per file
    hidden = {os.path.realpath(p) for p in hidden_paths}
    need = sum(estimate_memory_bytes(Path(p), n_ctx * parallel, hidden_states=p in hidden) for p in unique)
    if need > available:
        raise ModelLoadError(
            f"not enough memory: the {len(paths)} model(s) need about {need / 2**30:.1f} GiB "
            f"(weights, KV cache and buffers at n_ctx {n_ctx} x parallel {parallel}) but"
            f" {available / 2**30:.1f} GiB is available; use smaller models, a smaller --n-ctx or --parallel"
        )
