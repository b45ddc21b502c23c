"""SAFE's verification walk and every-token's mid-character path, position by position, on scripted backends.

Each test scripts the members' distributions (keyed by the text generated so far) and checks what the walk
did: accepted, confirmed, overridden, refused at a boundary, ended. Every SAFE test runs with both kinds of
distribution — a full logits row and top-n only — because every decision must work with either.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_ensemble.decisions import EOG, Sampling
from edge_ensemble.dist import FullDist, TopDist
from edge_ensemble.engine import GenerationOptions, generate_events
from edge_ensemble.member import Member

from fake_backend import FakeBackend

ABC = [b"A", b"B", b"C", b" "]
ASK = [{"role": "user", "content": "q"}]


def run(members, *, policy="safe", gate=None, tie=0.1, draft_len=5, max_tokens=20, weights=None, sampling=None):
    cfg = dict(gate=gate, tie_tolerance=tie, draft_len=draft_len, weights=weights)
    opts = GenerationOptions(max_tokens=max_tokens, sampling=sampling or Sampling())
    events = list(generate_events(members, ASK, policy=policy, policy_options=cfg, options=opts))
    return events[-1].result


def pair(drafter_script, verifier_script, kind, pieces=ABC, verifier_pieces=None):
    d = FakeBackend(pieces, drafter_script, name="drafter", kind=kind)
    v = FakeBackend(verifier_pieces or pieces, verifier_script, name="verifier", kind=kind)
    return [Member(d), Member(v)], d, v


def kinds(result):
    return [(s.kind, s.text, s.winner) for s in result.provenance]


DRAFTER = {b"": {b"A": 0.9, b"B": 0.1}, b"A": {b"B": 0.9, b"C": 0.1}, b"AB": {EOG: 0.9, b"C": 0.1}}


@pytest.fixture(params=["full", "top"])
def kind(request):
    return request.param


def test_unanimous_drafts_are_accepted_without_ensembling(kind):
    members, _, v = pair(DRAFTER, DRAFTER, kind)
    r = run(members)
    assert r.text == "AB" and r.finish_reason == "stop"
    s = r.stats
    assert s.ensembled_tokens == 0 and s.overridden_tokens == 0
    assert s.verification_calls == 1 and v.feeds  # faithful: the verifier scored the whole draft in one call
    assert s.draft_acceptance_rate == 1.0
    assert kinds(r) == [("draft", "AB", None)]


def test_majority_mass_accepts_a_token_the_verifier_does_not_rank_first(kind):
    # mean probability of A: (0.9 + 0.4) / 2 = 0.65 > 0.5 -> it is the ensemble argmax anyway
    verifier = {**DRAFTER, b"": {b"B": 0.6, b"A": 0.4}}
    members, _, _ = pair(DRAFTER, verifier, kind)
    r = run(members)
    assert r.text == "AB" and r.stats.ensembled_tokens == 0


def test_override_replaces_the_draft_and_drops_its_rest(kind):
    # mean of A = 0.45: no consensus; the union makes B likelier (0.55), past the tie tolerance
    verifier = {b"": {b"B": 1.0}, b"B": {b"C": 1.0}, b"BC": {EOG: 1.0}}
    drafter = {**DRAFTER, b"B": {b"C": 0.8, b"A": 0.2}, b"BC": {EOG: 1.0}}
    members, d, _ = pair(drafter, verifier, kind)
    r = run(members)
    assert r.text == "BC"
    assert r.stats.overridden_tokens == 1
    assert kinds(r)[0] == ("ensemble", "B", "verifier")
    # the drafter's cache was rolled back: it holds the ensembled B, not its own A
    assert d.cached(0)[1] == d.tokenize(b"B")[0]


def test_tie_tolerance_counts_a_near_tie_as_agreement(kind):
    drafter = {b"": {b"A": 0.45, b"C": 0.40, b"B": 0.15}, b"A": {EOG: 1.0}}
    verifier = {b"": {b"B": 0.50, b"A": 0.46, b"C": 0.04}, b"A": {EOG: 1.0}}
    members, _, _ = pair(drafter, verifier, kind)
    near = run(members, tie=0.1)  # 0.46 >= 0.9 * 0.50: the verifier agrees -> unanimous
    assert near.text == "A" and near.stats.ensembled_tokens == 0
    members, _, _ = pair(drafter, verifier, kind)
    strict = run(members, tie=0.0)  # no tolerance: the union decides, and confirms A (0.455 vs 0.325)
    assert strict.text == "A"
    assert strict.stats.ensembled_tokens == 1 and strict.stats.overridden_tokens == 0
    # confirmed: provenance says the ensemble chose it (the winner is the member that liked it most)
    assert kinds(strict)[0] == ("ensemble", "A", "verifier")


def test_confirmed_token_keeps_the_walk_going(kind):
    # position 0 is confirmed by the union; position 1 is then checked too and overridden
    drafter = {b"": {b"A": 0.45, b"C": 0.40, b"B": 0.15}, b"A": {b"B": 0.6, b"C": 0.4},
               b"AC": {EOG: 1.0}, b"AB": {EOG: 1.0}}
    verifier = {b"": {b"B": 0.50, b"A": 0.46, b"C": 0.04}, b"A": {b"C": 0.99, b"B": 0.01}, b"AC": {EOG: 1.0}}
    members, _, _ = pair(drafter, verifier, kind)
    r = run(members, tie=0.0)
    assert r.text == "AC"
    assert r.stats.ensembled_tokens == 2 and r.stats.overridden_tokens == 1
    assert kinds(r)[:2] == [("ensemble", "A", "verifier"), ("ensemble", "C", "verifier")]


def test_end_of_generation_chosen_by_the_ensemble(kind):
    drafter = {b"": {b"A": 0.9, b"B": 0.1}, b"A": {b"B": 0.6, EOG: 0.4}}
    verifier = {b"": {b"A": 1.0}, b"A": {EOG: 0.95, b"B": 0.05}}
    members, _, _ = pair(drafter, verifier, kind)
    r = run(members)
    assert r.text == "A" and r.finish_reason == "stop"
    assert r.stats.overridden_tokens == 1
    assert kinds(r)[-1] == ("ensemble", "", "verifier")


def test_boundary_refusal_leaves_positions_a_verifier_cannot_see_to_the_drafter(kind):
    # The drafter writes "a" + "bc"; the verifier's tokenizer spells "abc" as "ab" + "c": neither drafted
    # piece starts and ends on its token boundaries, so it is never asked about them (however much it
    # disagrees); it is asked only about the end, where the two share a boundary.
    drafter = {b"": {b"a": 0.6, b"c": 0.4}, b"a": {b"bc": 0.6, b"c": 0.4}, b"abc": {EOG: 1.0}}
    verifier = {b"": {b"c": 1.0}, b"ab": {b"b": 1.0}}
    members, _, v = pair(drafter, verifier, kind, pieces=[b"a", b"bc", b"c"], verifier_pieces=[b"ab", b"c", b"a", b"b"])
    r = run(members)
    assert r.text == "abc"
    assert r.stats.unreliable_positions == 2 and r.stats.verification_calls == 1
    assert r.stats.shared_tokenizer == {"drafter": True, "verifier": False}
    assert [f[2] for f in v.feeds if f[2]] == [(2,)]  # the row after its "ab", "c": the end, nothing else


def test_gate_skips_confident_drafts_and_stops_drafting_at_the_unsure_one(kind):
    drafter = {b"": {b"A": 0.9, b"B": 0.1}, b"A": {b"B": 0.4, b"C": 0.35, b" ": 0.25},
               b"AB": {EOG: 0.9, b"C": 0.1}, b"AC": {EOG: 1.0}}
    verifier = {b"": {b"C": 1.0}, b"A": {b"C": 0.9, b"B": 0.1}, b"AC": {EOG: 1.0}}
    members, d, v = pair(drafter, verifier, kind)
    r = run(members, gate=0.5)
    # "A" (0.9) is confident: the verifier's objection there is never heard; "B" (0.4) is checked, overridden.
    assert r.text == "AC"
    assert r.stats.verification_calls == 1 and r.stats.overridden_tokens == 1
    assert kinds(r)[0] == ("draft", "A", None)
    # the first draft stopped at the unsure token: two drafted, nothing decoded after the unsure one
    assert [f[2] for f in v.feeds if f[2]] == [(1,)]  # only the row before the unsure token was read


def test_weights_let_a_strong_drafter_outvote_a_verifier(kind):
    drafter = {b"": {b"A": 0.7, b"B": 0.3}, b"A": {EOG: 1.0}, b"B": {EOG: 1.0}}
    verifier = {b"": {b"B": 1.0}, b"A": {EOG: 1.0}, b"B": {EOG: 1.0}}
    members, _, _ = pair(drafter, verifier, kind)
    assert run(members).text == "B"  # equal weights: B = 0.65
    members, _, _ = pair(drafter, verifier, kind)
    weighted = run(members, weights=(3.0, 1.0))  # 3:1 -> A's weighted mean is 0.525: a majority
    assert weighted.text == "A" and weighted.stats.ensembled_tokens == 0


def test_every_token_lets_the_primary_finish_a_character_alone(kind):
    # "é" is two byte tokens for the primary; the other member spells it as one token and cannot be asked
    # about a text that ends between the two bytes, so the primary writes the second byte alone.
    primary = {b"": {b"\xc3": 0.9, b"x": 0.1}, b"\xc3": {b"\xa9": 0.9, b"x": 0.1}, "é".encode(): {EOG: 1.0}}
    other = {b"": {b"\xc3": 0.8, b"x": 0.2}, "é".encode(): {EOG: 1.0}}
    members, p, o = pair(primary, other, kind, pieces=[b"\xc3", b"\xa9", b"x"],
                         verifier_pieces=["é".encode(), b"x", b"\xc3", b"\xa9"])
    r = run(members, policy="every-token")
    assert r.text == "é" and r.finish_reason == "stop"
    assert [sp.kind for sp in r.provenance] == ["ensemble", "draft", "ensemble"]  # lead byte, tail byte, end
    assert r.stats.verification_calls == 2  # asked at the start and at the end, not mid-character
    assert r.stats.ensembled_tokens == 2


def test_every_token_override_feeds_the_chosen_text_to_every_member(kind):
    primary = {b"": {b"A": 0.6, b"B": 0.4}, b"B": {EOG: 1.0}}
    other = {b"": {b"B": 1.0}, b"B": {EOG: 1.0}}
    members, p, o = pair(primary, other, kind)
    r = run(members, policy="every-token")
    assert r.text == "B" and r.stats.overridden_tokens == 1
    assert p.cached(0)[1:] == p.tokenize(b"B") and o.cached(0)[1:] == o.tokenize(b"B")


def test_a_one_member_ensemble_is_plain_decoding(kind):
    script = {b"": {b"A": 0.5, b"B": 0.3, b"C": 0.2}, b"A": {b" ": 0.7, EOG: 0.3}, b"A ": {b"C": 0.6, EOG: 0.4}}
    single = run([Member(FakeBackend(ABC, script, kind=kind))], policy="single")
    for policy in ("safe", "every-token"):
        alone = run([Member(FakeBackend(ABC, script, kind=kind))], policy=policy)
        assert alone.text == single.text == "A C"
        assert alone.stats.overridden_tokens == 0


def test_sampling_works_on_both_kinds(kind):
    script = lambda text: {b"A": 0.5, b"B": 0.3, EOG: 0.2} if len(text) < 12 else {EOG: 1.0}  # noqa: E731
    members = [Member(FakeBackend(ABC, script, name="a", kind=kind)), Member(FakeBackend(ABC, script, name="b", kind=kind))]
    texts = {run(members, sampling=Sampling(temperature=0.8, seed=s)).text for s in range(6)}
    assert len(texts) > 1 and all(set(t) <= {"A", "B"} for t in texts)


def test_two_generations_on_one_ensemble_are_two_lanes(lanes):
    """Two answers streamed at once on the same members: each has its own lanes (sequences, prompts, tracks),
    and each equals the answer made alone."""
    def script_for(marker: bytes):
        return lambda text: {marker: 0.6, b"C": 0.4} if len(text) < 6 else {EOG: 1.0}

    d = FakeBackend(ABC, script_for(b"A"), name="d")
    v = FakeBackend(ABC, script_for(b"B"), name="v")
    members = [Member(d), Member(v)]
    cfg = dict(gate=None)
    alone = [e for e in generate_events(members, ASK, policy_options=cfg)][-1].result.text
    first = generate_events(members, ASK, policy_options=cfg)
    second = generate_events(members, ASK, policy_options=cfg)
    a = next(first)
    lane_a = lanes.last(members[0])
    b = next(second)  # both are open now, on different sequences
    lane_b = lanes.last(members[0])
    assert lane_a is not lane_b and lane_a.seq != lane_b.seq
    rest_a = [a] + list(first)
    rest_b = [b] + list(second)
    assert rest_a[-1].result.text == rest_b[-1].result.text == alone
    assert sorted(d._free) == [0, 1, 2, 3]  # every lane gave its sequence back


def test_top_and_full_distributions_read_alike():
    probs = np.array([0.05, 0.6, 0.1, 0.25])
    full = FullDist(np.log(probs))
    top = TopDist(np.array([3, 1, 2]), np.array([0.25, 0.6, 0.1]), n_vocab=4)
    assert full.argmax == top.argmax == 1
    assert full.top1 == pytest.approx(top.top1)
    np.testing.assert_allclose(full.prob(np.array([1, 3])), top.prob(np.array([1, 3])))
    assert top.prob(0) == 0.0  # not reported: not proposed
    ids_f, p_f = full.top(2)
    ids_t, p_t = top.top(2)
    assert ids_f.tolist() == ids_t.tolist() == [1, 3]
    assert top.sampling_probs().sum() == pytest.approx(1.0)
    assert 0 < top.entropy() < full.entropy()  # the unreported 0.05 is missing from the top-n
