"""The runtime layer against llama.cpp itself: greedy parity, trim / fork exactness, byte pieces, errors."""

from __future__ import annotations

import numpy as np
import pytest

import llama_cpp
from edge_ensemble.text_stream import TextStream
from edge_ensemble.errors import ContextOverflowError, ModelLoadError
from edge_ensemble.runtime import LoadOptions, Model, usable_cores

PROMPTS = [
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 17 * 23?"}],
    [{"role": "user", "content": "List three prime numbers and explain why they are prime."}],
]


def _greedy(model: Model, prompt: list[int], n: int) -> list[int]:
    model.reset()
    logits = model.decode(prompt)
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits[0]))
        out.append(tok)
        if model.is_eog(tok):
            break
        logits = model.decode([tok])
    return out


@pytest.mark.parametrize("key", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_greedy_matches_llama_cpp_python(real_models, key):
    path = real_models(key)
    ours = Model(path, LoadOptions(n_ctx=512))
    ref = llama_cpp.Llama(str(path), n_ctx=512, n_threads=usable_cores(), verbose=False)
    try:
        for messages in PROMPTS:
            prompt = ours.prompt_tokens(ours.render_chat(messages))
            mine = _greedy(ours, prompt, 24)
            theirs = []
            for tok in ref.generate(prompt, temp=0.0, reset=True):
                theirs.append(tok)
                if len(theirs) == len(mine) or ours.is_eog(tok):
                    break
            assert mine == theirs, f"{key}: {ours.detokenize(mine)!r} != {ours.detokenize(theirs)!r}"
    finally:
        ours.close()
        ref.close()


def test_trim_then_redecode_is_bit_identical_past_gemma_sliding_window(real_models):
    """Roll back to a point past the 512-token window and re-decode: the same logits, bit for bit.
    (Compared with the same batch split: llama.cpp's batched and one-token passes differ numerically.)"""
    model = Model(real_models("gemma-3-270m"), LoadOptions(n_ctx=1024, n_batch=256))
    try:
        rng = np.random.default_rng(0)
        tokens = rng.integers(1000, 20000, size=760).tolist()
        model.decode(tokens[:590], want=None)
        first = model.decode(tokens[590:700], want=[9, 60, 109]).copy()
        model.decode(tokens[700:], want=None)
        model.trim(590)
        again = model.decode(tokens[590:700], want=[9, 60, 109])
        assert np.array_equal(first, again)
        # one token at a time, the way a drafter decodes, rolled back 100 tokens
        model.trim(600)
        steps = [model.decode([t]).copy() for t in tokens[600:700]]
        model.trim(600)
        redo = [model.decode([t]).copy() for t in tokens[600:700]]
        assert all(np.array_equal(a, b) for a, b in zip(steps, redo))
    finally:
        model.close()


def test_trim_and_decode_want_rows_across_batch_chunks(tiny_bpe):
    model = Model(tiny_bpe, LoadOptions(n_ctx=256, n_batch=8, n_threads=1))
    tokens = list(range(40, 70))
    full = model.decode(tokens, want="all").copy()  # 30 tokens in 4 chunks
    assert full.shape == (30, model.n_vocab)
    model.reset()
    some = model.decode(tokens, want=[2, 9, -1]).copy()
    # the number of output rows changes the matmul shapes: equal up to float rounding
    np.testing.assert_allclose(some, full[[2, 9, 29]], atol=1e-5)
    model.trim(12)
    assert model.n_past() == 12
    redo = model.decode(tokens[12:], want=[-1])
    assert np.array_equal(redo[0], some[-1])  # same rows asked, same split: bit-identical
    assert model.decode(tokens[:0]).shape == (0, model.n_vocab)
    model.close()


def test_fork_gives_each_sequence_its_own_logits(tiny_spm):
    shared = [5, 60, 70, 80, 90]
    a_tail, b_tail = [100, 110, 120], [200, 210]
    multi = Model(tiny_spm, LoadOptions(n_ctx=256, n_seq_max=2, n_threads=1))
    multi.decode(shared, seq=0)
    multi.fork(0, 1)
    la = multi.decode(a_tail, seq=0).copy()
    lb = multi.decode(b_tail, seq=1).copy()
    assert multi.tokens(0) == shared + a_tail and multi.tokens(1) == shared + b_tail
    alone = Model(tiny_spm, LoadOptions(n_ctx=256, n_threads=1))
    ra = alone.decode(shared + a_tail).copy()
    alone.reset()
    rb = alone.decode(shared + b_tail).copy()
    np.testing.assert_allclose(la, ra, atol=1e-4)
    np.testing.assert_allclose(lb, rb, atol=1e-4)
    # trimming one branch leaves the other intact
    multi.trim(len(shared), seq=1)
    again = multi.decode(a_tail[:0] + [130], seq=0).copy()
    alone.reset()
    np.testing.assert_allclose(again, alone.decode(shared + a_tail + [130]), atol=1e-4)
    multi.close()
    alone.close()


@pytest.mark.parametrize("key", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_every_byte_piece_concatenates_to_llama_detokenize(real_models, key):
    model = Model(real_models(key), LoadOptions(vocab_only=True))
    table = model.token_bytes
    assert len(table) == model.n_vocab
    ids = [t for t in range(model.n_vocab) if not model.is_control(t)]
    for lo in range(0, len(ids), 4096):
        chunk = ids[lo : lo + 4096]
        assert b"".join(table[t] for t in chunk) == model.llama_detokenize(chunk), f"ids {chunk[0]}..{chunk[-1]}"
    # pieces longer than the wrapper's 32-byte buffer come back whole
    assert max(len(b) for b in table) > 16
    model.close()


@pytest.mark.parametrize("fixture", ["tiny_bpe", "tiny_spm"])
def test_streamed_text_never_breaks_a_utf8_character(request, fixture):
    model = Model(request.getfixturevalue(fixture), LoadOptions(vocab_only=True))
    text = "Emoji 🚀👩‍💻 and CJK 日本語のテキスト, accents: crème brûlée."
    tokens = model.tokenize(text, add_bos=False)
    assert len(tokens) > len(text.split())  # multi-byte characters are split across tokens
    stream, out = TextStream(()), []
    for t in tokens:
        chunk = stream.push(model.token_bytes[t])
        assert "\ufffd" not in chunk
        out.append(chunk)
    out.append(stream.finish())
    assert "".join(out) == text
    model.close()


def test_bad_files_get_one_line_errors(tmp_path, tiny_bpe):
    import tiny_gguf

    with pytest.raises(ModelLoadError, match="not found"):
        Model(tmp_path / "missing.gguf")
    with pytest.raises(ModelLoadError, match="not a file"):
        Model(tmp_path)
    bad = tiny_gguf.write_not_gguf(tmp_path / "notes.gguf")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        Model(bad)
    trunc = tiny_gguf.write_truncated_gguf(tiny_bpe, tmp_path / "trunc.gguf", fraction=0.5)
    with pytest.raises(ModelLoadError) as err:
        Model(trunc)
    assert "\n" not in str(err.value) and "cannot load" in str(err.value)


def test_context_overflow_and_vocab_only(tiny_bpe):
    model = Model(tiny_bpe, LoadOptions(n_ctx=64, n_threads=1))  # llama.cpp pads n_ctx up (to 256)
    filled = model.n_ctx - 4
    model.decode([50 + i % 400 for i in range(filled)])
    with pytest.raises(ContextOverflowError, match="context full"):
        model.decode(list(range(10)))
    assert model.n_past() == filled  # the failed call changed nothing
    model.close()
    vocab = Model(tiny_bpe, LoadOptions(vocab_only=True))
    with pytest.raises(ModelLoadError, match="vocab_only"):
        vocab.decode([1, 2])
    vocab.close()


def test_metadata_chat_template_and_eog(tiny_bpe, tiny_spm):
    bpe = Model(tiny_bpe, LoadOptions(vocab_only=True))
    assert bpe.chat_template and "<|im_start|>" in bpe.render_chat([{"role": "user", "content": "hi"}])
    assert all(bpe.is_eog(t) for t in bpe.eog_ids) and len(bpe.eog_ids) >= 1
    spm = Model(tiny_spm, LoadOptions(vocab_only=True))
    assert spm.chat_template is None
    assert spm.render_chat([{"role": "user", "content": "hi"}]).endswith("Assistant:\n")  # plain fallback
    bpe.close()
    spm.close()


def test_reconcile_after_an_interrupted_decode(tiny_bpe):
    """Ctrl-C can land between llama_decode and the token-list update: the next use must repair it."""
    model = Model(tiny_bpe, LoadOptions(n_ctx=256, n_threads=1))
    tokens = list(range(60, 80))
    model.decode(tokens)
    del model.context._seq_tokens[0][-3:]  # the list lost the last 3 tokens the cache still holds
    assert model.cached_len() == 20 and model.n_past() == 17
    model.reconcile()
    assert model.cached_len() == model.n_past() == 17
    again = model.decode(tokens[17:]).copy()
    fresh = Model(tiny_bpe, LoadOptions(n_ctx=256, n_threads=1))
    np.testing.assert_allclose(again, fresh.decode(tokens), atol=1e-4)
    model.trim(10)
    model.context._seq_tokens[0].extend([1, 2])  # the other way round: the list is longer than the cache
    model.reconcile()
    assert model.cached_len() == model.n_past() == 10
    model.close()
    fresh.close()


# -- the three objects: model file, context, batch ------------------------------------------------------------


def test_a_vocab_only_model_file_reads_the_header_without_a_context(tiny_bpe):
    from edge_ensemble.model_file import ModelFile

    with ModelFile.open_vocab(tiny_bpe) as f, Model(tiny_bpe, LoadOptions(n_ctx=256, n_threads=1)) as full:
        assert f.vocab_only and not hasattr(f, "decode")
        assert (f.n_vocab, f.n_embd, f.architecture, f.name) == (full.n_vocab, full.n_embd, full.architecture, full.name)
        assert f.arch_int("block_count", 0) == int(f.metadata(f"{f.architecture}.block_count")) > 0
        assert f.arch_int("embedding_length", 0) == f.n_embd
        assert f.arch_int("no_such_key", 7) == 7 and f.arch_int("rope.dimension_count", 0) > 0
        assert f.tokenizer_fingerprint == full.tokenizer_fingerprint and f.token_bytes == full.token_bytes
    f.close()  # twice: a no-op


def test_a_context_over_a_model_file_decodes_as_the_model_does(tiny_bpe):
    from edge_ensemble.chat import prompt_tokens, render_messages
    from edge_ensemble.context import Context
    from edge_ensemble.model_file import ModelFile

    messages = [{"role": "user", "content": "say <|im_start|> please"}]
    with Model(tiny_bpe, LoadOptions(n_ctx=256, n_threads=1)) as model, ModelFile(tiny_bpe) as f:
        prompt = prompt_tokens(f, render_messages(f, messages))
        assert prompt == model.prompt_tokens(model.render_chat(messages))
        with Context(f, n_ctx=256, n_threads=1) as ctx:
            assert (ctx.n_ctx, ctx.n_vocab) == (model.n_ctx, model.n_vocab)
            assert np.array_equal(ctx.decode(prompt, want="all"), model.decode(prompt, want="all"))
            ctx.trim(3)
            assert ctx.tokens() == prompt[:3] and ctx.cells_used == 3
        with pytest.raises(ModelLoadError, match="closed"):
            ctx.decode([1])
        assert model.context.n_past() == len(prompt)  # the model's own context is untouched


def test_a_vocab_only_model_has_no_context_and_says_so(tiny_bpe):
    with Model(tiny_bpe, LoadOptions(vocab_only=True)) as vocab:
        assert vocab.n_ctx == 0 and vocab.llama_decode_seconds == 0.0 and vocab.n_embd > 0
        vocab.reset()  # nothing cached: nothing to do
        for call in (lambda: vocab.decode([1]), lambda: vocab.trim(0), lambda: vocab.tokens(0),
                     lambda: vocab.free_cells(), lambda: vocab.fork(0, 1)):
            with pytest.raises(ModelLoadError, match="vocab_only"):
                call()
    model = Model(tiny_bpe, LoadOptions(n_ctx=256, n_threads=1))
    model.decode([5, 6, 7])
    model.close()
    model.close()  # twice: a no-op
    with pytest.raises(ModelLoadError, match=r"vocab_only \(or closed\)"):
        model.decode([8])
