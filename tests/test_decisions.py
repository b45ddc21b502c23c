"""The pure decisions on hand-made arrays: consensus, union with missing candidates, sharpening, gate."""

from __future__ import annotations

import numpy as np
import pytest

from edge_ensemble.decisions import (
    EOG,
    Gate,
    MemberView,
    Sampling,
    consensus,
    entropy,
    filter_probs,
    sample_token,
    sharpen_prefix_mass,
    softmax,
    speculative_accept_probability,
    top_k,
    union_distribution,
)


def test_softmax_and_entropy():
    p = softmax(np.array([0.0, 0.0, 0.0, 0.0], dtype=np.float32))
    assert np.allclose(p, 0.25)
    assert entropy(p) == pytest.approx(np.log(4))
    assert entropy(np.array([1.0, 0.0, 0.0])) == 0.0
    # temperature sharpens
    assert softmax(np.array([1.0, 0.0]), 0.5)[0] > softmax(np.array([1.0, 0.0]))[0]


def test_top_k_order_and_ids():
    probs = np.array([0.1, 0.4, 0.05, 0.3, 0.15])
    ids, p = top_k(probs, 3)
    assert ids.tolist() == [1, 3, 4]
    assert p.tolist() == [0.4, 0.3, 0.15]
    ids, _ = top_k(probs, 10)  # k larger than the vocabulary
    assert sorted(ids.tolist()) == [0, 1, 2, 3, 4]


def test_consensus_unanimous_or_majority_mass():
    assert consensus([0.3, 0.2], [True, True])  # unanimous argmax, low mass
    assert consensus([0.9, 0.2], [True, False])  # mean 0.55 > 0.5
    assert not consensus([0.6, 0.4], [True, False])  # mean exactly 0.5 is not > 0.5
    assert not consensus([0.45, 0.3], [True, False])
    # weights move the mean: drafter twice as heavy -> (2*0.6 + 0.4)/3 = 0.533
    assert consensus([0.6, 0.4], [True, False], weights=[2, 1])


def test_speculative_accept_probability():
    assert speculative_accept_probability(0.5, 0.25) == 1.0
    assert speculative_accept_probability(0.1, 0.4) == pytest.approx(0.25)
    assert speculative_accept_probability(0.0, 0.0) == 0.0


def _view(top, full, weight=1.0):
    return MemberView(top=top, prob_of=lambda k: full.get(k, 0.0), weight=weight)


def test_union_fills_missing_candidates_with_members_own_probability():
    # drafter (SentencePiece-like: ' the' as one piece) and verifier (splits differently)
    a = _view({b" the": 0.6, b" a": 0.3}, {b" the": 0.6, b" a": 0.3, b" an": 0.01})
    b = _view({b" an": 0.5, b" the": 0.2}, {b" an": 0.5, b" the": 0.2, b" a": 0.1})
    keys, p, q = union_distribution([a, b])
    assert keys == [b" the", b" a", b" an"]
    # member b did not rank ' a' in its top-k: its probability comes from prob_of (0.1)
    assert q[1, 1] == pytest.approx(0.1 / 0.8)
    expected = 0.5 * np.array([0.6, 0.3, 0.01]) / 0.91 + 0.5 * np.array([0.2, 0.1, 0.5]) / 0.8
    assert np.allclose(p, expected / expected.sum())
    assert keys[int(np.argmax(p))] == b" the"


def test_union_eog_is_one_shared_key_and_empty_pieces_are_dropped():
    a = _view({EOG: 0.7, b"Hi": 0.2, b"": 0.1}, {EOG: 0.7, b"Hi": 0.2})
    b = _view({EOG: 0.4, b"Hello": 0.5}, {EOG: 0.4, b"Hello": 0.5, b"Hi": 0.05})
    keys, p, _ = union_distribution([a, b])
    assert b"" not in keys
    assert keys.count(EOG) == 1
    assert keys[int(np.argmax(p))] == EOG


def test_union_weights_and_geometric_mean():
    a = _view({b"x": 0.9, b"y": 0.1}, {b"x": 0.9, b"y": 0.1})
    b = _view({b"y": 0.8, b"x": 0.2}, {b"x": 0.2, b"y": 0.8})
    keys, p, _ = union_distribution([a, b])
    assert p[keys.index(b"x")] == pytest.approx(0.55)
    keys, p, _ = union_distribution([_view(a.top, {b"x": 0.9, b"y": 0.1}, 1.0), _view(b.top, {b"x": 0.2, b"y": 0.8}, 3.0)])
    assert keys[int(np.argmax(p))] == b"y"
    keys, pg, _ = union_distribution([a, b], geometric=True)
    gx, gy = np.sqrt(0.9 * 0.2), np.sqrt(0.1 * 0.8)
    assert pg[keys.index(b"x")] == pytest.approx(gx / (gx + gy))


def test_sharpen_prefix_mass_moves_continuations_to_their_prefix():
    keys = [b" in", b" int", b" into", b" on", b" "]
    p = np.array([0.3, 0.1, 0.1, 0.35, 0.15])
    out = sharpen_prefix_mass(keys, p, drafter_top={b" in": 0.3, b" on": 0.3})
    # ' in' gains ' int' and ' into': 0.5 before renormalisation
    assert out[0] == pytest.approx(0.5 / 1.2)
    assert keys[int(np.argmax(out))] == b" in"
    # the lone space is excluded as a prefix
    assert out[4] == pytest.approx(0.15 / 1.2)


def test_sharpen_only_below_half_and_only_drafter_candidates_above_lambda():
    keys = [b"a", b"ab"]
    assert np.allclose(sharpen_prefix_mass(keys, np.array([0.6, 0.4]), {b"a": 0.6}), [0.6, 0.4])
    p = np.array([0.45, 0.3, 0.25])
    keys = [b"x", b"a", b"ab"]
    assert np.allclose(sharpen_prefix_mass(keys, p, {b"x": 0.45}), p)  # 'a' not in drafter's top-k
    p = np.array([0.45, 0.05, 0.25, 0.25])
    keys = [b"x", b"a", b"ab", b"y"]
    assert np.allclose(sharpen_prefix_mass(keys, p, {b"x": 0.4, b"a": 0.05}, lam=0.1), p)  # below lambda


def test_gate():
    g = Gate(min_top1=0.5)
    assert g.confident(0.9, 0.1) and not g.confident(0.4, 0.1)
    g = Gate(min_top1=0.5, max_entropy=1.0)
    assert not g.confident(0.9, 1.5)
    off = Gate(None)
    assert not off.enabled and not off.confident(1.0, 0.0)


def test_filter_probs_top_k_top_p():
    p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    assert np.allclose(filter_probs(p, top_k_=2), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    out = filter_probs(p, top_p=0.8)  # 0.5 + 0.2 < 0.8 -> keep the third as well
    assert np.count_nonzero(out) == 3


def test_sampling_is_deterministic_for_a_seed():
    logits = np.log(np.array([0.2, 0.3, 0.5]))
    s = Sampling(temperature=1.0, seed=7)
    a = [sample_token(logits, s, np.random.default_rng(7))[0] for _ in range(1)]
    b = [sample_token(logits, s, np.random.default_rng(7))[0] for _ in range(1)]
    assert a == b
    assert sample_token(logits, Sampling(), np.random.default_rng(0))[0] == 2  # greedy


def test_choose_keeps_the_drafted_candidate_within_the_tie_tolerance():
    from edge_ensemble.decisions import choose

    keys = [b"a", b"b", b"c"]
    p = np.array([0.38, 0.40, 0.22])
    assert choose(keys, p) == 1  # plain argmax
    assert choose(keys, p, prefer=b"a", tolerance=0.1) == 0  # 0.38 >= 0.9 * 0.40: the drafted one stands
    assert choose(keys, p, prefer=b"c", tolerance=0.1) == 1  # 0.22 is far below: overridden
    assert choose(keys, p, prefer=b"zzz", tolerance=0.1) == 1  # not a candidate at all
    assert choose([1, 2], np.array([0.5, 0.5]), prefer=2, tolerance=0.0) == 1  # token-id keys, exact tie


def test_sharpening_never_lets_a_byte_fragment_absorb_whole_characters():
    frag, ka, ko = b" \xe0\xa4", b" \xe0\xa4\x95", b" \xe0\xa4\xb9"  # " " + half of a Devanagari letter
    keys = [frag, ka, ko, b" the"]
    p = np.array([0.2, 0.3, 0.25, 0.25])
    out = sharpen_prefix_mass(keys, p, {frag: 0.2, ka: 0.3}, 0.1)
    assert np.allclose(out, p)  # nothing moved: the fragment is not a prefix that stands for them
    # token-id keys sharpen through their texts
    out = sharpen_prefix_mass([7, 8], np.array([0.45, 0.4]), {7: 0.45}, 0.1, texts=[b" th", b" the"])
    assert out[0] == pytest.approx(0.85 / 1.25)  # " th" gains the mass of " the", which keeps its own
