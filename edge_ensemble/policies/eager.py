"""`eager`: EAGER's entropy-aware branching on one llama.cpp context (../shared/research/eager-fusionroute.md).

One sequence starts; at a token whose entropy passes the dynamic threshold, while fewer than ``max_branches``
sequences exist, the sequence forks: the parent goes on with its top-1 token, the new branch with the top-2.
A fork copies the parent's KV cells (no re-prefill). Every step, all live branches decode together in one
batch, each with logits only at its last row; a finished branch gives its sequence back. Each branch is a
whole answer; the caller votes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..branching import TOP20, EntropyHistory, may_branch, topn_entropy
from ..decisions import EOG, Gate, Sampling
from ..dist import Dist
from ..errors import UsageError
from ..member import Lane
from .base import PolicyBase, PolicyConfig


@dataclass(frozen=True)
class EagerConfig:
    """EAGER's knobs (the authors' names; validated at the edge)."""

    max_branches: int = 8  # M: sequences per prompt, live + finished
    threshold: float = 2.5  # entropy_threshold (nats, over the top-20 renormalised)
    percentile: float = 99.0  # dynamic threshold: max(threshold, this percentile of the entropies so far)
    entropy: str = "top20"  # "top20" (the authors) or "full" (whole vocabulary)
    max_tokens_without_branch: int = 1000
    # Branches at the start (the authors' initial_sequences): max_branches of them and an infinite threshold
    # is "full parallel", M independent samples decoded as M sequences in one batch.
    initial_branches: int = 1
    # Ensemble branching: with several members, a token where the drafter's top-1 probability is below this
    # gate is shown to the verifiers; where the union's best candidate differs from the drafter's token, that
    # candidate starts a new branch (members contribute alternatives, not only corrections).
    ensemble_gate: float = 0.5


@dataclass
class Branch:
    """One answer of an EAGER run."""

    index: int
    parent: int | None  # the branch it forked from
    forked_at: int  # token index (in the parent's answer) where it forked; 0 for the root
    tokens: list[int] = field(default_factory=list)
    logprob: float = 0.0  # sum of the chosen tokens' log-probabilities
    finish_reason: str | None = None  # "stop" (end of generation) or "length"
    lane: Lane | None = None
    dist: Dist | None = None  # the next token's distribution while live
    verifier_lanes: list[Lane] = field(default_factory=list)
    # "root", "parallel" (started with the root), "entropy" (an EAGER fork: top-2) or "ensemble" (the union's
    # alternative)
    origin: str = "root"

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(len(self.tokens), 1)


class EagerRun(PolicyBase):
    """Runs EAGER to completion over the drafter's lane (the first), with the other lanes as the ensemble
    that proposes alternatives: :meth:`run` returns every branch."""

    def __init__(self, lanes: Lane | list[Lane], config: EagerConfig, sampling: Sampling, rng: np.random.Generator,
                 policy_config: PolicyConfig = PolicyConfig(gate=Gate(None))) -> None:
        super().__init__([lanes] if isinstance(lanes, Lane) else lanes, policy_config, sampling, rng)
        if len(self.lanes) > 1 and not self.by_id:
            raise UsageError("ensemble branching needs every member to share the drafter's tokenizer (as the "
                             "`coder` preset does); run eager with one model or such members")
        self.root = self.lanes[0]
        self.eager = config
        self.history = EntropyHistory()
        self.branches: list[Branch] = []
        self.since_branch = 0
        self.batched_steps = 0
        self.ensemble_checks = 0

    def _entropy(self, dist: Dist) -> float:
        return dist.entropy() if self.eager.entropy == "full" else topn_entropy(dist.sampling_probs(), TOP20)

    def run(self, max_tokens: int) -> list[Branch]:
        lane = self.root
        root = Branch(0, None, 0, lane=lane, verifier_lanes=self.lanes[1:])
        root.dist = self.next_dist(lane, [])
        for v in root.verifier_lanes:
            v.feed(v.prompt)
        self.branches.append(root)
        live = [root] + [self._fork(root, "parallel")
                         for _ in range(min(self.eager.initial_branches, self.eager.max_branches) - 1)]
        while live:
            choices: list[tuple[Branch, int]] = []
            for b in list(live):
                tok = self.pick(b.dist)
                h = self._entropy(b.dist)
                self.history.add(h)
                threshold = self.history.threshold(self.eager.threshold, self.eager.percentile)
                can_fork = (len(self.branches) < self.eager.max_branches and b.lane.room > 1
                            and self.since_branch < self.eager.max_tokens_without_branch)
                if can_fork and may_branch(h, threshold, len(self.branches), self.eager.max_branches,
                                           self.since_branch, self.eager.max_tokens_without_branch):
                    ids, _ = b.dist.top(2)
                    if len(ids) == 2:
                        tok = int(ids[0])  # the parent goes on with its top-1, the branch with the top-2
                        choices.append((self._fork(b, "entropy"), int(ids[1])))
                elif can_fork and b.verifier_lanes and b.dist.top1 < self.eager.ensemble_gate:
                    alt = self._ensemble_alternative(b, tok)
                    if alt is not None:
                        choices.append((self._fork(b, "ensemble"), alt))
                choices.append((b, tok))
            if len(choices) > len(live):
                self.since_branch = 0
            else:
                self.since_branch += 1
            live = self._advance(choices, max_tokens)
        return self.branches

    def _ensemble_alternative(self, b: Branch, tok: int) -> int | None:
        """The union's best candidate at this position when it is not the drafter's ``tok`` (None otherwise):
        each verifier brings its branch lane up to the branch's text (a lagging catch-up in one decode)."""
        self.ensemble_checks += 1
        dists = [b.dist] + [self.next_dist(v, b.tokens) for v in b.verifier_lanes]
        keys, p, _ = self.union(dists, sharpen=False)
        mine = self.root.key_of(tok)
        order = np.argsort(-p, kind="stable")
        best = keys[int(order[0])] if len(keys) else mine
        if best == mine or best == EOG:
            return None
        self.stats.ensembled += 1
        return int(best)  # by-id keys: a token id of the shared tokenizer

    def _fork(self, parent: Branch, origin: str) -> Branch:
        child = Branch(len(self.branches), parent.index, len(parent.tokens), tokens=list(parent.tokens),
                       logprob=parent.logprob, lane=parent.lane.fork(), dist=parent.dist,
                       verifier_lanes=[v.fork() for v in parent.verifier_lanes], origin=origin)
        self.branches.append(child)
        return child

    def _advance(self, choices: list[tuple[Branch, int]], max_tokens: int) -> list[Branch]:
        """Append each branch's token; decode all still-live branches in one batch; return them."""
        going: list[Branch] = []
        for b, tok in choices:
            p = float(b.dist.prob(tok))
            b.logprob += float(np.log(p)) if p > 0 else -1e9
            if b.lane.member.is_eog(tok):
                self._finish(b, "stop")
                continue
            b.tokens.append(tok)
            if len(b.tokens) >= max_tokens or b.lane.room < 1:
                self._finish(b, "length")
                continue
            going.append(b)
        if not going:
            return []
        backend = going[0].lane.backend
        requests = [(b.lane.seq, b.lane.prompt + b.tokens, [len(b.lane.prompt) + len(b.tokens) - 1]) for b in going]
        results = backend.feed_many(requests, self.temperature)
        self.batched_steps += 1
        still: list[Branch] = []
        for b, res, (_, target, rows) in zip(going, results, requests):
            if res is None:  # its tokens no longer fit: this branch ends alone
                self._finish(b, "length")
                continue
            b.dist = res[0][rows[0]]
            b.lane.decoded_tokens += res[1]
            still.append(b)
        return still

    def _finish(self, b: Branch, reason: str) -> None:
        b.finish_reason = reason
        b.dist = None
        if b.lane is not self.root:  # a branch's own cells are freed; the root lanes keep the prompt's
            b.lane.close(keep_cache=False)
            for v in b.verifier_lanes:
                v.close(keep_cache=False)
