"""Shared pytest fixtures: tiny random GGUF models, the real small models, and a clean environment.

Tiny models (session-scoped, written once per test session under pytest's tmp directory, ~0.1 s each):

* ``tiny_spm``       SentencePiece-style vocabulary (byte fallback, ``<s>``/``</s>``), seed 0, no chat template
* ``tiny_spm_chat``  same vocabulary, seed 1, Gemma-style template (``<start_of_turn>``/``<end_of_turn>``)
* ``tiny_bpe``       byte-level BPE vocabulary, seed 0, ChatML template (``<|im_start|>``/``<|im_end|>``)
* ``tiny_bpe_b``     same vocabulary and template as ``tiny_bpe``, seed 1: same tokenizer, different weights
* ``tiny_bpe_close``  (a, b): two BPE models with 99%-correlated weights (greedy agreement ~50%)
* ``tiny_smollm2``   random weights with SmolLM2's real tokenizer (needs the real model, see below)

Real models: ``real_models`` is a callable ``real_model(key) -> Path`` resolving a catalog key
("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m") through
``edge_ensemble.sources.resolve_model``.  A model that cannot be resolved FAILS the test (CI installs them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import pytest

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny_gguf  # noqa: E402

_KEEP_ALIVE: list[object] = []

# ---------------------------------------------------------------------------------------------------------------
# Environment


@pytest.fixture(scope="session")
def _no_config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("no-config") / "config.toml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, _no_config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No colours, never the user's own config file (an empty one, emptied again for each test: a config file
    named by EDGE_ENSEMBLE_CONFIG must exist), and never the user's conversation log: each test's ``run``,
    ``chat`` and ``serve`` log into a database of its own (EDGE_ENSEMBLE_LOGS, a path not yet made, in a
    directory apart from ``tmp_path``).  EDGE_ENSEMBLE_CACHE is left alone on purpose: the real models are
    assembled there once and reused between runs."""
    monkeypatch.setenv("NO_COLOR", "1")
    _no_config_path.write_text("")
    monkeypatch.setenv("EDGE_ENSEMBLE_CONFIG", str(_no_config_path))
    monkeypatch.setenv("EDGE_ENSEMBLE_LOGS", str(tmp_path_factory.mktemp("logs") / "logs.db"))


@pytest.fixture(scope="session")
def llama_quiet() -> None:
    """Silence llama.cpp's C-side logging for the rest of the session (``verbose=False`` covers most of it;
    this also silences contexts and vocab-only loads made through the low-level API)."""
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _discard(level, text, user_data):  # noqa: ANN001
        pass

    llama_cpp.llama_log_set(_discard, None)
    _KEEP_ALIVE.append(_discard)  # llama.cpp keeps calling it: the ctypes object must not be collected


# ---------------------------------------------------------------------------------------------------------------
# Tiny models


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-gguf")


@pytest.fixture(scope="session")
def tiny_spm(tiny_dir: Path) -> Path:
    return tiny_gguf.write_tiny_llama(tiny_dir / "tiny-spm.gguf", vocab="spm", seed=0)


@pytest.fixture(scope="session")
def tiny_spm_chat(tiny_dir: Path) -> Path:
    return tiny_gguf.write_tiny_llama(
        tiny_dir / "tiny-spm-chat.gguf", vocab="spm", seed=1, chat_template=tiny_gguf.GEMMA_TEMPLATE
    )


@pytest.fixture(scope="session")
def tiny_bpe(tiny_dir: Path) -> Path:
    return tiny_gguf.write_tiny_llama(
        tiny_dir / "tiny-bpe.gguf", vocab="bpe", seed=0, chat_template=tiny_gguf.CHATML_TEMPLATE
    )


@pytest.fixture(scope="session")
def tiny_bpe_b(tiny_dir: Path) -> Path:
    return tiny_gguf.write_tiny_llama(
        tiny_dir / "tiny-bpe-b.gguf", vocab="bpe", seed=1, chat_template=tiny_gguf.CHATML_TEMPLATE
    )


@pytest.fixture(scope="session")
def tiny_bpe_close(tiny_dir: Path) -> tuple[Path, Path]:
    """Two BPE models (same vocabulary and template) whose weights are 99% correlated: they agree on the greedy
    next token roughly half the time (tiny_bpe / tiny_bpe_b almost never do)."""
    return tuple(  # type: ignore[return-value]
        tiny_gguf.write_tiny_llama(
            tiny_dir / f"tiny-bpe-close-{seed}.gguf",
            vocab="bpe",
            seed=seed,
            share=0.99,
            chat_template=tiny_gguf.CHATML_TEMPLATE,
        )
        for seed in (0, 1)
    )


# ---------------------------------------------------------------------------------------------------------------
# Real models


@pytest.fixture(scope="session")
def real_models() -> Callable[[str], Path]:
    """``real_model(key) -> Path``: a real catalog model, assembled into the cache if needed.

    Fails the test (never skips) when the model cannot be resolved: CI installs the model packages.
    """
    resolved: dict[str, Path] = {}

    def real_model(key: str) -> Path:
        if key not in resolved:
            from edge_ensemble.errors import ModelSourceError
            from edge_ensemble.sources import resolve_model

            try:
                resolved[key] = Path(resolve_model(key, progress=False))
            except ModelSourceError as exc:
                pytest.fail(f"real model {key!r} is not available: {exc}", pytrace=False)
        return resolved[key]

    return real_model


@pytest.fixture(scope="session")
def tiny_smollm2(tiny_dir: Path, real_models: Callable[[str], Path]) -> Path:
    """Random tiny weights with SmolLM2-135M-Instruct's exact tokenizer (49,152 tokens, F16 embeddings, ~6 MB)."""
    return tiny_gguf.write_tiny_llama(
        tiny_dir / "tiny-smollm2-tokenizer.gguf",
        seed=2,
        borrow_tokenizer_from=real_models("smollm2-135m-instruct"),
    )


def assert_same_up_to_late_near_ties(got: list[str], want: list[str], *, min_identical: int | None = None) -> None:
    """Answers decoded in a batch against the same answers decoded alone, on a real model: the same
    computation in another floating-point order, which on some CPUs (AVX-512 kernels for batches) moves logits
    by up to ~0.2, so a greedy answer may part from its alone twin at a near-tie (test_batched checks that
    token by token with the logits). Here: at least half the answers are byte-identical, and every other one
    agrees with its twin over its first 8 characters at least (its first tokens: the answer to its own prompt) —
    a leak between sequences garbles an answer from its start. ``min_identical`` overrides "half" where the list
    is too short for a share to mean anything (two answers: both may meet a near-tie in one run)."""
    assert len(got) == len(want)
    same = sum(g == w for g, w in zip(got, want))
    assert same >= ((len(want) + 1) // 2 if min_identical is None else min_identical), (got, want)
    for g, w in zip(got, want):
        common = len(os.path.commonprefix([g, w]))
        assert g == w or common >= min(8, len(w)), (g, w)


# ---------------------------------------------------------------------------------------------------------------
# Inspecting a generation


@pytest.fixture
def lanes(monkeypatch: pytest.MonkeyPatch):
    """The lanes this test's generations open (:class:`doubles.LaneLog`): ``lanes.last(member)``."""
    from doubles import LaneLog

    return LaneLog(monkeypatch)
