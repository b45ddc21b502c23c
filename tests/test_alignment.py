"""Incremental tokenization of a growing text and the boundary checks, on real tokenizers (vocab-only loads)."""

from __future__ import annotations

import random

import pytest

from edge_ensemble.alignment import TokenTrack, complete_utf8_len, is_boundary, token_ending_at
from edge_ensemble.runtime import LoadOptions, Model

TEXTS = [
    "Hello world! Let's count: 1, 22, 333, 4444, 55555.\n\n  Double  spaces and\ttabs.",
    "Café crème brûlée — naïve façade. 日本語のテキスト 🚀🚀 emoji 👩‍💻 done.",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(12345))\n",
]


@pytest.fixture(scope="module")
def tokenizers(real_models, tiny_spm, tiny_bpe):
    paths = {
        "smollm2": real_models("smollm2-135m-instruct"),
        "qwen": real_models("qwen2.5-coder-0.5b-instruct"),
        "gemma": real_models("gemma-3-270m"),
        "tiny_spm": tiny_spm,
        "tiny_bpe": tiny_bpe,
    }
    models = {k: Model(p, LoadOptions(vocab_only=True)) for k, p in paths.items()}
    yield models
    for m in models.values():
        m.close()


def _track(model: Model) -> TokenTrack:
    return TokenTrack(lambda b: model.tokenize(b, add_bos=False, special=False), model.token_bytes)


def _chunks(text: bytes, rng: random.Random):
    i = 0
    while i < len(text):
        n = rng.choice([1, 1, 2, 3, 5, 8])
        yield text[i : i + n]
        i += n


@pytest.mark.parametrize("name", ["smollm2", "qwen", "gemma", "tiny_spm", "tiny_bpe"])
def test_incremental_tokens_equal_whole_text_tokenization(tokenizers, name):
    """Property: growing the text in random byte chunks (splitting UTF-8 characters too) gives the same
    tokens as tokenizing the whole text, and the pieces always concatenate to the text."""
    model = tokenizers[name]
    rng = random.Random(1234)
    alphabet = list("abc xyz 0123456789 \n\t  éü日本🚀,.()") + [" the", " 42", "  ", "\n\n", "ing"]
    texts = [t.encode() for t in TEXTS]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(20, 120))).encode() for _ in range(30)]
    mismatches = 0
    for text in texts:
        track = _track(model)
        for chunk in _chunks(text, rng):
            track.extend(chunk)
            assert b"".join(model.token_bytes[t] for t in track.tokens) == track.text[: complete_utf8_len(track.text)]
        whole = model.tokenize(text, add_bos=False, special=False)
        mismatches += track.tokens != whole
    assert mismatches == 0, f"{mismatches} of {len(texts)} texts differ from whole-text tokenization"


def test_preview_does_not_commit(tokenizers):
    model = tokenizers["qwen"]
    track = _track(model)
    track.extend(b"The answer is")
    before = list(track.tokens)
    toks, ends = track.preview(b" 42.")
    assert track.tokens == before and track.text == b"The answer is"
    assert ends[-1] == len(b"The answer is 42.")
    assert b"".join(model.token_bytes[t] for t in toks) == b"The answer is 42."


def test_boundaries():
    ends = [3, 7, 8, 12]
    assert is_boundary(ends, 0) and is_boundary(ends, 7) and not is_boundary(ends, 5)
    assert token_ending_at(ends, 0) == -1 and token_ending_at(ends, 8) == 2
    with pytest.raises(ValueError):
        token_ending_at(ends, 9)


def test_drafter_boundary_inside_verifier_token_is_detected(tokenizers):
    """SAFE's OOV-like check: a boundary of one tokenizer that falls inside another's token."""
    q, s, g = tokenizers["qwen"], tokenizers["smollm2"], tokenizers["gemma"]
    text = "Incorrectly, the 日本 tokenization differs".encode()
    ends = {}
    for name, m in (("q", q), ("s", s), ("g", g)):
        t = _track(m)
        t.extend(text)
        ends[name] = t.ends
    # some boundary of one tokenizer is not a boundary of another (else the test text is too easy)
    assert any(not is_boundary(ends["g"], e) for e in ends["q"]) or any(not is_boundary(ends["s"], e) for e in ends["q"])
    # the multi-byte characters: no tokenizer boundary splits a character *and* is shared with all
    shared = [e for e in ends["q"] if is_boundary(ends["s"], e) and is_boundary(ends["g"], e)]
    for e in shared:
        text[:e].decode("utf-8")  # a shared boundary never falls inside a UTF-8 character here


def test_complete_utf8_len():
    s = "a日🚀".encode()
    assert complete_utf8_len(s) == len(s)
    assert complete_utf8_len(s[:-1]) == len("a日".encode())
    assert complete_utf8_len(s[:2]) == 1
    assert complete_utf8_len(b"") == 0


def test_partial_and_invalid_utf8_never_become_replacement_characters(tokenizers):
    """llama.cpp tokenizes invalid UTF-8 as U+FFFD; members map such bytes to their own byte tokens."""
    from edge_ensemble.member import Member

    for name in ("qwen", "smollm2", "gemma"):
        model = tokenizers[name]
        member = Member(model, name=name)  # a vocab-only model: the text helpers need no context
        lead = "你".encode()[:1]
        toks = member.tokens_for(lead)
        assert b"".join(model.token_bytes[t] for t in toks) == lead
        assert model.token_bytes[member.first_token(lead)] == lead
        # a stray lead byte followed by ASCII: the text stays exact, no exception
        track = TokenTrack(member.tokens_for, model.token_bytes)
        track.extend("Answer: 你".encode()[:-1])
        track.extend(b" the end")
        assert b"".join(model.token_bytes[t] for t in track.tokens) == track.text


@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_incremental_tokenization_work_stays_flat_as_the_text_grows(tokenizers, name):
    """No whole-text re-tokenization per step: the bytes handed to the tokenizer per extend() do not grow
    with the length of the text (checked by counting, not timing)."""
    model = tokenizers[name]
    sizes: list[int] = []

    def counting(data: bytes) -> list[int]:
        sizes.append(len(data))
        return model.tokenize(data, add_bos=False, special=False)

    track = TokenTrack(counting, model.token_bytes)
    rng = random.Random(7)
    words = ["the", "answer", "is", "42", "because", "日本", "🚀", "x**2", "\n", "  ", "def", "f(x):"]
    for _ in range(3000):
        track.extend((" " + rng.choice(words)).encode())
    assert len(track.text) > 12000
    early, late = max(sizes[100:600]), max(sizes[-500:])
    assert late <= max(2 * early, 64), (early, late)


def test_whole_text_and_char_boundaries():
    from edge_ensemble.alignment import is_char_boundary, is_whole_text

    text = "aé東".encode()  # 1 + 2 + 3 bytes
    assert [is_char_boundary(text, i) for i in range(len(text) + 1)] == [True, True, False, True, False, False, True]
    assert is_whole_text(b"abc") and is_whole_text("東".encode())
    assert not is_whole_text("東".encode()[:2]) and not is_whole_text("東".encode()[1:]) and not is_whole_text(b"")


def test_reliable_view_rules():
    from edge_ensemble.alignment import reliable_view

    text = b"say hello"
    ends = [3, 9]  # the member: "say", " hello"
    assert reliable_view(ends, text, 3, 6)  # drafted " hello": the member's own token, reliable
    assert not reliable_view(ends, text, 3, 1)  # drafted " " while the member writes " hello": unreliable
    assert not reliable_view(ends, text, 5, 4)  # not a boundary of the member
    assert reliable_view([3], b"say", 3, 0)  # end of generation after the text
    jp = "東京".encode()
    assert not reliable_view([1, 3, 6], jp, 1, 2)  # inside a character
    assert not reliable_view([3, 6], jp, 3, 1)  # the drafted piece stops inside a character
    assert reliable_view([3, 6], jp, 3, 3)
    assert reliable_view([3, 6], jp[3:], 3, 3, text_start=3)  # only the draft's bytes given: the same answer
    assert not reliable_view([3, 6], jp[3:], 3, 1, text_start=3)


def test_shared_track_holds_the_drafter_ids():
    from edge_ensemble.alignment import SharedTrack

    table = [b"a", b"bc", b"\xe6", b"\x9d\xb1", b""]
    t = SharedTrack(table)
    toks, ends = t.preview(b"abc", [0, 1])
    assert (toks, ends, t.tokens) == ([0, 1], [1, 3], [])  # a preview commits nothing
    t.extend(b"abc\xe6", [0, 1, 2])
    t.extend(b"\x9d\xb1", [3, 4])  # a mid-character id and an empty control token: kept as given
    assert t.tokens == [0, 1, 2, 3, 4] and t.ends == [1, 3, 4, 6, 6] and t.text == b"abc\xe6\x9d\xb1"
    with pytest.raises(ValueError):
        t.extend(b"xyz", [0])  # ids that do not spell the text are a programming error
