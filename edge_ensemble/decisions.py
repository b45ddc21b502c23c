"""The small pure decisions of token-level ensembling, on NumPy arrays and byte strings.

Nothing here touches a model: every function is unit-tested on hand-made arrays. Candidates of different
tokenizers are compared as byte strings; end-of-generation is the single shared key :data:`EOG`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

EOG = "<end-of-generation>"  # a str, so it can never collide with a bytes candidate
Key = bytes | str | int  # candidate text, EOG, or a token id when every member shares one tokenizer


# -- distributions ----------------------------------------------------------------------------------------


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities from one row (or rows) of logits, float64 for stable sums."""
    z = np.asarray(logits, dtype=np.float64)
    if temperature != 1.0:
        z = z / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def entropy(probs: np.ndarray) -> float:
    """Shannon entropy in nats."""
    p = probs[probs > 0]
    return float(-(p * np.log(p)).sum())


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and probabilities of the k most likely tokens, most likely first (argpartition, no full sort)."""
    k = min(k, probs.shape[-1])
    idx = np.argpartition(-probs, k - 1)[:k]
    order = np.argsort(-probs[idx], kind="stable")
    idx = idx[order]
    return idx, probs[idx]


# -- gate ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    """Entropy gating: a drafted token is *confident* when its top-1 probability reaches ``min_top1`` and
    (optionally) the distribution's entropy is at most ``max_entropy`` nats. ``min_top1 = None`` disables
    the gate (faithful SAFE: every chunk is verified)."""

    min_top1: float | None = 0.5
    max_entropy: float | None = None

    @property
    def enabled(self) -> bool:
        return self.min_top1 is not None or self.max_entropy is not None

    def confident(self, top1: float, ent: float) -> bool:
        if not self.enabled:
            return False
        if self.min_top1 is not None and top1 < self.min_top1:
            return False
        if self.max_entropy is not None and ent > self.max_entropy:
            return False
        return True


# -- consensus ----------------------------------------------------------------------------------------------


def consensus(p_token: Sequence[float], is_argmax: Sequence[bool], weights: Sequence[float] | None = None) -> bool:
    """SAFE's skip rule for one drafted token: members agree when every one has it as its argmax
    (unanimous) or its weighted mean probability exceeds 0.5 (then it is the ensemble argmax anyway)."""
    if all(is_argmax):
        return True
    p = np.asarray(p_token, dtype=np.float64)
    w = np.full(p.shape, 1.0 / len(p)) if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return float((w * p).sum()) > 0.5


def speculative_accept_probability(p_ens: float, p_draft: float) -> float:
    """Sampling form of the consensus check: accept a drafted token with probability min(1, P_ens/P_draft)."""
    if p_draft <= 0.0:
        return 1.0 if p_ens > 0 else 0.0
    return min(1.0, p_ens / p_draft)


# -- union of candidates ------------------------------------------------------------------------------------


@dataclass
class MemberView:
    """What the union needs from one member at one position.

    ``top``: its top-k candidates as {key: probability}; ``prob_of``: callable giving its probability of any
    other key (UniTE's rule: the probability of the first token of its own tokenization of the string)."""

    top: dict[Key, float]
    prob_of: "callable[[Key], float]"  # type: ignore[valid-type]
    weight: float = 1.0


def union_distribution(views: Sequence[MemberView], *, geometric: bool = False) -> tuple[list[Key], np.ndarray, np.ndarray]:
    """UniTE union: candidates = union of members' top-k (as bytes / EOG); each member's probabilities over
    the union are renormalised, then averaged with the member weights (arithmetic, or geometric mean).

    Returns (keys, P_ens over keys, per-member matrix of shape (members, keys)).
    """
    keys: list[Key] = []
    seen: set[Key] = set()
    for v in views:
        for k in v.top:
            if k not in seen and k != b"":
                seen.add(k)
                keys.append(k)
    mat = np.zeros((len(views), len(keys)), dtype=np.float64)
    for i, v in enumerate(views):
        for j, k in enumerate(keys):
            p = v.top.get(k)
            mat[i, j] = p if p is not None else v.prob_of(k)
    w = np.asarray([v.weight for v in views], dtype=np.float64)
    w = w / w.sum()
    row_sums = mat.sum(axis=1, keepdims=True)
    q = mat / np.where(row_sums > 0, row_sums, 1.0)
    if geometric:
        logq = np.log(np.maximum(q, 1e-12))
        p_ens = np.exp((w[:, None] * logq).sum(axis=0))
    else:
        p_ens = (w[:, None] * q).sum(axis=0)
    total = p_ens.sum()
    p_ens = p_ens / total if total > 0 else np.full(len(keys), 1.0 / max(1, len(keys)))
    return keys, p_ens, q


def sharpen_prefix_mass(keys: Sequence[Key], p_ens: np.ndarray, drafter_top: Mapping[Key, float], lam: float = 0.1,
                        texts: Sequence[Key] | None = None) -> np.ndarray:
    """SAFE's sharpening heuristic, applied only when max P_ens < 0.5: a candidate t with P_ens(t) > lam that
    is in the drafter's top-k receives the mass of every other candidate whose bytes start with t's bytes
    (those continue the same text). The lone-space token and EOG take no part. ``texts`` gives each key's
    bytes when keys are token ids (default: the keys are the bytes). Returns renormalised P."""
    p = np.asarray(p_ens, dtype=np.float64)
    if p.size == 0 or p.max() >= 0.5:
        return p
    texts = keys if texts is None else texts
    out = p.copy()
    for i, (k, t) in enumerate(zip(keys, texts)):
        if not isinstance(t, bytes) or t in (b" ", b"") or p[i] <= lam or k not in drafter_top:
            continue
        for j, u in enumerate(texts):
            if j != i and isinstance(u, bytes) and len(u) > len(t) and u.startswith(t):
                out[i] += p[j]
    return out / out.sum()


def choose(keys: Sequence[Key], p: np.ndarray, rng: np.random.Generator | None = None, *,
           prefer: Key | None = None, tolerance: float = 0.0) -> int:
    """Index of the chosen candidate: argmax (greedy, ties to the earliest = drafter's order) or a sample.

    Greedy with ``prefer`` (the drafted candidate): it stands while its probability is within ``tolerance``
    (relative) of the best one. Overriding a near-tie buys nothing but numerical noise — llama.cpp's batched
    and one-token passes differ by up to ~0.8 in a logit — and costs the rest of the draft."""
    if rng is None:
        best = int(np.argmax(p))
        if prefer is not None and prefer in keys:
            i = list(keys).index(prefer)
            if p[i] >= (1.0 - tolerance) * p[best]:
                return i
        return best
    return int(rng.choice(len(keys), p=p / p.sum()))


# -- sampling -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. temperature 0 = greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def filter_probs(probs: np.ndarray, top_k_: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Apply top-k then nucleus (top-p) filtering and renormalise. Vectorised over the vocabulary."""
    p = np.asarray(probs, dtype=np.float64)
    if top_k_ and 0 < top_k_ < p.size:
        cutoff = np.partition(p, -top_k_)[-top_k_]
        p = np.where(p >= cutoff, p, 0.0)
    if top_p < 1.0:
        order = np.argsort(-p)
        csum = np.cumsum(p[order])
        keep = csum - p[order] < top_p * csum[-1]
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
    return p / p.sum()


def sample_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """Pick a token from one row of logits; returns (token, the probabilities the choice was made from)."""
    if sampling.greedy:
        probs = softmax(logits)
        return int(np.argmax(logits)), probs
    probs = filter_probs(softmax(logits, sampling.temperature), sampling.top_k, sampling.top_p)
    return int(rng.choice(probs.size, p=probs)), probs
