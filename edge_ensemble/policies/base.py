"""What every policy shares: the accepted-piece type, the context a policy runs in, the policy protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from ..decisions import EOG, Gate, Key, MemberView, Sampling, choose, filter_probs, sharpen_prefix_mass, union_distribution
from ..member import Dist, Member


class ContextFull(Exception):
    """Raised by a policy when a member has no room left: the engine ends with finish_reason 'length'."""


@dataclass
class Piece:
    """One accepted token of the shared text."""

    data: bytes  # the text it adds (b"" for end-of-generation)
    kind: str  # "draft" (drafter's token accepted), "ensemble" (chosen from the union), "single"
    winner: str | None = None  # member whose candidate won an ensembled token
    end: bool = False  # end of generation


@dataclass(frozen=True)
class PolicyConfig:
    """Knobs of the ensemble policies (validated at the edge)."""

    draft_len: int = 5  # SAFE: tokens the drafter proposes per cycle
    gate: Gate = field(default_factory=Gate)  # entropy gating; Gate(None) = faithful SAFE
    top_k: int = 10  # UniTE candidate union
    sharpen: str = "prefix"  # "prefix" (paper's heuristic), "geometric" (geometric mean), "none"
    sharpen_lambda: float = 0.1
    weights: tuple[float, ...] | None = None  # per member; None = equal
    # A verifier "agrees" with a drafted token within this relative margin of its own top probability:
    # batched verification and one-token drafting differ numerically, so exact near-ties can flip.
    tie_tolerance: float = 0.1


@dataclass
class PolicyStats:
    """Counts a policy keeps as it runs."""

    drafted: int = 0
    accepted_drafts: int = 0
    ensembled: int = 0
    overrides: int = 0  # ensembled tokens that differ from what the drafter / primary would have chosen
    verification_calls: int = 0
    verified_positions: int = 0
    unreliable: int = 0  # positions to check that no verifier could be asked about reliably


class Policy(Protocol):
    """A decoding strategy. ``start`` runs after the prompts are in the caches; ``step`` returns the next
    accepted pieces (at most ``budget`` of them, at least one)."""

    stats: PolicyStats

    def start(self) -> None: ...

    def step(self, budget: int) -> list[Piece]: ...


class PolicyBase:
    """Helpers for policies: the ensemble decision at one position and drafter token choice."""

    def __init__(self, members: Sequence[Member], config: PolicyConfig, sampling: Sampling, rng: np.random.Generator) -> None:
        self.members = list(members)
        self.config = config
        self.sampling = sampling
        self.rng = rng
        self.stats = PolicyStats()
        w = config.weights or tuple(1.0 for _ in members)
        for m, wi in zip(self.members, w):
            m.weight = wi
        # Members with the drafter's tokenizer follow its token ids; when all do, candidates are token ids.
        drafter = self.members[0]
        shared = [m.tokenizer_id == drafter.tokenizer_id for m in self.members]
        self.by_id = all(shared)
        for i, (m, s) in enumerate(zip(self.members, shared)):
            m.align(follows_drafter=s and i > 0, by_id=self.by_id)
        # A member sharing an earlier member's loaded model (the same weights listed twice) never decodes: it
        # reads that member's distributions. twin[i] = index of that earlier member, or None.
        self.twin: list[int | None] = [next((j for j in range(i) if self.members[j].model is m.model), None)
                                       for i, m in enumerate(self.members)]

    def union(self, dists: Sequence[Dist], sharpen: bool = True) -> tuple[list[Key], np.ndarray, np.ndarray]:
        """Union distribution of the members' candidates, sharpened as configured (SAFE) or not (UniTE)."""
        views = [
            MemberView(top=m.top_keys(d), prob_of=(lambda key, m=m, d=d: m.prob_of(d, key)), weight=m.weight)
            for m, d in zip(self.members, dists)
        ]
        keys, p, q = union_distribution(views, geometric=sharpen and self.config.sharpen == "geometric")
        if sharpen and self.config.sharpen == "prefix":
            texts = [k if k == EOG else self.members[0].key_bytes(k) for k in keys]
            p = sharpen_prefix_mass(keys, p, views[0].top, self.config.sharpen_lambda, texts)
        return keys, p, q

    def ensemble_choice(self, dists: Sequence[Dist], sharpen: bool = True, prefer: Key | None = None) -> tuple[Key, str]:
        """Pick the ensembled candidate and the member whose candidate it was (highest own probability).
        Greedy: ``prefer`` (the drafted candidate) wins near-ties (``config.tie_tolerance``). Sampling applies
        top-k / top-p to the union distribution."""
        keys, p, q = self.union(dists, sharpen)
        if not keys:  # every member proposed only empty control tokens: end the answer
            return EOG, self.members[0].name
        if not self.sampling.greedy:
            p = filter_probs(p, self.sampling.top_k, self.sampling.top_p)
        i = choose(keys, p, None if self.sampling.greedy else self.rng, prefer=prefer, tolerance=self.config.tie_tolerance)
        winner = self.members[int(np.argmax(q[:, i]))].name
        return keys[i], winner

    @property
    def temperature(self) -> float:
        """Temperature every member's distribution is taken at (1 when greedy)."""
        return 1.0 if self.sampling.greedy else self.sampling.temperature

    def pick(self, member: Member, logits: np.ndarray | None, dist: Dist | None = None) -> tuple[int, Dist]:
        """A member's own choice at one position (greedy, or sampled after top-k / top-p) and its
        distribution; when sampling, ``dist.proposal`` holds the probabilities the choice was drawn from."""
        s = self.sampling
        if dist is None:
            dist = member.dist(logits, self.temperature)
        if s.greedy:
            return dist.argmax, dist
        dist.proposal = filter_probs(dist.probs, s.top_k, s.top_p)
        return int(self.rng.choice(dist.proposal.size, p=dist.proposal)), dist
