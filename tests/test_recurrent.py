"""Recurrent models are refused with one clear line, at every entry point (runtime, API, CLI).

The model is a real (tiny, random-weight) Mamba GGUF from ``tiny_gguf.write_tiny_mamba``: llama.cpp loads and
decodes it, and reports it as recurrent.  Its memory keeps one state per sequence, not one cell per token, so
llama.cpp refuses to remove a suffix of a sequence - the token-by-token rollback edge-ensemble's drafting and
verification depend on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import tiny_gguf
from edge_ensemble.api import Ensemble, EnsembleConfig
from edge_ensemble.cli import cli
from edge_ensemble.errors import ModelLoadError
from edge_ensemble.runtime import Model

L = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def tiny_mamba(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gguf.write_tiny_mamba(tmp_path_factory.mktemp("tiny-mamba") / "tiny-mamba.gguf")


def assert_recurrent_refusal(message: str) -> None:
    assert "\n" not in message.strip(), message
    assert "recurrent" in message, message
    assert "tiny-mamba.gguf" in message and "(mamba)" in message, message


# -- the fixture really is a recurrent model llama.cpp can run ----------------------------------------------------


def test_tiny_mamba_is_deterministic(tiny_mamba: Path, tmp_path: Path) -> None:
    again = tiny_gguf.write_tiny_mamba(tmp_path / "again.gguf")
    assert again.read_bytes() == tiny_mamba.read_bytes()
    other = tiny_gguf.write_tiny_mamba(tmp_path / "other.gguf", seed=1, vocab="bpe")
    assert other.read_bytes() != tiny_mamba.read_bytes()
    assert tiny_mamba.stat().st_size < 1_000_000


def test_tiny_mamba_is_recurrent_and_cannot_roll_back(tiny_mamba: Path, llama_quiet: None) -> None:
    L.llama_backend_init()
    model = L.llama_model_load_from_file(str(tiny_mamba).encode(), L.llama_model_default_params())
    assert model, "llama.cpp could not load the tiny Mamba model"
    ctx = None
    try:
        assert L.llama_model_is_recurrent(model)
        assert not L.llama_model_is_hybrid(model)
        vocab = L.llama_model_get_vocab(model)
        n_vocab = L.llama_vocab_n_tokens(vocab)

        cparams = L.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = 64
        cparams.n_threads = cparams.n_threads_batch = 1
        ctx = L.llama_init_from_model(model, cparams)
        assert ctx

        text = b"Hello world, the quick brown fox"
        buf = (L.llama_token * 64)()
        n = L.llama_tokenize(vocab, text, len(text), buf, len(buf), True, False)
        assert n > 4
        assert L.llama_decode(ctx, L.llama_batch_get_one(buf, n)) == 0
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        assert np.isfinite(logits).all() and logits.std() > 0.5  # real, non-degenerate logits

        mem = L.llama_get_memory(ctx)
        # one state per sequence: only the last position is held
        assert L.llama_memory_seq_pos_max(mem, 0) == n - 1
        # removing a suffix (rolling back 2 tokens) is refused, and nothing changes
        assert L.llama_memory_seq_rm(mem, 0, n - 2, -1) is False
        assert L.llama_memory_seq_pos_max(mem, 0) == n - 1
        # removing the whole sequence is allowed
        assert L.llama_memory_seq_rm(mem, 0, 0, -1) is True
        assert L.llama_memory_seq_pos_max(mem, 0) == -1
    finally:
        if ctx:
            L.llama_free(ctx)
        L.llama_model_free(model)


# -- edge-ensemble refuses it ----------------------------------------------------------------------------------


def test_runtime_model_refuses_recurrent(tiny_mamba: Path, llama_quiet: None) -> None:
    with pytest.raises(ModelLoadError) as info:
        Model(tiny_mamba)
    assert_recurrent_refusal(str(info.value))


def test_ensemble_refuses_recurrent(tiny_mamba: Path, tiny_bpe: Path, llama_quiet: None) -> None:
    config = EnsembleConfig(check_memory=False, n_threads=1)
    with pytest.raises(ModelLoadError) as info:
        Ensemble([tiny_mamba], config=config)
    assert_recurrent_refusal(str(info.value))
    # also as the second member, after a transformer model was loaded (that one is closed again)
    with pytest.raises(ModelLoadError) as info:
        Ensemble([tiny_bpe, tiny_mamba], config=EnsembleConfig(check_memory=False, n_threads=1, n_ctx=256))
    assert_recurrent_refusal(str(info.value))


def test_cli_refuses_recurrent(tiny_mamba: Path, llama_quiet: None) -> None:
    result = CliRunner().invoke(cli, ["run", "-m", str(tiny_mamba), "--threads", "1", "hi"])
    assert result.exit_code != 0, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not an exception escaping the CLI
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert_recurrent_refusal(lines[0])
    assert "Traceback" not in result.output
