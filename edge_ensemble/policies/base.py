"""What every policy shares: the accepted-piece type, the context a policy runs in, the policy protocol."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol, Sequence

import numpy as np

from ..alignment import is_whole_text
from ..decisions import EOG, Key, MemberView, Sampling, choose, filter_probs, sharpen_prefix_mass, union_distribution
from ..dist import Dist
from ..member import Lane
from ..options import Option

if TYPE_CHECKING:
    from . import PolicyConfig


class ContextFull(Exception):
    """Raised by a policy when a member has no room left: the engine ends with finish_reason 'length'."""


@dataclass
class Piece:
    """One accepted token of the shared text."""

    data: bytes  # the text it adds (b"" for end-of-generation)
    kind: str  # "draft" (drafter's token accepted), "ensemble" (chosen from the union), "single"
    winner: str | None = None  # member whose candidate won an ensembled token
    end: bool = False  # end of generation


# Options every ensembling policy reads (a policy lists the ones it uses in its ``options``).
UNION_K = Option("union_k", int, 10, "Candidates each member adds to the union the ensemble picks from.",
                 range=(1, 1000))
WEIGHTS = Option("weights", tuple, None, "Member weights, one per member, e.g. 2,1.", item=float,
                 range=(0.0, math.inf), above=True, shown_default="equal")


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
    routed: dict[str, int] = field(default_factory=dict)  # route: tokens each expert wrote
    route_decisions: int = 0  # route: tokens the head chose the expert for (all of them unless gated)
    catch_up_tokens: int = 0  # route: lagging tokens an expert fed in bulk when chosen again
    catch_up_calls: int = 0
    catch_up_seconds: float = 0.0


class Policy(Protocol):
    """A decoding strategy. ``start`` runs after the prompts are in the caches; ``step`` returns the next
    accepted pieces (at most ``budget`` of them, at least one)."""

    stats: PolicyStats

    def start(self) -> None: ...

    def step(self, budget: int) -> list[Piece]: ...


class PolicyBase:
    """Helpers for policies: the ensemble decision at one position and drafter token choice.

    A policy works on :class:`~edge_ensemble.member.Lane` objects (one per member for this generation, the
    first one drafting), never on models: everything it asks goes through the lane to the member's backend."""

    # The options this policy reads; the CLI flags, config keys and API keywords derive from them.
    options: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, lanes: Sequence[Lane], config: PolicyConfig, sampling: Sampling, rng: np.random.Generator) -> None:
        self.lanes = list(lanes)
        self.config = config
        self.sampling = sampling
        self.rng = rng
        self.stats = PolicyStats()
        if config.weights is not None:
            for lane, w in zip(self.lanes, config.weights):
                lane.weight = w
        for lane in self.lanes:
            lane.k = config.union_k  # per generation: a call may override the union size
        # When every member shares the drafter's tokenizer, candidates are token ids (set on the lanes).
        self.by_id = all(lane.by_id for lane in self.lanes)
        # A member sharing an earlier member's backend (the same weights listed twice) never decodes: it
        # reads that member's distributions. twin[i] = index of that earlier lane, or None.
        self.twin: list[int | None] = [next((j for j in range(i) if self.lanes[j].backend is lane.backend), None)
                                       for i, lane in enumerate(self.lanes)]

    def union(self, dists: Sequence[Dist], sharpen: bool = True) -> tuple[list[Key], np.ndarray, np.ndarray]:
        """Union distribution of the members' candidates, sharpened as configured (SAFE) or not (UniTE)."""
        views = [
            MemberView(top=lane.top_keys(d), prob_of=(lambda key, lane=lane, d=d: lane.prob_of(d, key)), weight=lane.weight)
            for lane, d in zip(self.lanes, dists)
        ]
        if sharpen and not self.by_id:
            # SAFE across tokenizers compares whole text only: a candidate that starts or stops inside a
            # character (a byte-level fragment) means different things to different vocabularies, and
            # choosing one would push the drafter onto a fragment path (SAFE only asks at positions where the
            # drafted piece is whole text, see alignment.reliable_view).
            for v in views:
                v.top = {k: p for k, p in v.top.items() if k == EOG or is_whole_text(k)}
        keys, p, q = union_distribution(views, geometric=sharpen and self.config.sharpen == "geometric")
        if sharpen and self.config.sharpen == "prefix":
            texts = [k if k == EOG else self.lanes[0].key_bytes(k) for k in keys]
            p = sharpen_prefix_mass(keys, p, views[0].top, self.config.sharpen_lambda, texts)
        return keys, p, q

    def ensemble_choice(self, dists: Sequence[Dist], sharpen: bool = True, prefer: Key | None = None) -> tuple[Key, str]:
        """Pick the ensembled candidate and the member whose candidate it was (highest own probability).
        Greedy: ``prefer`` (the drafted candidate) wins near-ties (``config.tie_tolerance``). Sampling applies
        top-k / top-p to the union distribution."""
        keys, p, q = self.union(dists, sharpen)
        if not keys:  # every member proposed only empty control tokens: end the answer
            return EOG, self.lanes[0].name
        if not self.sampling.greedy:
            p = filter_probs(p, self.sampling.top_k, self.sampling.top_p)
        i = choose(keys, p, None if self.sampling.greedy else self.rng, prefer=prefer, tolerance=self.config.tie_tolerance)
        winner = self.lanes[int(np.argmax(q[:, i]))].name
        return keys[i], winner

    @property
    def temperature(self) -> float:
        """Temperature every member's distribution is taken at (1 when greedy)."""
        return 1.0 if self.sampling.greedy else self.sampling.temperature

    def pick(self, dist: Dist) -> int:
        """A member's own choice at one position: greedy, or sampled after top-k / top-p (then
        ``dist.proposal`` holds the probabilities the choice was drawn from)."""
        s = self.sampling
        if s.greedy:
            return dist.argmax
        dist.proposal = filter_probs(dist.sampling_probs(), s.top_k, s.top_p)
        return int(self.rng.choice(dist.proposal.size, p=dist.proposal))

    def next_dist(self, lane: Lane, tokens: Sequence[int]) -> Dist:
        """``lane``'s distribution after its prompt + ``tokens`` (one feed, the last row read)."""
        target = lane.prompt + list(tokens)
        if len(target) >= lane.backend.n_ctx:
            raise ContextFull
        row = len(target) - 1
        return lane.feed(target, rows=[row], temperature=self.temperature)[row]

