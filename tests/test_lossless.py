"""Lossless where it must be: a model alone, and a model ensembled with itself, write exactly what
llama-cpp-python's own greedy generation writes — in English, code, CJK and emoji — with nothing overridden;
members that share a tokenizer share token ids (no re-tokenization)."""

from __future__ import annotations

import pytest

import llama_cpp
from edge_ensemble.api import Ensemble, EnsembleConfig
from edge_ensemble.chat import render_plain
from edge_ensemble.eval.languages import NON_ENGLISH, longest_run
from edge_ensemble.member import Member
from edge_ensemble.runtime import common_prefix_len

MAX_TOKENS = 64
N_CTX = 1024

PROMPTS = {
    "english": "Explain in two sentences why the sky is blue.",
    "paragraphs": "Write two short paragraphs about rivers, with a blank line between them.",
    "python": "Write a Python function that returns the n-th Fibonacci number, with a docstring and a loop.",
    "japanese": "東京は日本の首都で、",
    "chinese": "请用两句话介绍一下长城。",
    "korean": "서울에 대해 두 문장으로 설명해 주세요.",
    "emoji": "Describe a sunny day at the beach using lots of emoji 🌞🏖️ in every sentence.",
    "numbered": "Give a numbered list of five fruits and one fact about each.",
}

MODELS = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"]


def _visible(text: str) -> str:
    """Text as both sides show it: llama-cpp-python drops bytes that are not (yet) valid UTF-8, we replace
    them with U+FFFD."""
    return text.replace("\ufffd", "")


def _same_answer(result, ref_text: str, ref_tokens: int) -> bool:
    """Our answer equals llama-cpp-python's. When max_tokens ends inside a character, llama-cpp-python goes
    on for up to 3 tokens to finish it (and counts them): then ours must be its prefix."""
    ours = _visible(result.text)
    if result.finish_reason == "stop":  # an ensembled end-of-generation counts as a token in our stats
        return ours == ref_text and ref_tokens in (result.stats.tokens, result.stats.tokens - 1)
    if ref_tokens == result.stats.tokens:
        return ours == ref_text
    return result.stats.tokens == MAX_TOKENS and 0 < ref_tokens - MAX_TOKENS <= 3 and ref_text.startswith(ours)


class Reference:
    """llama-cpp-python's own greedy generation, every prompt prefilled from scratch (as we do below)."""

    def __init__(self, path, chat: bool) -> None:
        self.llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, verbose=False)
        self.chat = chat

    def __call__(self, messages) -> tuple[str, int]:
        self.llm.reset()
        if self.chat:
            out = self.llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=MAX_TOKENS)
            return out["choices"][0]["message"]["content"], out["usage"]["completion_tokens"]
        out = self.llm.create_completion(render_plain(messages), temperature=0.0, max_tokens=MAX_TOKENS)
        return out["choices"][0]["text"], out["usage"]["completion_tokens"]

    def close(self) -> None:
        self.llm.close()


@pytest.fixture(scope="module", params=MODELS)
def model_and_reference(request, real_models):
    path = real_models(request.param)
    ref = Reference(path, chat=request.param != "gemma-3-270m")
    want = {name: ref([{"role": "user", "content": p}]) for name, p in PROMPTS.items()}
    ref.close()
    return request.param, path, want


def _cfg(**kw) -> EnsembleConfig:
    return EnsembleConfig(n_ctx=N_CTX, check_memory=False, **kw)


@pytest.mark.parametrize(
    "members,policy,gate",
    [(1, "single", 0.5), (2, "safe", 0.5), (2, "safe", None), (2, "every-token", 0.5)],
    ids=["single", "self-safe-gated", "self-safe-faithful", "self-every-token"],
)
def test_alone_and_with_itself_equals_llama_cpp_python(model_and_reference, members, policy, gate):
    key, path, want = model_and_reference
    failures = []
    with Ensemble([path] * members, config=_cfg(policy=policy, gate=gate)) as ens:
        for name, prompt in PROMPTS.items():
            ens.reset_cache()  # prefill from scratch, as the reference does
            result = ens.generate(prompt, max_tokens=MAX_TOKENS)
            if not _same_answer(result, *want[name]):
                failures.append(f"{name}: {result.text!r} != {want[name][0]!r}")
            assert result.stats.overridden_tokens == 0, f"{key} {policy} {name}: {result.stats.overridden_tokens} overridden"
            if policy == "every-token":
                assert result.stats.ensembled_tokens == result.stats.tokens
    assert not failures, f"{key} {policy}: " + "; ".join(failures)


def test_same_tokenizer_is_recognised_and_different_is_not(real_models):
    from edge_ensemble.runtime import LoadOptions, Model

    fingerprints = {}
    for key in ["qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct", "gemma-3-270m"]:
        with Model(real_models(key), LoadOptions(vocab_only=True)) as m:
            fingerprints[key] = m.tokenizer_fingerprint
    assert len(set(fingerprints.values())) == 3
    with Model(real_models("qwen2.5-coder-0.5b-instruct"), LoadOptions(vocab_only=True)) as m:
        assert m.tokenizer_fingerprint == fingerprints["qwen2.5-coder-0.5b-instruct"]  # stable across loads


@pytest.fixture
def retokenizations(monkeypatch):
    """Counts calls of Member.tokens_for, the one way a member re-tokenizes generated text."""
    calls = {"n": 0}
    real = Member.tokens_for

    def counting(self, data):
        calls["n"] += 1
        return real(self, data)

    monkeypatch.setattr(Member, "tokens_for", counting)
    return calls


@pytest.mark.parametrize("policy,gate", [("safe", None), ("safe", 0.5), ("every-token", 0.5)])
def test_shared_tokenizer_members_follow_drafter_ids_without_retokenizing(tiny_bpe, tiny_bpe_b, retokenizations, policy, gate,
                                                                          lanes):
    """Two different models with one tokenizer (the `coder` pair's situation): the verifier never
    re-tokenizes generated text and its cache holds exactly the drafter's tokens after its prompt."""
    with Ensemble([tiny_bpe, tiny_bpe_b], config=_cfg(policy=policy, gate=gate)) as ens:
        result = ens.generate("Hello there, how are you today?", max_tokens=60)
        drafter, verifier = ens._members
        assert result.stats.shared_tokenizer == {drafter.name: True, verifier.name: True}
        assert result.stats.tokens > 20
        assert result.stats.ensembled_tokens > 0  # the two disagree: the union really ran
        assert retokenizations["n"] == 0
        track = lanes.last(verifier).track.tokens  # the verifier's view: the drafter's accepted ids
        assert drafter.model.detokenize(track) == result.text.encode()
        drafted = drafter.model.tokens()[len(lanes.last(drafter).prompt):]  # may still hold a rejected draft at its end
        assert common_prefix_len(drafted, track) >= len(track) - 6
        cached = verifier.model.tokens()[len(lanes.last(verifier).prompt):]
        assert len(cached) > 0  # a lagging verifier holds a prefix of them (plus a rejected draft's tail, maybe)
        assert common_prefix_len(cached, track) >= min(len(cached), len(track)) - 6


def test_coder_pair_runs_on_shared_ids(real_models, retokenizations, lanes):
    """The real `coder` pair (Qwen2.5-Coder 1.5B drafts, 0.5B verifies): one tokenizer, so the verifier never
    re-tokenizes the generated text and its cache holds exactly the drafter's tokens."""
    paths = [real_models("qwen2.5-coder-1.5b-instruct"), real_models("qwen2.5-coder-0.5b-instruct")]
    with Ensemble(paths, config=_cfg(policy="safe", gate=None)) as ens:  # faithful: the verifier reads every chunk
        result = ens.generate("Write a Python function that checks whether a number is prime.", max_tokens=48)
        drafter, verifier = ens._members
        assert drafter.tokenizer_id == verifier.tokenizer_id
        assert all(result.stats.shared_tokenizer.values())
        assert result.stats.verification_calls > 0 and retokenizations["n"] == 0
        track = lanes.last(verifier).track.tokens
        assert drafter.model.detokenize(track) == result.text.encode()
        cached = verifier.model.tokens()[len(lanes.last(verifier).prompt):]
        # it may still hold the draft tokens after the last override: the drafter's ids all the same
        assert common_prefix_len(cached, track) >= len(track) - 6


def test_longest_run_counts_repeats():
    assert longest_run("abbbc") == 3 and longest_run("") == 0 and longest_run("づづづづ") == 4
    assert longest_run("ハンハンハンハン!") == 4


@pytest.mark.parametrize("preset", ["tiny", "trio"])
def test_cross_tokenizer_non_english_never_degenerates(preset):
    """The tiny pair (Qwen drafts, SmolLM2 verifies) and trio on 8 non-English prompts: no answer falls into
    a character loop unless the drafter alone does on the same prompt."""
    from edge_ensemble.sources import Catalog

    members = list(Catalog.load().preset(preset).members)
    bad = []
    with Ensemble(members, config=_cfg(policy="safe")) as ens:
        for name, prompt in NON_ENGLISH.items():
            ens.reset_cache()
            alone = ens.generate(prompt, max_tokens=MAX_TOKENS, policy="single")
            ens.reset_cache()
            together = ens.generate(prompt, max_tokens=MAX_TOKENS)
            if longest_run(together.text) >= 8 and longest_run(alone.text) < 8:
                bad.append(f"{name}: {together.text!r} (drafter alone: {alone.text!r})")
    assert not bad, "; ".join(bad)
