"""`eager`: EAGER's entropy-aware branching on one llama.cpp context (../shared/research/eager-fusionroute.md).

One sequence starts; at a token whose entropy passes the dynamic threshold, while fewer than ``max_branches``
sequences exist, the sequence forks: the parent goes on with its top-1 token, the new branch with the top-2.
A fork copies the parent's KV cells (no re-prefill). Every step, all live branches decode together in one
batch, each with logits only at its last row; a finished branch gives its sequence back. Each branch is a
whole answer; the caller votes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..branching import TOP20, EntropyHistory, can_branch, topn_entropy
from ..decisions import EOG, Sampling, entropy, softmax
from ..dist import Dist, FullDist
from ..errors import UsageError
from ..member import Lane
from ..options import Option
from .base import UNION_K, WEIGHTS, EvalConfig, LoadNeeds, Policy, PolicyStats, SecondPass, option
from .registry import register


# EAGER's options, with the authors' names and defaults (their main script: threshold 2.5, 32 sequences) except
# where a laptop or a small model needs others (said at each).
MAX_BRANCHES = Option("max_branches", int, 8, "most answers per prompt (branches live + finished); each "
                      "is a sequence of one context (8 on a 2-core CPU: the batch speed-up grows slowly beyond it).",
                      range=(1, 64))
# The authors' 2.5 nats was set on larger models; a small model's top-20 entropies rarely reach it (Qwen2.5-Coder-0.5B
# on GSM8K: 99th percentile 1.75, maximum 2.39 — benchmarks/results/entropy-probe-0.5b.md), so the default is 1.75.
THRESHOLD = Option("threshold", float, 1.75, "branch where the next token's entropy (nats) exceeds "
                   "max(this, the percentile below of the entropies so far); off: never on entropy (the "
                   "authors' 2.5 rarely fires on small models: benchmarks/entropy_probe.py measures a model).",
                   range=(0.0, 50.0), off=True)
PERCENTILE = Option("percentile", float, 99.0, "percentile of the prompt's entropies so far that raises the "
                    "threshold.", range=(0.0, 100.0))
ENTROPY = Option("entropy", str, "top20", "entropy over the top-20 renormalised (the authors) or the full "
                 "vocabulary.", choices=("top20", "full"))
MAX_TOKENS_WITHOUT_BRANCH = Option("max_tokens_without_branch", int, 1000, "no more branching after this "
                                   "many steps without one.", range=(1, 1 << 20))
INITIAL_BRANCHES = Option("initial_branches", int, 1, "answers started at once (max_branches of them and "
                          "threshold off = M independent samples in one batch).", range=(1, 64))
ENSEMBLE_GATE = Option("ensemble_gate", float, 0.5, "eager with several members: where the drafter's top-1 "
                       "probability is below this, the members' best other candidate starts a branch; off: never.",
                       range=(0.0, 1.0), off=True)

@dataclass(frozen=True)
class EagerOptions:
    """EAGER's options."""

    max_branches: int = option(MAX_BRANCHES)
    threshold: float | None = option(THRESHOLD)
    percentile: float = option(PERCENTILE)
    entropy: str = option(ENTROPY)
    max_tokens_without_branch: int = option(MAX_TOKENS_WITHOUT_BRANCH)
    initial_branches: int = option(INITIAL_BRANCHES)
    ensemble_gate: float | None = option(ENSEMBLE_GATE)
    union_k: int = option(UNION_K)
    weights: tuple[float, ...] | None = option(WEIGHTS)


@dataclass
class EagerStats(PolicyStats):
    """Counts of an EAGER run (``ensembled``: branches started at the members' alternative)."""

    ensemble_checks: int = 0  # positions where the members were asked for an alternative

    def figures(self, tokens: int) -> dict[str, Any]:
        return {"verification_calls": self.ensemble_checks}


def _adapt_retry(options: EagerOptions, extra: int) -> dict[str, Any]:
    """EAGER-adapt's rerun of an item given ``extra`` sequences: with them, at a threshold 10 % lower (the
    authors' retry)."""
    threshold = None if options.threshold is None else round(options.threshold * 0.9, 6)
    return {"max_branches": options.max_branches + extra, "threshold": threshold}


# Eval's branching configurations over the drafter alone (eager-ensemble: over every member), at the authors'
# temperature. M = BRANCHES answers per item; "parallel" samples them independently in one batch.
BRANCHES = 8
BRANCH_TEMPERATURE = 0.6
# Context for the branching configurations: up to 4 × M branches (eager-adapt) share one context.
BRANCH_N_CTX = 16384


def _branching(name: str, options: dict[str, Any], **kwargs: Any) -> EvalConfig:
    """An eval configuration of EAGER's: M branches at the authors' temperature, on an ensemble loaded once for
    up to 4 × M (eager-adapt's reruns), its settings recorded so that records of other settings are told apart."""
    return EvalConfig(name, {"max_branches": BRANCHES, **options}, by_default=False,
                      sampling={"temperature": BRANCH_TEMPERATURE}, load={"max_branches": 4 * BRANCHES, "parallel": 1},
                      min_n_ctx=BRANCH_N_CTX, record_settings=("max_branches", "threshold", "percentile", "entropy"),
                      **kwargs)


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


@register
class EagerPolicy(Policy):
    """Runs EAGER to completion over the drafter's lane (the first), with the other lanes as the ensemble
    that proposes alternatives: :meth:`run_branches` returns every branch."""

    name = "eager"
    summary = "branch at uncertain tokens, then vote"
    Options = EagerOptions
    Stats = EagerStats
    options: EagerOptions
    stats: EagerStats
    branches = True
    batchable = False  # its branches are batched already, one context's sequences
    eval_configs = (
        _branching("parallel", {"initial_branches": BRANCHES, "threshold": None}, drafter_only=True),
        _branching("eager", {}, drafter_only=True),
        # a second pass over eager's records: the budget saved re-spent (eval's EngineConfig.plan)
        _branching("eager-adapt", {}, drafter_only=True,
                   second_pass=SecondPass("eager", lambda o: o.max_branches, _adapt_retry)),
        _branching("eager-ensemble", {}, needs_members=2),
    )

    @classmethod
    def load_needs(cls, options: EagerOptions, n_members: int, prepared: Any) -> LoadNeeds:
        # one sequence per branch for every member (a model listed twice forks its branches in one context)
        return LoadNeeds(sequences=options.max_branches * n_members)

    def __init__(self, lanes: Lane | list[Lane], options: EagerOptions, sampling: Sampling, rng: np.random.Generator,
                 prepared: Any = None) -> None:
        super().__init__([lanes] if isinstance(lanes, Lane) else lanes, options, sampling, rng, prepared)
        if len(self.lanes) > 1 and not self.by_id:
            raise UsageError("ensemble branching needs every member to share the drafter's tokenizer (as the "
                             "`coder` preset does); run eager with one model or such members")
        self.root = self.lanes[0]
        self.eager = options
        self.history = EntropyHistory()
        self.branches: list[Branch] = []
        self.since_branch = 0
        self.batched_steps = 0

    def _entropy(self, dist: Dist) -> float:
        """The model's own entropy at this position: before the sampling temperature (as vLLM's logprobs, which
        the authors' threshold was set on), over the top 20 or the whole vocabulary."""
        if isinstance(dist, FullDist) and self.temperature != 1.0:
            probs = softmax(dist.logits * np.float32(self.temperature))  # undo the 1/T the dist was taken at
        else:
            probs = dist.sampling_probs()
        return entropy(probs) if self.eager.entropy == "full" else topn_entropy(probs, TOP20)

    def run_branches(self, max_tokens: int, deadline: float = float("inf")) -> list[Branch]:
        """Every branch to its end (or ``max_tokens``, or ``deadline`` on the perf_counter clock: then the live
        ones end with finish_reason "length")."""
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
                can_fork = b.lane.room > 1 and can_branch(len(self.branches), self.eager.max_branches,
                                                          self.since_branch, self.eager.max_tokens_without_branch)
                if can_fork and self._high_entropy(b.dist):
                    ids, _ = b.dist.top(2)
                    if len(ids) == 2:
                        tok = int(ids[0])  # the parent goes on with its top-1, the branch with the top-2
                        choices.append((self._fork(b, "entropy"), int(ids[1])))
                elif (can_fork and b.verifier_lanes and self.eager.ensemble_gate is not None
                      and b.dist.top1 < self.eager.ensemble_gate):
                    alt = self._ensemble_alternative(b, tok)
                    if alt is not None:
                        choices.append((self._fork(b, "ensemble"), alt))
                choices.append((b, tok))
            if len(choices) > len(live):
                self.since_branch = 0
            else:
                self.since_branch += 1
            live = self._advance(choices, max_tokens)
            if live and time.perf_counter() > deadline:
                for b in live:
                    self._finish(b, "length")
                live = []
        return self.branches

    def _high_entropy(self, dist: Dist) -> bool:
        """Whether this position passes the dynamic threshold (every entropy joins the prompt's history; the
        percentile is computed only when the entropy passes the base threshold, which it must exceed anyway)."""
        base = self.eager.threshold
        if base is None:  # no entropy branching (parallel): nothing to measure
            return False
        h = self._entropy(dist)
        self.history.add(h)
        return h > base and h > self.history.threshold(base, self.eager.percentile)

    def _ensemble_alternative(self, b: Branch, tok: int) -> int | None:
        """Where the members disagree with the drafter — the union's best candidate is not the drafter's own
        top-1 — that candidate, to start a branch; None where they agree, where the parent takes that token
        anyway (``tok``, sampled), or where it is end-of-generation. Each verifier brings its branch lane up
        to the branch's text first (a lagging catch-up in one decode)."""
        self.stats.ensemble_checks += 1
        dists = [b.dist] + [self.next_dist(v, b.tokens) for v in b.verifier_lanes]
        keys, p, _ = self.union(dists)
        if not len(keys):
            return None
        best = keys[int(np.argmax(p))]
        drafter_top = self.root.key_of(int(b.dist.top(1)[0][0]))
        if best in (drafter_top, self.root.key_of(tok), EOG):
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
