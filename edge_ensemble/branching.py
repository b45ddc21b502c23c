"""EAGER's decisions as pure functions: when a sequence branches, how answers are voted, how a run's saved
budget is re-allocated (../shared/research/eager-fusionroute.md, from the authors' public code).

Nothing here touches a model; the EAGER policy calls these per step. Entropies are in nats.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .decisions import entropy

TOP20 = 20  # vLLM's maximum number of returned log-probabilities, which the authors' entropy is taken over


def topn_entropy(probs: np.ndarray, n: int = TOP20) -> float:
    """Entropy of the n likeliest tokens renormalised (the authors' convention: vLLM's top-20 logprobs,
    ``probs / probs.sum()``). With ``n`` >= the vocabulary it is the full entropy."""
    p = np.asarray(probs, dtype=np.float64)
    if n < p.size:
        p = np.partition(p, p.size - n)[p.size - n:]
    return entropy(p / p.sum())


@dataclass
class EntropyHistory:
    """The entropies seen so far for one prompt (across all its branches), for the dynamic threshold."""

    values: list[float] = field(default_factory=list)

    def add(self, h: float) -> None:
        self.values.append(h)

    def threshold(self, base: float, percentile: float) -> float:
        """``max(base, the given percentile of the entropies seen so far)``; just ``base`` before any."""
        if not self.values:
            return base
        return max(base, float(np.percentile(self.values, percentile)))


def can_branch(n_sequences: int, max_sequences: int, tokens_since_branch: int, max_tokens_without_branch: int) -> bool:
    """Whether any fork is still allowed: fewer than ``max_sequences`` exist (live + finished), and branching has
    not been switched off by ``max_tokens_without_branch`` tokens without any branch."""
    return n_sequences < max_sequences and tokens_since_branch < max_tokens_without_branch


def may_branch(h: float, threshold: float, n_sequences: int, max_sequences: int,
               tokens_since_branch: int, max_tokens_without_branch: int) -> bool:
    """A sequence forks here when the entropy exceeds the threshold and :func:`can_branch` allows a fork."""
    return h > threshold and can_branch(n_sequences, max_sequences, tokens_since_branch, max_tokens_without_branch)


def majority_vote(answers: Sequence[str | None], scores: Sequence[float]) -> int:
    """Index of the chosen branch: the most frequent extracted answer (None = no answer, never voted for),
    ties between answers broken by the best mean log-probability among their branches; with no answer at all,
    the branch with the best mean log-probability. Within the winning answer, its best-scored branch."""
    if len(answers) != len(scores) or not answers:
        raise ValueError("majority_vote needs one score per answer, and at least one answer")
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return int(np.argmax(scores))
    best = {a: max(s for b, s in zip(answers, scores) if b == a) for a in votes}
    winner = max(votes, key=lambda a: (votes[a], best[a]))
    return max((i for i, a in enumerate(answers) if a == winner), key=lambda i: scores[i])


def reallocate(used: Sequence[int], capped: Sequence[bool], max_sequences: int, extra_cap: int = 3) -> list[int]:
    """EAGER-adapt's re-allocation (no labels): the budget saved over the run, ``max_sequences × prompts −
    sequences used``, is split evenly over the prompts that hit the cap, at most ``extra_cap × max_sequences``
    more each. Returns the extra sequences per prompt (0 for prompts that did not hit the cap)."""
    if len(used) != len(capped):
        raise ValueError("reallocate needs one cap flag per prompt")
    saved = max(0, max_sequences * len(used) - sum(used))
    hit = [i for i, c in enumerate(capped) if c]
    out = [0] * len(used)
    if not hit or saved == 0:
        return out
    share = min(saved // len(hit), extra_cap * max_sequences)
    for i in hit:
        out[i] = share
    return out
