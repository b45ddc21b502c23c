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
from ..decisions import Sampling
from ..dist import Dist
from ..member import Lane


@dataclass(frozen=True)
class EagerConfig:
    """EAGER's knobs (the authors' names; validated at the edge)."""

    max_branches: int = 8  # M: sequences per prompt, live + finished
    threshold: float = 2.5  # entropy_threshold (nats, over the top-20 renormalised)
    percentile: float = 99.0  # dynamic threshold: max(threshold, this percentile of the entropies so far)
    entropy: str = "top20"  # "top20" (the authors) or "full" (whole vocabulary)
    max_tokens_without_branch: int = 1000


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

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(len(self.tokens), 1)


class EagerRun:
    """Runs EAGER over one member's lane to completion: :meth:`run` returns every branch."""

    def __init__(self, lane: Lane, config: EagerConfig, sampling: Sampling, rng: np.random.Generator) -> None:
        self.root = lane
        self.config = config
        self.sampling = sampling
        self.rng = rng
        self.history = EntropyHistory()
        self.branches: list[Branch] = []
        self.since_branch = 0
        self.batched_steps = 0

    @property
    def temperature(self) -> float:
        return 1.0 if self.sampling.greedy else self.sampling.temperature

    def _pick(self, dist: Dist) -> int:
        """The branch's own token (greedy, or sampled after top-k / top-p), drawn as `single` draws it."""
        from ..decisions import filter_probs

        s = self.sampling
        if s.greedy:
            return dist.argmax
        dist.proposal = filter_probs(dist.sampling_probs(), s.top_k, s.top_p)
        return int(self.rng.choice(dist.proposal.size, p=dist.proposal))

    def _entropy(self, dist: Dist) -> float:
        return dist.entropy() if self.config.entropy == "full" else topn_entropy(dist.sampling_probs(), TOP20)

    def run(self, max_tokens: int) -> list[Branch]:
        lane = self.root
        target = lane.prompt
        root = Branch(0, None, 0, lane=lane)
        root.dist = lane.feed(target, rows=[len(target) - 1], temperature=self.temperature)[len(target) - 1]
        self.branches.append(root)
        live = [root]
        while live:
            choices: list[tuple[Branch, int]] = []
            for b in list(live):
                tok = self._pick(b.dist)
                h = self._entropy(b.dist)
                self.history.add(h)
                threshold = self.history.threshold(self.config.threshold, self.config.percentile)
                if may_branch(h, threshold, len(self.branches), self.config.max_branches,
                              self.since_branch, self.config.max_tokens_without_branch) and b.lane.room > 1:
                    ids, _ = b.dist.top(2)
                    if len(ids) == 2:
                        child = self._fork(b)
                        tok = int(ids[0])  # the parent goes on with its top-1, the branch with the top-2
                        choices.append((child, int(ids[1])))
                        live.append(child)
                        self.since_branch = -1
                choices.append((b, tok))
            self.since_branch += 1
            live = self._advance(choices, max_tokens)
        return self.branches

    def _fork(self, parent: Branch) -> Branch:
        child = Branch(len(self.branches), parent.index, len(parent.tokens), tokens=list(parent.tokens),
                       logprob=parent.logprob, lane=parent.lane.fork(), dist=parent.dist)
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
        if b.lane is not self.root:
            b.lane.close(keep_cache=False)  # a branch's own cells are freed; the root keeps the prompt's
