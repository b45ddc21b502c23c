"""The tiny GGUF fixtures load in llama.cpp, tokenize any text, generate, and differ where they should."""

from __future__ import annotations

import ctypes
import hashlib
import time
from pathlib import Path

import numpy as np
import pytest

import tiny_gguf

llama_cpp = pytest.importorskip("llama_cpp")

TEXT = "Hello world 123 ☃ 你好 🚀"
MIXED = (
    "Hello world 123 ☃ 你好 🚀\n\n  def f(x):\n\treturn x**2  # ok\n"
    "Étienne's café: 3.14159, 1000000 items;   <|im_start|> done.\n"
)
TINY = ["tiny_spm", "tiny_spm_chat", "tiny_bpe", "tiny_bpe_b"]


def load(path: Path, **kw) -> "llama_cpp.Llama":
    return llama_cpp.Llama(model_path=str(path), verbose=False, n_ctx=256, n_threads=1, n_threads_batch=1, **kw)


def piece(llm, token: int, special: bool = False) -> bytes:
    """Exact bytes of one token (Llama.detokenize truncates pieces longer than 32 bytes)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buf = ctypes.create_string_buffer(512)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    assert n >= 0, f"piece of token {token} needs {-n} bytes"
    return buf.raw[:n]


def greedy(llm, prompt: bytes, n: int = 10) -> list[int]:
    out: list[int] = []
    for tok in llm.generate(llm.tokenize(prompt, add_bos=True), top_k=1, temp=0.0):
        out.append(tok)
        if len(out) == n:
            break
    return out


def next_token_logits(llm, tokens: list[int]) -> np.ndarray:
    """(len(tokens), n_vocab) logits, teacher-forced (needs logits_all=True)."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)])


@pytest.fixture(scope="module")
def loaded(request, llama_quiet) -> dict:
    """Each tiny model loaded once for this module (and its load time)."""
    models = {}
    for name in TINY:
        path = request.getfixturevalue(name)
        t0 = time.perf_counter()
        llm = load(path)
        models[name] = (llm, time.perf_counter() - t0)
    return models


@pytest.mark.parametrize("name", TINY)
def test_loads_fast_and_small(name, request, loaded):
    path = request.getfixturevalue(name)
    llm, seconds = loaded[name]
    assert seconds < 1.0
    assert 100_000 <= path.stat().st_size <= 300_000
    assert llm.n_vocab() > 400
    assert llm.metadata["general.architecture"] == "llama"
    assert llama_cpp.llama_model_n_ctx_train(llm.model) == 8192


@pytest.mark.parametrize("name", TINY)
def test_round_trip_exact_bytes(name, loaded):
    llm, _ = loaded[name]
    for text in (TEXT, MIXED):
        tokens = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert b"".join(piece(llm, t) for t in tokens) == text.encode()
    # characters outside the vocabulary split into several byte tokens
    assert len(llm.tokenize("🚀".encode(), add_bos=False)) == 4


def test_spm_vocab_shape(loaded):
    llm, _ = loaded["tiny_spm"]
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_type(vocab) == llama_cpp.LLAMA_VOCAB_TYPE_SPM
    assert (llm.token_bos(), llm.token_eos()) == (1, 2)
    assert llama_cpp.llama_vocab_get_text(vocab, 3 + 0x41) == b"<0x41>"
    assert llama_cpp.llama_vocab_get_attr(vocab, 3 + 0x41) & llama_cpp.LLAMA_TOKEN_ATTR_BYTE
    assert llm.tokenize(b"Hello", add_bos=True)[0] == 1  # add_bos
    assert piece(llm, llm.tokenize(b" the", add_bos=False)[0]) == b" the"  # "\u2581the" is one piece


def test_bpe_vocab_shape(loaded):
    llm, _ = loaded["tiny_bpe"]
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_type(vocab) == llama_cpp.LLAMA_VOCAB_TYPE_BPE
    assert llm.tokenize(b"Hello", add_bos=True) == llm.tokenize(b"Hello", add_bos=False)  # no BOS added
    eot = llm.token_eos()
    assert llama_cpp.llama_vocab_get_text(vocab, eot) == b"<|endoftext|>"
    im_start, im_end = llm.tokenize(b"<|im_start|><|im_end|>", add_bos=False, special=True)
    for tok in (eot, im_start, im_end):
        assert llama_cpp.llama_vocab_get_attr(vocab, tok) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
    assert llama_cpp.llama_vocab_is_eog(vocab, eot) and llama_cpp.llama_vocab_is_eog(vocab, im_end)
    assert not llama_cpp.llama_vocab_is_eog(vocab, im_start)
    # as plain text the markers are not special tokens
    assert im_start not in llm.tokenize(b"<|im_start|>", add_bos=False, special=False)
    assert piece(llm, llm.tokenize(b" the", add_bos=False)[0]) == b" the"


def test_chat_templates_render(loaded):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    messages = [{"role": "user", "content": "Hi there"}]
    for name, start, end in (("tiny_bpe", "<|im_start|>", "<|im_end|>"), ("tiny_spm_chat", "<start_of_turn>", "<end_of_turn>")):
        llm, _ = loaded[name]
        template = llm.metadata["tokenizer.chat_template"]
        prompt = Jinja2ChatFormatter(
            template=template, eos_token="", bos_token="", add_generation_prompt=True
        )(messages=messages).prompt
        assert prompt.startswith(start) and end in prompt and "Hi there" in prompt
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        end_tok = llm.tokenize(end.encode(), add_bos=False, special=True)
        assert len(end_tok) == 1 and end_tok[0] in tokens
        assert llama_cpp.llama_vocab_is_eog(vocab, end_tok[0])
    assert "tokenizer.chat_template" not in loaded["tiny_spm"][0].metadata


@pytest.mark.parametrize("name", TINY)
def test_generates_greedily(name, loaded):
    llm, _ = loaded[name]
    out = greedy(llm, b"The answer is", 10)
    assert len(out) == 10 and all(0 <= t < llm.n_vocab() for t in out)
    assert len(set(out)) > 1


def test_logits_are_informative(tiny_bpe, llama_quiet):
    llm = load(tiny_bpe, logits_all=True)
    tokens = llm.tokenize(MIXED.encode() * 2, add_bos=False)[:120]
    logits = next_token_logits(llm, tokens)
    assert np.all(logits.std(axis=1) > 0.5)  # never flat
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    entropy = -(p * np.log(p + 1e-30)).sum(axis=1)
    assert 1.0 < entropy.mean() < 3.5, entropy.mean()  # ln(n_vocab) is ~6.3
    assert len(set(logits.argmax(axis=1))) > 20  # the next token depends on the context


def test_different_seeds_disagree_same_vocab(loaded):
    a, _ = loaded["tiny_bpe"]
    b, _ = loaded["tiny_bpe_b"]
    # same tokenizer ...
    assert a.n_vocab() == b.n_vocab()
    assert a.tokenize(MIXED.encode(), add_bos=False) == b.tokenize(MIXED.encode(), add_bos=False)
    assert all(piece(a, t) == piece(b, t) for t in range(a.n_vocab()))
    # ... different weights
    assert greedy(a, b"The answer is") != greedy(b, b"The answer is")
    s, _ = loaded["tiny_spm"]
    s1, _ = loaded["tiny_spm_chat"]
    assert greedy(s, b"The answer is") != greedy(s1, b"The answer is")


def test_close_pair_agrees_often(tiny_bpe_close, llama_quiet):
    a, b = (load(p, logits_all=True) for p in tiny_bpe_close)
    tokens = a.tokenize(MIXED.encode() * 2, add_bos=False)[:150]
    agree = (next_token_logits(a, tokens).argmax(1) == next_token_logits(b, tokens).argmax(1)).mean()
    assert 0.25 < agree < 0.95, agree


def test_same_seed_same_bytes(tmp_path):
    kw = dict(vocab="bpe", seed=7, chat_template="chatml")
    a = tiny_gguf.write_tiny_llama(tmp_path / "a.gguf", **kw)
    b = tiny_gguf.write_tiny_llama(tmp_path / "b.gguf", **kw)
    c = tiny_gguf.write_tiny_llama(tmp_path / "c.gguf", **{**kw, "seed": 8})
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(a) == digest(b) != digest(c)
    s1 = tiny_gguf.write_tiny_llama(tmp_path / "s1.gguf", vocab="spm", seed=7)
    s2 = tiny_gguf.write_tiny_llama(tmp_path / "s2.gguf", vocab="spm", seed=7)
    assert digest(s1) == digest(s2)
    assert not list(tmp_path.glob("*.tmp"))


def test_writer_options(tmp_path, llama_quiet):
    p = tiny_gguf.write_tiny_llama(
        tmp_path / "big.gguf", vocab="spm", n_ctx_train=1024, n_embd=64, n_layer=3, n_head=8, n_head_kv=8, n_ff=128
    )
    llm = load(p)
    assert llama_cpp.llama_model_n_ctx_train(llm.model) == 1024 and llm.n_embd() == 64
    assert llm.metadata["llama.block_count"] == "3"
    assert len(greedy(llm, b"Hi", 3)) == 3
    with pytest.raises(ValueError):
        tiny_gguf.write_tiny_llama(tmp_path / "x.gguf", vocab="wordpiece")


def test_bad_files_do_not_load(tmp_path, tiny_bpe, llama_quiet):
    bad = tiny_gguf.write_not_gguf(tmp_path / "not.gguf")
    assert bad.read_bytes()[:4] != b"GGUF"
    cut = tiny_gguf.write_truncated_gguf(tiny_bpe, tmp_path / "cut.gguf", 0.5)
    assert cut.stat().st_size == tiny_bpe.stat().st_size // 2
    assert cut.read_bytes()[:4] == b"GGUF"
    header_only = tiny_gguf.write_truncated_gguf(tiny_bpe, tmp_path / "head.gguf", 0.01)
    for path in (bad, cut, header_only):
        with pytest.raises(ValueError):
            load(path)


@pytest.mark.real
def test_borrowed_tokenizer_matches_real_model(tiny_smollm2, real_models, llama_quiet):
    real_path = real_models("smollm2-135m-instruct")
    real = llama_cpp.Llama(model_path=str(real_path), verbose=False, vocab_only=True)
    tiny = load(tiny_smollm2)
    assert tiny.n_vocab() == real.n_vocab() == 49152
    assert tiny_smollm2.stat().st_size < 10_000_000
    for special in (False, True):
        for add_bos in (False, True):
            assert tiny.tokenize(MIXED.encode(), add_bos=add_bos, special=special) == real.tokenize(
                MIXED.encode(), add_bos=add_bos, special=special
            )
    assert (tiny.token_bos(), tiny.token_eos()) == (real.token_bos(), real.token_eos())
    assert tiny.metadata["tokenizer.chat_template"] == real.metadata["tokenizer.chat_template"]
    assert tiny.metadata["tokenizer.ggml.pre"] == real.metadata["tokenizer.ggml.pre"]
    ids = list(range(0, 49152, 97)) + [0, 1, 2]
    assert [piece(tiny, t, special=True) for t in ids] == [piece(real, t, special=True) for t in ids]
    assert len(greedy(tiny, b"Hello", 5)) == 5
