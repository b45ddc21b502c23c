"""EAGER on a real llama.cpp context: branches forked at high entropy decode together in one batch; each
branch equals its prefix decoded alone; with one branch it is plain sampling with the same seed."""

from __future__ import annotations

import numpy as np

from edge_ensemble.decisions import Sampling
from edge_ensemble.engine import GenerationOptions, generate_events
from edge_ensemble.member import Member
from edge_ensemble.policies.eager import EagerOptions, EagerPolicy
from edge_ensemble.runtime import LoadOptions, Model

ASK = [{"role": "user", "content": "Tell me a story about a lighthouse."}]


def _lane(model: Model):
    member = Member(model, name="m")
    return member, member.open_lane(member.backend.chat_prompt(ASK))


def test_one_branch_is_plain_sampling_with_the_same_seed(tiny_bpe):
    model = Model(tiny_bpe, LoadOptions(n_ctx=1024, n_seq_max=2))
    member, lane = _lane(model)
    sampling = Sampling(temperature=0.6, seed=7)
    branches = EagerPolicy(lane, EagerOptions(max_branches=1, threshold=0.0), sampling, np.random.default_rng(7)).run_branches(40)
    lane.close()
    assert len(branches) == 1
    model.reset()
    single = list(generate_events([member], ASK, policy="single", policy_options={},
                                  options=GenerationOptions(max_tokens=40, sampling=sampling)))[-1].result
    assert model.detokenize(branches[0].tokens) == single.text.encode()
    model.close()


def test_branches_fork_at_high_entropy_and_each_equals_its_prefix_decoded_alone(tiny_bpe):
    model = Model(tiny_bpe, LoadOptions(n_ctx=2048, n_seq_max=4))
    member, lane = _lane(model)
    run = EagerPolicy(lane, EagerOptions(max_branches=4, threshold=0.0, percentile=0.0), Sampling(), np.random.default_rng(0))
    branches = run.run_branches(24)
    lane.close()
    assert len(branches) == 4 and all(b.finish_reason in ("stop", "length") for b in branches)
    assert run.batched_steps < sum(len(b.tokens) for b in branches)  # live branches shared each llama_decode
    assert sorted(member.backend._free) == [0, 1, 2, 3]  # finished branches gave their sequences back
    assert model.cells_used <= len(lane.prompt) + 24  # branch cells freed: only the root's remain
    fresh = Model(tiny_bpe, LoadOptions(n_ctx=2048))
    for b in branches:
        forks = set()  # positions where this branch or an ancestor took the top-2 instead of the top-1
        a = b
        while a.parent is not None:
            forks.add(a.forked_at)
            a = branches[a.parent]
        fresh.reset()
        logits = fresh.decode(lane.prompt + b.tokens, want="all")[len(lane.prompt) - 1:]
        for i, tok in enumerate(b.tokens):
            order = np.argsort(-logits[i])
            rank = int(np.flatnonzero(order == tok)[0])
            near = logits[i][order[0]] - logits[i][tok] < 1e-2  # a batch-split near-tie
            assert rank == (1 if i in forks else 0) or near, (b.index, i, rank)
        z = logits - logits.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        total = logp[np.arange(len(b.tokens)), b.tokens].sum()
        if b.finish_reason == "stop":  # the end token it chose (greedy: the likeliest) is counted too
            total += logp[len(b.tokens)].max()
        assert abs(total - b.logprob) < 0.01 * (len(b.tokens) + 1)
    fresh.close()
    model.close()


def test_ensemble_branching_forks_where_the_members_disagree(tiny_bpe_close):
    models = [Model(p, LoadOptions(n_ctx=2048, n_seq_max=4)) for p in tiny_bpe_close]
    members = [Member(m, name=f"m{i}") for i, m in enumerate(models)]
    lanes = [m.open_lane(m.backend.chat_prompt(ASK), follows_drafter=i > 0, by_id=True) for i, m in enumerate(members)]
    cfg = EagerOptions(max_branches=4, threshold=None, ensemble_gate=1.0)  # no entropy forks; check every token
    run = EagerPolicy(lanes, cfg, Sampling(), np.random.default_rng(0))
    branches = run.run_branches(20)
    origins = [b.origin for b in branches]
    assert origins[0] == "root" and "ensemble" in origins and "entropy" not in origins
    assert run.stats.ensemble_checks > 0
    for b in branches[1:]:  # each ensemble branch starts with a token the drafter did not choose there
        parent = branches[b.parent]
        assert b.tokens[: b.forked_at] == parent.tokens[: b.forked_at]
        assert b.tokens[b.forked_at] != parent.tokens[b.forked_at]
    for lane in lanes:
        lane.close()
    assert all(sorted(m.backend._free) == [0, 1, 2, 3] for m in members)
    # Sampled: the parent may take a token other than the drafter's top-1; a branch still starts only where the
    # union's best differs from the drafter's top-1, and never with the parent's own token.
    lanes = [m.open_lane(m.backend.chat_prompt(ASK), follows_drafter=i > 0, by_id=True) for i, m in enumerate(members)]
    sampled = EagerPolicy(lanes, cfg, Sampling(temperature=1.0), np.random.default_rng(3)).run_branches(20)
    prompt = list(lanes[0].prompt)
    for lane in lanes:
        lane.close()
    forks = [b for b in sampled if b.origin == "ensemble"]
    assert forks
    with Model(tiny_bpe_close[0], LoadOptions(n_ctx=2048)) as fresh:
        for b in forks:
            parent = sampled[b.parent]
            logits = np.array(fresh.decode(prompt + b.tokens[: b.forked_at], want="last")[-1])
            fresh.reset()
            second, first = np.sort(logits)[-2:]
            # (a near tie may flip between this one-sequence decode and the run's batch)
            assert b.tokens[b.forked_at] != int(np.argmax(logits)) or first - second < 1e-3
            assert len(parent.tokens) <= b.forked_at or b.tokens[b.forked_at] != parent.tokens[b.forked_at]
    # the same model twice never disagrees with itself: greedy ensemble branching adds nothing
    twin = Member(members[0].backend, name="twin")  # the same loaded model listed twice
    lanes = [members[0].open_lane(members[0].backend.chat_prompt(ASK), by_id=True)]
    lanes.append(twin.open_lane(lanes[0].prompt, follows_drafter=True, by_id=True, twin_of=lanes[0]))
    alone = EagerPolicy(lanes, cfg, Sampling(), np.random.default_rng(0)).run_branches(20)
    assert len(alone) == 1
    for m in models:
        m.close()


def test_eager_through_the_engine_votes_and_lists_every_branch(tiny_bpe):

    model = Model(tiny_bpe, LoadOptions(n_ctx=2048, n_seq_max=4))
    member = Member(model, name="m")
    cfg = dict(max_branches=4, threshold=0.0, percentile=0.0)
    first_char = lambda text: text[:1] or None  # noqa: E731 - a stand-in extractor: the answer is the first character
    opts = GenerationOptions(max_tokens=16, sampling=Sampling(temperature=0.6, seed=1), extract=first_char)
    events = list(generate_events([member], ASK, policy="eager", policy_options=cfg, options=opts))
    result = events[-1].result
    assert "".join(e.text for e in events) == result.text
    assert len(result.branches) == 4 == result.stats.branches
    chosen = [b for b in result.branches if b.chosen]
    assert len(chosen) == 1 and chosen[0].text == result.text
    votes = {b.answer: b.votes for b in result.branches}
    assert chosen[0].votes == max(votes.values())
    # Generated = what was decoded: each branch's tokens after its fork (the shared prefix once).
    assert result.stats.generated_tokens == sum(b.tokens - b.forked_at for b in result.branches)
    assert result.stats.generated_tokens < sum(b.tokens for b in result.branches)  # some fork after token 0
    assert result.to_dict()["branches"][0]["origin"] == "root"
    assert sorted(member.backend._free) == [0, 1, 2, 3]
    model.close()


def test_parallel_is_m_independent_answers_in_one_batch(tiny_bpe):
    model = Model(tiny_bpe, LoadOptions(n_ctx=2048, n_seq_max=4))
    member, lane = _lane(model)
    greedy = EagerOptions(max_branches=4, threshold=None, initial_branches=4)
    branches = EagerPolicy(lane, greedy, Sampling(), np.random.default_rng(0)).run_branches(20)
    assert [b.origin for b in branches] == ["root", "parallel", "parallel", "parallel"]
    assert len({tuple(b.tokens) for b in branches}) == 1  # greedy: four copies of one answer
    model.reset()
    single = list(generate_events([member], ASK, policy="single", policy_options={},
                                  options=GenerationOptions(max_tokens=20)))[-1].result
    assert model.detokenize(branches[0].tokens) == single.text.encode()
    model.reset()
    member, lane = _lane(model)
    run = EagerPolicy(lane, greedy, Sampling(temperature=0.9, seed=3), np.random.default_rng(3))
    sampled = run.run_branches(20)
    assert len({tuple(b.tokens) for b in sampled}) > 1  # independent samples
    assert run.batched_steps <= 20  # one decode per step for all four
    model.close()


def test_a_branch_that_fills_the_context_ends_alone(tiny_bpe):
    """Branches share one context: when it is full, the branch whose tokens no longer fit ends with "length" and
    gives its cells back, and the others go on (until they too run out of room)."""
    model = Model(tiny_bpe, LoadOptions(n_ctx=256, n_seq_max=4))
    member, lane = _lane(model)
    run = EagerPolicy(lane, EagerOptions(max_branches=4, threshold=0.0, percentile=0.0), Sampling(), np.random.default_rng(0))
    branches = run.run_branches(400)  # far more than the context holds
    lane.close()
    assert len(branches) == 4 and all(b.finish_reason == "length" for b in branches)
    lengths = sorted(len(b.tokens) for b in branches)
    assert lengths[0] < lengths[-1]  # the first to overflow ended while another still had room
    assert model.cells_used <= 256 and sorted(member.backend._free) == [0, 1, 2, 3]
    model.close()
