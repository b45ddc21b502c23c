"""The ``vote`` policy's decisions as pure functions: which answer a sample gives, how confident a trace is, when
to stop sampling, how samples are weighted and which one is returned (../shared/research/voting.md).

Nothing here touches a model. Sources, each rule citing its own:
- ESC, Li et al., ICLR 2024 (early-stopping self-consistency): stop when a window of samples is unanimous.
- Adaptive-Consistency, Aggarwal et al., EMNLP 2023 (public code ``Pranjal2041/AdaptiveConsistency``,
  ``stopping_criterias.py``): stop when a Beta / Dirichlet posterior gives the leading answer >= a confidence.
- DeepConf, Fu et al. 2025, arXiv 2508.15260 (public code ``facebookresearch/deepconf``): token confidence, the
  lowest sliding-window group confidence of a trace, the top-q % filter and the online kill threshold.
- CISC, Taubenfeld et al., Findings ACL 2025: votes weighted by softmax(confidence / T).
- MoT cascades, Yue et al., ICLR 2024, and ModelSwitch, Chen et al. 2025: escalate to the next model when the
  cheaper one's samples disagree.
- Universal Self-Consistency (Chen et al. 2023) / minimum-Bayes-risk selection (Bertsch et al. 2023): for free
  text, return the sample most similar to the others; the similarity is chrF's character n-gram F-score
  (Popović, WMT 2015) with beta = 1, so that it is symmetric.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .answers import (
    extract_choice_letter,
    extract_gsm8k_answer,
    extract_math_answer,
    normalize_math_answer,
    normalize_number,
)

ANSWER_KINDS = ("number", "choice", "boxed", "text")
STOP_RULES = ("unanimous", "beta", "none")
CHOICE_LABELS = "ABCDEFGHIJ"  # up to ten options (MMLU-Pro); ARC shows at most five
TOP_K = 20  # DeepConf's k: the top-20 log-probabilities vLLM returns
NO_TOKENS_CONFIDENCE = 0.0  # a trace without tokens: DeepConf's value, below any real confidence (>= log k)
DIRICHLET_TOP = 5  # Adaptive-Consistency's top_k_elements: the Dirichlet rule looks at the 5 most common answers


# ---------------------------------------------------------------- answers


def extract_answer(text: str, kind: str) -> str | None:
    """The answer a sample votes for, read as the evaluation tasks read it (:mod:`edge_ensemble.answers`); None =
    this sample votes for nothing.

    ``number``: GSM8K's final number, canonical ("1,000.50" -> "1000.5"); ``choice``: the option letter A-J;
    ``boxed``: the last ``\\boxed{...}`` (else a "final answer is ..." phrase, as the MATH scorer reads it),
    normalised as MATH answers are compared; ``text``: always None (free text is chosen by :func:`consensus_index`).
    """
    if kind == "number":
        found = extract_gsm8k_answer(text)
        return normalize_number(found) if found is not None else None
    if kind == "choice":
        return extract_choice_letter(text, CHOICE_LABELS)
    if kind == "boxed":
        found = extract_math_answer(text)
        return (normalize_math_answer(found) or None) if found is not None else None
    if kind == "text":
        return None
    raise ValueError(f"unknown answer kind {kind!r}: expected one of {', '.join(ANSWER_KINDS)}")


# ---------------------------------------------------------------- confidence (DeepConf)


def top_logprobs(logits_row: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """The ``k`` largest log-softmax values of one row of logits, largest first (all of them if the row is
    shorter). One max, one log-sum-exp and one partition, in float32, no Python loop over the vocabulary: the
    policy calls this once per generated token (about 0.25 ms for 152k logits here, against 1 ms for a partition
    of the whole row)."""
    x = np.asarray(logits_row, dtype=np.float32).ravel()
    if x.size == 0:
        raise ValueError("top_logprobs needs a non-empty row of logits")
    m = x.max()
    e = x - m
    np.exp(e, out=e)
    lse = float(m) + math.log(float(e.sum()))
    k = min(max(1, k), x.size)
    if x.size >= 64 * k:
        # The k-th largest of a subset is never above the k-th largest of the whole row, so every one of the
        # row's top k passes this cut; a few hundred candidates remain to partition.
        sub = x[::16]
        x = x[x >= np.partition(sub, sub.size - k)[sub.size - k]]
    top = np.partition(x, x.size - k)[x.size - k:]
    return np.sort(top.astype(np.float64) - lse)[::-1]


def token_confidence(top_logprobs: np.ndarray) -> float:
    """DeepConf's token confidence: minus the mean of the top-k log-probabilities at one position (k = their
    number). Higher = more confident; never below log k (k equally likely tokens)."""
    lp = np.asarray(top_logprobs, dtype=np.float64)
    if lp.size == 0:
        raise ValueError("token_confidence needs at least one log-probability")
    return float(-lp.mean())


def group_confidence(token_confs: Sequence[float], window: int) -> float:
    """DeepConf's trace score ("lowest group confidence"): the lowest mean over every run of ``window``
    consecutive tokens; with fewer tokens than the window, the mean of all; with none, ``NO_TOKENS_CONFIDENCE``
    (as the authors' code). O(n) by cumulative sums."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    c = np.asarray(token_confs, dtype=np.float64)
    if c.size == 0:
        return NO_TOKENS_CONFIDENCE
    if c.size <= window:
        return float(c.mean())
    sums = np.cumsum(np.concatenate(([0.0], c)))
    return float((sums[window:] - sums[:-window]).min() / window)


class RunningConfidence:
    """One trace's group confidence, token by token, for DeepConf's online early kill: ``add`` each token's
    confidence; ``window_mean`` is the mean of the last ``window`` tokens (of all, before the window is full),
    ``lowest`` the lowest such mean so far, equal to :func:`group_confidence` of the tokens added."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self.count = 0
        self._ring = np.zeros(window, dtype=np.float64)
        self._sum = 0.0
        self._lowest = math.inf

    def add(self, conf: float) -> None:
        slot = self.count % self.window
        self._sum += conf - self._ring[slot]
        self._ring[slot] = conf
        self.count += 1
        if self.full:
            # Re-summed once per window so the running sum's rounding cannot drift over a long trace.
            if slot == self.window - 1:
                self._sum = float(self._ring.sum())
            self._lowest = min(self._lowest, self.window_mean)

    @property
    def full(self) -> bool:
        """At least ``window`` tokens seen: only then may a trace be judged (and killed)."""
        return self.count >= self.window

    @property
    def window_mean(self) -> float:
        if self.count == 0:
            return NO_TOKENS_CONFIDENCE
        return self._sum / min(self.count, self.window)

    @property
    def lowest(self) -> float:
        return self._lowest if self.full else self.window_mean

    def below(self, threshold: float) -> bool:
        """DeepConf's online kill test: the window is full and its mean is below ``threshold``."""
        return self.full and self.window_mean < threshold


def kill_threshold(warmup_scores: Sequence[float], keep_percent: float) -> float:
    """DeepConf online: the group confidence below which a trace is stopped, the ``100 - keep_percent``
    percentile of the warm-up traces' scores (``keep_percent=90`` stops what falls below the 10th percentile;
    the paper's DeepConf-low keeps 10 %, DeepConf-high 90 %)."""
    if not 0 < keep_percent <= 100:
        raise ValueError(f"keep_percent must be in (0, 100], got {keep_percent}")
    if len(warmup_scores) == 0:
        raise ValueError("kill_threshold needs at least one warm-up trace")
    return float(np.percentile(np.asarray(warmup_scores, dtype=np.float64), 100 - keep_percent))


# ---------------------------------------------------------------- stopping (ESC, Adaptive-Consistency)


def unanimous(answers: Sequence[str | None]) -> bool:
    """ESC's rule: every answer of the window is the same, and an answer (an empty window, or one None, is not)."""
    return len(answers) > 0 and answers[0] is not None and all(a == answers[0] for a in answers)


def _leading(counts: Sequence[int]) -> list[int]:
    out = sorted((int(c) for c in counts), reverse=True)
    if out and out[-1] < 0:
        raise ValueError(f"counts must be non-negative, got {list(counts)}")
    return out


def beta_leader_probability(counts: Sequence[int]) -> float:
    """Adaptive-Consistency's Beta rule: with the two leading answers' counts a >= b (b = 0 with one answer),
    P(p > 1/2) for p ~ Beta(a + 1, b + 1) — the chance that the leader is the majority answer.

    Exact in integers: for whole-number parameters, 1 - I_{1/2}(a+1, b+1) = P(Binomial(a+b+1, 1/2) <= a)."""
    top = _leading(counts)[:2] + [0, 0]
    a, b = top[0], top[1]
    n = a + b + 1
    return sum(math.comb(n, j) for j in range(a + 1)) / 2**n


def dirichlet_leader_probability(counts: Sequence[int], draws: int = 4000, seed: int = 0,
                                 top: int = DIRICHLET_TOP) -> float:
    """Adaptive-Consistency's Dirichlet rule: P(the leading answer's share is the largest) for shares ~
    Dirichlet(counts + 1) over the ``top`` most common answers (the paper's 5), by Monte Carlo with a fixed seed
    (Gamma draws: the normalisation does not change which share is largest). With two answers it equals the Beta
    rule up to Monte Carlo error (about 0.008 at 4000 draws)."""
    c = np.asarray(_leading(counts)[:max(2, top)], dtype=np.float64)
    if c.size < 2:
        c = np.concatenate((c, np.zeros(2 - c.size)))
    gammas = np.random.default_rng(seed).gamma(c + 1.0, size=(draws, c.size))
    return float(np.mean(gammas[:, 0] > gammas[:, 1:].max(axis=1)))


def _counts(answers: Sequence[str | None]) -> list[int]:
    return [n for _, n in Counter(a for a in answers if a is not None).most_common()]


def should_stop(rule: str, answers: Sequence[str | None], window_answers: Sequence[str | None],
                confidence: float) -> bool:
    """Whether to stop sampling after a window. ``answers``: every sample's answer so far; ``window_answers``: the
    latest window's. ``unanimous`` (ESC): the latest window is unanimous; ``beta`` (Adaptive-Consistency): the
    Beta rule (two distinct answers or fewer) or the Dirichlet rule (more) gives the leader >= ``confidence``;
    ``none``: never stops early. None answers count for nothing; with no answer at all, never stop."""
    if rule not in STOP_RULES:
        raise ValueError(f"unknown stopping rule {rule!r}: expected one of {', '.join(STOP_RULES)}")
    if rule == "none":
        return False
    if rule == "unanimous":
        return unanimous(window_answers)
    counts = _counts(answers)
    if not counts:
        return False
    if len(counts) <= 2:
        return beta_leader_probability(counts) >= confidence
    return dirichlet_leader_probability(counts) >= confidence


def escalate(answers: Sequence[str | None], confs: Sequence[float], gate_conf: float, rule: str,
             confidence: float) -> bool:
    """A cascade's step (MoT, ModelSwitch): hand the question to the next member when this member's window does
    not settle it under ``rule`` (with ``none``, it never does) or its mean trace confidence is below
    ``gate_conf`` (no confidences at all: escalate)."""
    if not should_stop(rule, answers, answers, confidence):
        return True
    return len(confs) == 0 or float(np.mean(confs)) < gate_conf


# ---------------------------------------------------------------- weighting and filtering (CISC, DeepConf)


def confidence_weights(confs: Sequence[float], temperature: float) -> np.ndarray:
    """CISC's vote weights: softmax(confidence / T) over the samples (max-subtracted, so stable). T -> 0 gives
    the most confident sample(s) all the weight, T -> inf equal weights."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(confs, dtype=np.float64) / temperature
    if z.size == 0:
        return z
    e = np.exp(z - z.max())
    return e / e.sum()


def keep_most_confident(confs: Sequence[float], keep_percent: float) -> np.ndarray:
    """DeepConf's offline filter as a mask: the ceil(keep_percent % of n) most confident samples, at least one
    (samples tied with the last one kept are kept too). 100 keeps all."""
    if not 0 < keep_percent <= 100:
        raise ValueError(f"keep_percent must be in (0, 100], got {keep_percent}")
    c = np.asarray(confs, dtype=np.float64)
    if c.size == 0:
        return np.zeros(0, dtype=bool)
    k = max(1, math.ceil(c.size * keep_percent / 100 - 1e-9))
    return c >= np.sort(c)[::-1][k - 1]


@dataclass
class Tally:
    """One answer of a vote, for display: how many samples gave it, their total weight, and which they were."""

    answer: str
    votes: int = 0
    weight: float = 0.0
    members: list[int] = field(default_factory=list)


def tally(answers: Sequence[str | None], weights: Sequence[float]) -> list[Tally]:
    """Per-answer totals, heaviest first (then most votes, then first seen); None answers are left out."""
    if len(answers) != len(weights):
        raise ValueError(f"tally needs one weight per answer, got {len(answers)} answers and {len(weights)} weights")
    rows: dict[str, Tally] = {}
    for i, (a, w) in enumerate(zip(answers, weights)):
        if a is not None:
            row = rows.setdefault(a, Tally(a))
            row.votes += 1
            row.weight += float(w)
            row.members.append(i)
    return sorted(rows.values(), key=lambda t: (-t.weight, -t.votes, t.members[0]))


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float],
                  tiebreak: Sequence[float]) -> int | None:
    """Index of the sample to return: the answer with the largest total weight wins (None answers never do; ties
    between answers go to the one holding the best ``tiebreak``, e.g. confidence), and within it the sample with
    the best tiebreak (the first on a tie). None if no sample has an answer."""
    if not len(answers) == len(weights) == len(tiebreak):
        raise ValueError("weighted_vote needs one weight and one tiebreak per answer")
    rows = tally(answers, weights)
    if not rows:
        return None
    best = {t.answer: max(tiebreak[i] for i in t.members) for t in rows}
    winner = max(rows, key=lambda t: (t.weight, best[t.answer]))
    return max(winner.members, key=lambda i: (tiebreak[i], -i))


# ---------------------------------------------------------------- free text (Universal SC / MBR)

CHRF_ORDER = 6  # chrF's character n-grams, 1..6


def _ngrams(text: str, order: int = CHRF_ORDER) -> list[Counter[str]]:
    s = "".join(text.split())  # chrF ignores whitespace
    return [Counter(s[i:i + n] for i in range(len(s) - n + 1)) for n in range(1, order + 1)]


def _chrf(a: list[Counter[str]], b: list[Counter[str]]) -> float:
    """chrF with beta = 1 over n-gram orders both texts have (sacrebleu's effective order); 1 for two empty
    texts, 0 when only one is empty."""
    scores = []
    for x, y in zip(a, b):
        nx, ny = x.total(), y.total()
        if nx == 0 or ny == 0:
            continue
        small, large = (x, y) if len(x) <= len(y) else (y, x)
        match = sum(min(n, large[g]) for g, n in small.items() if g in large)
        scores.append(2 * match / (nx + ny))  # F1 = 2PR / (P + R) with P = match / nx, R = match / ny
    if not scores:
        return 1.0 if a[0].total() == b[0].total() == 0 else 0.0
    return sum(scores) / len(scores)


def text_similarity(a: str, b: str) -> float:
    """Character n-gram F-score of two texts (chrF, n = 1..6, beta = 1, whitespace ignored), in [0, 1]:
    symmetric, 1 for identical texts, 0 for texts without a character in common."""
    return _chrf(_ngrams(a), _ngrams(b))


def consensus_index(texts: Sequence[str], weights: Sequence[float] | None = None) -> int:
    """Universal Self-Consistency / MBR: index of the sample with the highest weighted mean similarity to the
    other samples (their weights; equal without ``weights``). Ties go to the lowest index; one text -> 0."""
    n = len(texts)
    if n == 0:
        raise ValueError("consensus_index needs at least one text")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"consensus_index needs one weight per text, got {w.size} for {n} texts")
    grams = [_ngrams(t) for t in texts]
    sim = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            sim[i, j] = sim[j, i] = _chrf(grams[i], grams[j])
    scores = np.zeros(n)
    for i in range(n):
        others = np.arange(n) != i
        total = w[others].sum()
        scores[i] = float(sim[i, others] @ w[others]) / total if total > 0 else 0.0
    # Exact ties (identical texts) must not be decided by rounding in the sums.
    return int(np.flatnonzero(scores >= scores.max() - 1e-12)[0])
