"""The vote policy's decisions on hand-made inputs: answers read from texts, DeepConf's confidences against naive
loops, the stopping rules against numeric integration and brute-force sampling, CISC weights, the filter, the
weighted vote, and consensus over hand-made texts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_ensemble.voting import (
    ANSWER_KINDS,
    NO_TOKENS_CONFIDENCE,
    RunningConfidence,
    beta_leader_probability,
    confidence_weights,
    consensus_index,
    dirichlet_leader_probability,
    escalate,
    extract_answer,
    group_confidence,
    keep_most_confident,
    kill_threshold,
    should_stop,
    tally,
    text_similarity,
    token_confidence,
    top_logprobs,
    unanimous,
    weighted_vote,
)

# ---------------------------------------------------------------- answers


@pytest.mark.parametrize(("text", "answer"), [
    ("She pays 1,000.50 dollars in all.", "1000.5"),
    ("The total is $1,234.", "1234"),
    ("The temperature falls to -7 degrees.", "-7"),
    ("Each costs 0.25, so the answer is 18.00", "18"),
    ("3 + 4 = 7 cookies each, 6 * 7 = 42\n#### 42", "42"),
    ("The answer is 12.\nNote: 3 of the eggs were cracked.", "12"),  # the "answer is" line wins
    ("No number here.", None),
])
def test_number_answers(text: str, answer: str | None) -> None:
    assert extract_answer(text, "number") == answer


@pytest.mark.parametrize(("text", "answer"), [
    ("The answer is (C).", "C"),
    ("Answer: B", "B"),
    ("After weighing the options, the correct choice is D because it conserves energy.", "D"),
    ("Options A and B are wrong; I pick **E**", "E"),
    ("The best fit is option J", "J"),  # up to ten options
    ("Between the two, B", "B"),  # a last standalone letter
    ("I think the planet is too far away.", None),  # the pronoun and the article are no choices
    ("no letter at all", None),
])
def test_choice_answers(text: str, answer: str | None) -> None:
    assert extract_answer(text, "choice") == answer


def test_boxed_answers_keep_nested_braces_and_take_the_last_box() -> None:
    assert extract_answer(r"So $x = \boxed{\frac{1}{2}}$.", "boxed") == r"\frac{1}{2}"
    assert extract_answer(r"First \boxed{3}, but correcting: \boxed{\dfrac{1}{2}}", "boxed") == r"\frac{1}{2}"
    assert extract_answer(r"\boxed{ 10^{\circ} }", "boxed") == "10"  # normalised as MATH answers are compared
    assert extract_answer("The final answer is 5. I hope it is correct.", "boxed") == "5"
    assert extract_answer("no box here", "boxed") is None
    assert extract_answer(r"\boxed{}", "boxed") is None  # an empty box votes for nothing


def test_text_answers_vote_for_nothing_and_unknown_kinds_are_refused() -> None:
    assert extract_answer("The answer is 42.", "text") is None
    assert set(ANSWER_KINDS) == {"number", "choice", "boxed", "text"}
    with pytest.raises(ValueError, match="unknown answer kind 'letters'"):
        extract_answer("A", "letters")


# ---------------------------------------------------------------- confidence


def test_top_logprobs_equals_a_full_log_softmax_sorted() -> None:
    rng = np.random.default_rng(1)
    for size, k in [(151_936, 20), (50, 20), (7, 20), (1000, 1)]:
        logits = (rng.standard_normal(size) * 4).astype(np.float32)
        x = logits.astype(np.float64)
        full = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        want = np.sort(full)[::-1][:k]
        got = top_logprobs(logits, k)
        assert got.shape == want.shape and np.allclose(got, want, atol=1e-4)
        assert np.all(np.diff(got) <= 0)  # largest first
    assert np.allclose(top_logprobs(np.zeros(4, dtype=np.float32), 2), [np.log(0.25)] * 2)
    # the largest logits all where the row's strided pre-cut does not look: still found
    hidden = np.zeros(151_936, dtype=np.float32)
    hidden[1::16][:30] = np.arange(30) + 5.0
    x = hidden.astype(np.float64)
    want = np.sort(x - (x.max() + np.log(np.exp(x - x.max()).sum())))[::-1][:20]
    assert np.allclose(top_logprobs(hidden), want, atol=1e-4)
    flat = top_logprobs(np.ones(151_936, dtype=np.float32))
    assert flat.shape == (20,) and np.allclose(flat, -np.log(151_936), atol=1e-4)


def test_token_confidence_is_minus_the_mean_top_logprob() -> None:
    assert token_confidence(np.array([-0.1, -2.0, -3.9])) == pytest.approx(2.0)
    # k equally likely tokens are the least confident position possible: log k
    assert token_confidence(np.log(np.full(20, 1 / 20))) == pytest.approx(math.log(20))
    peaked = top_logprobs(np.array([30.0] + [0.0] * 999, dtype=np.float32))
    assert token_confidence(peaked) > 25  # one certain token, the other 19 far below
    with pytest.raises(ValueError):
        token_confidence(np.array([]))


def naive_group_confidence(confs: list[float], window: int) -> float:
    if not confs:
        return NO_TOKENS_CONFIDENCE
    if len(confs) <= window:
        return sum(confs) / len(confs)
    return min(sum(confs[i:i + window]) / window for i in range(len(confs) - window + 1))


def test_group_confidence_equals_a_naive_sliding_window_loop() -> None:
    rng = np.random.default_rng(2)
    for n, window in [(300, 16), (50, 50), (51, 50), (10, 64), (1, 1), (200, 1), (0, 8)]:
        confs = list(rng.uniform(3, 20, n))
        assert group_confidence(confs, window) == pytest.approx(naive_group_confidence(confs, window), abs=1e-9)
    # a dip the mean of all hides, the lowest window finds
    confs = [10.0] * 40 + [2.0] * 4 + [10.0] * 40
    assert group_confidence(confs, 4) == pytest.approx(2.0)
    assert group_confidence(confs, 100) == pytest.approx(np.mean(confs))
    with pytest.raises(ValueError):
        group_confidence(confs, 0)


def test_running_confidence_follows_group_confidence_token_by_token() -> None:
    rng = np.random.default_rng(3)
    confs = list(rng.uniform(3, 20, 500))
    for window in (1, 7, 64):
        rc = RunningConfidence(window)
        assert rc.window_mean == rc.lowest == NO_TOKENS_CONFIDENCE and not rc.full
        for i, c in enumerate(confs, 1):
            rc.add(c)
            assert rc.full == (i >= window)
            assert rc.window_mean == pytest.approx(np.mean(confs[max(0, i - window):i]))
            assert rc.lowest == pytest.approx(group_confidence(confs[:i], window))


def test_running_confidence_kills_only_a_full_window_below_the_threshold() -> None:
    rc = RunningConfidence(3)
    for c in (1.0, 1.0):
        rc.add(c)
    assert not rc.below(5.0)  # two tokens: not judged yet
    rc.add(1.0)
    assert rc.below(5.0) and not rc.below(1.0)  # strictly below
    for c in (9.0, 9.0, 9.0):
        rc.add(c)
    assert not rc.below(5.0) and rc.lowest == pytest.approx(1.0)  # recovered, but the trace's score keeps the dip


def test_kill_threshold_is_the_complementary_percentile() -> None:
    warmup = [float(v) for v in range(1, 11)]  # 1..10
    assert kill_threshold(warmup, 100) == 1.0  # keep everything: the minimum
    assert kill_threshold(warmup, 90) == pytest.approx(np.percentile(warmup, 10)) == pytest.approx(1.9)
    assert kill_threshold(warmup, 10) == pytest.approx(9.1)  # DeepConf-low: only the top 10 % survive
    assert kill_threshold([4.0], 50) == 4.0
    for bad in (0, -5, 101):
        with pytest.raises(ValueError):
            kill_threshold(warmup, bad)
    with pytest.raises(ValueError):
        kill_threshold([], 90)


# ---------------------------------------------------------------- stopping rules


def test_unanimous_needs_one_answer_everywhere() -> None:
    assert unanimous(["4", "4", "4"])
    assert unanimous(["4"])
    assert not unanimous(["4", "4", "5"])
    assert not unanimous(["4", None, "4"])
    assert not unanimous([None, None])
    assert not unanimous([])


def beta_by_integration(a: int, b: int) -> float:
    """P(p > 1/2) for p ~ Beta(a+1, b+1), integrating the unnormalised density on a fine grid (trapezoids)."""
    x = np.linspace(0.0, 1.0, 200_001)
    f = x**a * (1 - x) ** b
    areas = (f[1:] + f[:-1]) / 2 * np.diff(x)
    return float(areas[x[:-1] >= 0.5].sum() / areas.sum())


@pytest.mark.parametrize(("counts", "a", "b"), [
    ([0], 0, 0), ([1], 1, 0), ([4], 4, 0), ([3, 1], 3, 1), ([1, 5], 5, 1), ([6, 6], 6, 6), ([10, 2, 1], 10, 2),
    ([30, 7], 30, 7),
])
def test_beta_rule_equals_numeric_integration(counts: list[int], a: int, b: int) -> None:
    assert beta_leader_probability(counts) == pytest.approx(beta_by_integration(a, b), abs=1e-6)


def test_beta_rule_known_values() -> None:
    assert beta_leader_probability([]) == 0.5  # a uniform prior
    assert beta_leader_probability([4]) == 31 / 32  # the first unanimous count past 0.95
    assert beta_leader_probability([3]) == 15 / 16
    assert beta_leader_probability([5, 5]) == 0.5


def test_dirichlet_with_two_answers_agrees_with_beta() -> None:
    for counts in ([3], [4, 1], [5, 3], [8, 2], [2, 2]):
        mc = dirichlet_leader_probability(counts, draws=20_000)
        assert mc == pytest.approx(beta_leader_probability(counts), abs=0.015)
    assert dirichlet_leader_probability([4, 1]) == dirichlet_leader_probability([1, 4])  # order does not matter
    assert dirichlet_leader_probability([5, 2, 1], seed=7) == dirichlet_leader_probability([5, 2, 1], seed=7)


@pytest.mark.parametrize("counts", [[5, 2, 1], [3, 3, 1], [6, 1, 1, 1], [9, 4, 2]])
def test_dirichlet_against_a_brute_force_sample(counts: list[int]) -> None:
    shares = np.random.default_rng(123).dirichlet(np.asarray(counts, dtype=float) + 1, size=200_000)
    leader = int(np.argmax(counts))
    brute = float(np.mean(np.argmax(shares, axis=1) == leader))
    assert dirichlet_leader_probability(counts) == pytest.approx(brute, abs=0.025)


def test_dirichlet_looks_at_the_five_most_common_answers() -> None:
    many = [6, 1, 1, 1, 1, 1, 1, 1]
    assert dirichlet_leader_probability(many) == dirichlet_leader_probability(many[:5])
    assert dirichlet_leader_probability(many, top=8) < dirichlet_leader_probability(many)


def test_should_stop_by_rule() -> None:
    assert should_stop("unanimous", ["3", "4", "4", "4"], ["4", "4", "4"], 0.95)
    assert not should_stop("unanimous", ["4", "4", "4", "4"], ["4", None, "4"], 0.95)
    assert not should_stop("none", ["4"] * 40, ["4"] * 5, 0.0)
    # beta: 4 agreeing answers reach 31/32; 3 do not (15/16 < 0.95); None answers count for nothing
    assert should_stop("beta", ["4"] * 4, ["4"], 0.95)
    assert not should_stop("beta", ["4"] * 3 + [None] * 5, [None], 0.95)
    assert not should_stop("beta", [None] * 8, [None] * 4, 0.0)  # no answer at all: never stop
    assert should_stop("beta", ["4"] * 8 + ["5"], ["4"], 0.95) == (beta_leader_probability([8, 1]) >= 0.95)
    three = ["4"] * 9 + ["5", "6"]  # three answers: the Dirichlet rule decides
    p = dirichlet_leader_probability([9, 1, 1])
    assert should_stop("beta", three, ["4"], p) and not should_stop("beta", three, ["4"], p + 0.001)
    with pytest.raises(ValueError, match="unknown stopping rule"):
        should_stop("majority", ["4"], ["4"], 0.9)


def test_escalate_on_disagreement_or_low_confidence() -> None:
    assert not escalate(["4", "4", "4"], [12.0, 11.0, 13.0], 10.0, "unanimous", 0.95)
    assert escalate(["4", "4", "5"], [12.0, 11.0, 13.0], 10.0, "unanimous", 0.95)  # disagrees
    assert escalate(["4", "4", "4"], [9.0, 9.5, 10.0], 10.0, "unanimous", 0.95)  # agrees, but unsure
    assert escalate([None, None], [15.0, 15.0], 10.0, "unanimous", 0.95)  # no answer settles nothing
    assert escalate(["4", "4", "4"], [12.0] * 3, 10.0, "none", 0.95)  # "never stop" never settles
    assert escalate(["4", "4", "4"], [], 10.0, "unanimous", 0.95)  # no confidence to check


# ---------------------------------------------------------------- weighting and filtering


def test_confidence_weights_are_a_softmax_by_hand() -> None:
    w = confidence_weights([1.0, 2.0, 3.0], 1.0)
    e = np.exp([1.0, 2.0, 3.0])
    assert np.allclose(w, e / e.sum())
    w = confidence_weights([10.0, 12.0], 2.0)
    assert np.allclose(w, [1 / (1 + math.e), math.e / (1 + math.e)])
    assert np.allclose(confidence_weights([1000.0, 1001.0], 1.0), confidence_weights([0.0, 1.0], 1.0))  # stable
    assert np.allclose(confidence_weights([5.0, 9.0, 9.0], 1e-6), [0.0, 0.5, 0.5])  # T -> 0: the most confident
    assert np.allclose(confidence_weights([5.0, 9.0, 7.0], 1e9), [1 / 3] * 3, atol=1e-6)  # T -> inf: equal
    assert confidence_weights([], 1.0).size == 0
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError):
            confidence_weights([1.0], bad)


def test_keep_most_confident_edges() -> None:
    confs = [5.0, 9.0, 1.0, 7.0, 3.0]
    assert keep_most_confident(confs, 100).all()
    assert keep_most_confident(confs, 0.001).tolist() == [False, True, False, False, False]  # at least one
    assert keep_most_confident(confs, 40).tolist() == [False, True, False, True, False]
    assert keep_most_confident(confs, 50).tolist() == [True, True, False, True, False]  # ceil(2.5) = 3
    assert keep_most_confident([2.0, 2.0, 1.0], 10).tolist() == [True, True, False]  # a tie with the last is kept
    assert keep_most_confident([float(i) for i in range(10)], 70).sum() == 7  # 10 * 0.7 is not rounded up to 8
    with pytest.raises(ValueError):
        keep_most_confident(confs, 0)


def test_weighted_vote_weights_ties_and_none() -> None:
    answers = ["4", "5", "5", "4", None]
    # majority weights: 2 against 2, the tie goes to the answer holding the best confidence (sample 1's 9.0)
    assert weighted_vote(answers, [1, 1, 1, 1, 1], [3.0, 9.0, 2.0, 8.0, 99.0]) == 1
    assert weighted_vote(answers, [1, 1, 1, 1, 1], [3.0, 2.0, 2.5, 9.0, 99.0]) == 3
    # weights decide before tiebreaks; within the winner, the most confident sample
    assert weighted_vote(answers, [0.4, 0.1, 0.1, 0.3, 5.0], [1.0, 9.0, 9.0, 2.0, 9.0]) == 3
    # equal tiebreaks inside the winner: the first sample
    assert weighted_vote(["7", "7"], [1, 1], [1.0, 1.0]) == 0
    assert weighted_vote([None, "8", None], [9, 1, 9], [9.0, 0.0, 9.0]) == 1  # None never wins
    assert weighted_vote([None, None], [1, 1], [1.0, 2.0]) is None
    with pytest.raises(ValueError):
        weighted_vote(["4"], [1, 1], [1.0])


def test_tally_for_display() -> None:
    rows = tally(["4", "5", None, "5"], [0.5, 0.2, 9.0, 0.2])
    assert [(t.answer, t.votes, t.members) for t in rows] == [("4", 1, [0]), ("5", 2, [1, 3])]
    assert rows[1].weight == pytest.approx(0.4)


# ---------------------------------------------------------------- free text


def test_text_similarity_properties() -> None:
    a, b = "The cat sat on the mat.", "A cat was sitting on a mat."
    assert text_similarity(a, a) == 1.0
    assert text_similarity(a, b) == text_similarity(b, a)
    assert 0 < text_similarity(a, b) < 1
    assert text_similarity("abc", "xyz") == 0.0
    assert text_similarity("", "") == 1.0 and text_similarity("", "abc") == 0.0
    assert text_similarity("ab c", "a bc") == 1.0  # whitespace is ignored, as in chrF
    assert text_similarity("x", "xyz") > 0  # orders only one text has do not count
    closer = text_similarity("the answer is 42", "the answer is 43")
    assert closer > text_similarity("the answer is 42", "we cannot know")


@pytest.mark.parametrize(("texts", "odd"), [
    (["Paris is the capital of France.", "The capital of France is Paris.", "Bananas are yellow fruit.",
      "France's capital city is Paris."], 2),
    (["def add(a, b):\n    return a + b", "def add(x, y):\n    return x + y", "SELECT * FROM users;",
      "def add(a, b):\n    return b + a"], 2),
    (["东京是日本的首都。", "日本的首都是东京。", "首都东京位于日本。", "今天下雨了，我没带伞。"], 3),
    (["🍎🍌🍇 fruit salad 🍎", "🍎🍇🍌 fruit salad", "🚗🚕🚙 traffic jam", "fruit salad 🍌🍎🍇"], 2),
])
def test_consensus_never_chooses_the_odd_one_out(texts: list[str], odd: int) -> None:
    chosen = consensus_index(texts)
    assert chosen != odd
    # the chosen text is as close to the others as any text is (the mean of its similarities, by hand)
    means = [np.mean([text_similarity(texts[i], t) for j, t in enumerate(texts) if j != i]) for i in range(4)]
    assert means[chosen] == pytest.approx(max(means), abs=1e-12)


def test_consensus_ties_weights_and_edges() -> None:
    assert consensus_index(["same answer"] * 4) == 0
    assert consensus_index(["only one"]) == 0
    assert consensus_index(["alpha beta", "gamma delta"]) == 0  # two texts always tie
    texts = ["the answer is 12", "the answer is 12.", "the result is 7", "the result is 7!"]
    # equal weights: a two-against-two tie, the lowest index of the best pair wins
    assert consensus_index(texts) in (0, 1)
    # the second pair's members trusted more: its own members now agree with heavier samples
    assert consensus_index(texts, [0.1, 0.1, 1.0, 1.0]) in (2, 3)
    with pytest.raises(ValueError):
        consensus_index(texts, [1.0, 1.0])
    with pytest.raises(ValueError):
        consensus_index([])
