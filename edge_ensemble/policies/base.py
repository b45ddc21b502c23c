"""What a policy is: the plugin base class every policy module fills in, and what policies share.

A policy is one class (a subclass of :class:`Policy`) that declares, in one place:

- ``name`` and a one-line ``summary`` (``--policy NAME``, ``presets``, ``--help``);
- ``Options``: a frozen dataclass whose fields carry their :class:`~edge_ensemble.options.Option` declaration
  (:func:`option`), so the flag, config key, API keyword and server field of each option derive from it; names
  are scoped per policy (two policies may both call an option ``gate``);
- ``Stats``: the figures it counts as it runs (a dataclass the engine passes through, :class:`PolicyStats`);
- capabilities the rest of the program asks instead of comparing names (:attr:`Policy.drafter_only`,
  :attr:`Policy.batchable`, :attr:`Policy.shared_tokenizer`, :attr:`Policy.hidden_states`,
  :attr:`Policy.branches`);
- :meth:`Policy.prepare`, run once per loaded ensemble (reading and checking a file it needs), and
  :meth:`Policy.load_needs` (what the members' contexts must hold);
- the generation: :meth:`Policy.start` then :meth:`Policy.generate`, which yields the accepted pieces of each
  step (a branching policy returns whole answers from :meth:`Policy.run_branches` instead);
- ``eval_configs``: the named configurations ``edge-ensemble eval --configs`` offers for it.

The registry (:mod:`edge_ensemble.policies.registry`) holds the policy classes; nothing outside ``policies/``
names one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import numpy as np

from ..alignment import is_whole_text
from ..decisions import EOG, Key, MemberView, Sampling, choose, filter_probs, sharpen_prefix_mass, union_distribution
from ..dist import Dist
from ..member import Lane
from ..options import Option, declarations, option  # noqa: F401  (re-exported: a policy's Options use them)

@dataclass(frozen=True)
class NoOptions:
    """The options of a policy that has none."""


class ContextFull(Exception):
    """Raised by a policy when a member has no room left: the engine ends with finish_reason 'length'."""


@dataclass(frozen=True)
class TokenLogprob:
    """An emitted token as the model that wrote it scored it: its text, its log-probability (natural log, under
    that model's own distribution at that position: temperature 1, before top-k / top-p) and that model's
    likeliest tokens there with theirs, likeliest first (as many as asked)."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


# The log-probability reported for a token a model gave no probability (a remote member's unreported tail), as
# OpenAI reports one too small to show: JSON has no -Infinity.
UNKNOWN_LOGPROB = -9999.0


def token_logprob(lane: Lane, dist: Any, token: int, alternatives: int, temperature: float = 1.0,
                  text: bytes | None = None) -> TokenLogprob:
    """``token`` (an id of ``lane``'s model; -1: none of its tokens) as that model scored it in ``dist`` (a
    distribution taken at ``temperature``), with its ``alternatives`` likeliest tokens: one log-softmax and one
    partial sort of the row already read. ``text``: the emitted text it stands for (default: the token's own)."""
    member = lane.member
    if text is None:
        text = member.token_bytes(token)
    logits = getattr(dist, "logits", None)
    if logits is None:  # a top-n distribution (a remote member): what it reported
        ids, probs = dist.top(alternatives) if alternatives else ((), ())
        p = float(dist.prob(token)) if token >= 0 else 0.0
        lp = math.log(p) if p > 0 else UNKNOWN_LOGPROB
        return TokenLogprob(text, lp, tuple(
            (member.token_bytes(int(i)), math.log(float(q)) if q > 0 else UNKNOWN_LOGPROB)
            for i, q in zip(ids, probs)))
    row = np.asarray(logits, dtype=np.float64)
    if temperature > 0 and temperature != 1.0:
        row = row * temperature  # the model's own logits (FullDist divided them by the temperature)
    m = float(row.max())
    lse = m + math.log(float(np.exp(row - m).sum()))
    top: tuple[tuple[bytes, float], ...] = ()
    if alternatives > 0:
        k = min(alternatives, row.size)
        ids = np.argpartition(row, -k)[-k:]
        ids = ids[np.argsort(-row[ids], kind="stable")]
        top = tuple((member.token_bytes(int(i)), float(row[i]) - lse) for i in ids)
    return TokenLogprob(text, float(row[token]) - lse if token >= 0 else UNKNOWN_LOGPROB, top)


@dataclass
class Piece:
    """One accepted token of the shared text."""

    data: bytes  # the text it adds (b"" for end-of-generation)
    kind: str  # "draft" (drafter's token accepted), "ensemble" (chosen from the union), "single", "route"
    winner: str | None = None  # member whose candidate won an ensembled token (route: the expert that wrote it)
    end: bool = False  # end of generation
    logprob: TokenLogprob | None = None  # how the model that wrote it scored it (only when the call asks)
    # where the ensemble chose another token than the drafter's: the drafter's own text (b"": it would have ended)
    drafted: bytes | None = None


@dataclass
class Progress:
    """What a branching policy reports while it runs (its ``run_branches`` may be a generator of these): the
    text of a first answer as it is written (``kind`` "text", bytes, by ``member``), or a one-line ``status``
    (e.g. "checking: window 2, ..."). The engine passes them on only when the call asks for a preview."""

    kind: str  # "text" or "status"
    data: bytes | str
    member: str | None = None


@dataclass
class PolicyStats:
    """What a policy counts as it runs. ``ensembled`` (tokens chosen by more than one member) is every policy's,
    for E/T; a policy subclasses this with its own counters and says in :meth:`figures` how they are reported."""

    ensembled: int = 0

    def figures(self, tokens: int) -> dict[str, Any]:
        """The policy's own figures of an answer of ``tokens`` tokens, by their public names (JSON keys)."""
        return {}

    def summary(self, figures: dict[str, Any]) -> list[str]:
        """Parts of the one-line footer after an answer, from :meth:`figures`'s output."""
        return []


@dataclass(frozen=True)
class MemberFile:
    """What a policy may know of a member before the models load (for :meth:`Policy.prepare`)."""

    name: str
    path: Path | None  # the local GGUF (a server member: the file its tokenizer is read from; None: no file)
    remote: bool = False  # a model in a running llama-server


@dataclass(frozen=True)
class LoadNeeds:
    """What the members' contexts must be loaded with for one answer of a policy."""

    sequences: int = 1  # sequences each member's context needs per answer (branches)
    hidden_states: frozenset[int] = frozenset()  # members (by index) whose contexts output hidden states


@dataclass(frozen=True)
class SecondPass:
    """An eval configuration that re-spends, on a second pass, the budget another configuration (``builds_on``)
    saved over the run's items (EAGER-adapt): ``cap(options)`` is the most sequences an item's first pass may
    use, ``retry(options, extra)`` the option values an item given ``extra`` more sequences is rerun with."""

    builds_on: str
    cap: Callable[[Any], int]
    retry: Callable[[Any, int], dict[str, Any]]


@dataclass(frozen=True)
class EvalConfig:
    """A named configuration ``edge-ensemble eval`` offers for a policy: its options over the run's base config."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)  # option values over the base (this policy's)
    drafter_only: bool = False  # over the first member alone (else every member)
    each_member: bool = False  # run for each member alone, named NAME:<member> (NAME: all of them)
    by_default: bool = True  # part of the run when --configs is not given
    sampling: dict[str, Any] = field(default_factory=dict)  # per-call generation options (e.g. temperature)
    load: dict[str, Any] = field(default_factory=dict)  # options the shared ensemble is loaded with (once)
    needs_members: int = 1  # the fewest members it makes sense with
    min_n_ctx: int = 0  # the ensemble is loaded with at least this context
    record_settings: tuple[str, ...] = ()  # option values kept in each record (told apart from other settings)
    requires: dict[str, str] = field(default_factory=dict)  # option -> the message when it is not given
    second_pass: SecondPass | None = None


# Options every ensembling policy reads (a policy lists the ones it uses in its ``Options``).
UNION_K = Option("union_k", int, 10, "Candidates each member adds to the union the ensemble picks from.",
                 range=(1, 1000))
WEIGHTS = Option("weights", tuple, None, "Member weights, one per member, e.g. 2,1.", item=float,
                 range=(0.0, math.inf), above=True, shown_default="equal")


class Policy:
    """A decoding strategy over :class:`~edge_ensemble.member.Lane` objects (one per member for this generation,
    the first one drafting). It never touches a model: everything it asks goes through a lane to its backend.

    A subclass sets the class attributes below and implements :meth:`start` and :meth:`step` (or, for a
    branching policy, :meth:`run_branches`); it is registered with
    :func:`edge_ensemble.policies.registry.register` (built-ins) or an entry point in the group
    ``edge_ensemble.policies`` (third parties)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    Stats: ClassVar[type[PolicyStats]] = PolicyStats

    # Capabilities: what the engine, the API, the server and eval ask instead of a policy's name.
    drafter_only: ClassVar[bool] = False  # only the first member takes part (the others are not even loaded)
    batchable: ClassVar[bool] = True  # its answers may be decoded side by side with others (eval --parallel)
    shared_tokenizer: ClassVar[bool] = False  # every member must use the drafter's token ids
    hidden_states: ClassVar[bool] = False  # it reads a member's hidden states (set up when the models load)
    branches: ClassVar[bool] = False  # it makes several answers and votes (run_branches, not step)
    local_only: ClassVar[str] = ""  # why it runs local models only (empty: a member may be in a llama-server)
    max_logits_rows: ClassVar[int] = 1  # the most logits rows one decode asks for, whatever the options (memory)
    # It reports, when a call asks (``top_logprobs`` not None), each emitted token's log-probability as the model
    # that wrote it scored it (:class:`TokenLogprob` on its pieces).
    logprobs: ClassVar[bool] = False
    # How a branching policy picks among answers that carry no extracted answer, as ``--show``'s summary says it
    # (None: the branch with the best mean log-probability, EAGER's choice).
    text_choice: ClassVar[str | None] = None
    eval_configs: ClassVar[tuple[EvalConfig, ...]] = ()

    # -- once per loaded ensemble --------------------------------------------------------------------------

    @classmethod
    def check(cls, options: Any, n_members: int, where: Any = str) -> None:
        """Refuse option values that are wrong together (each alone is checked by its declaration); ``where(name)``
        names an option as the user wrote it."""

    @classmethod
    def prepare(cls, options: Any, members: Sequence[MemberFile]) -> Any:
        """What the policy reads once per loaded ensemble, before the models load (a trained head), checked
        against the members' files; passed to every answer's policy object as ``prepared``."""
        return None

    @classmethod
    def load_needs(cls, options: Any, n_members: int, prepared: Any) -> LoadNeeds:
        """What the members' contexts need for one answer with these options."""
        return LoadNeeds()

    # -- one answer ----------------------------------------------------------------------------------------

    def __init__(self, lanes: Sequence[Lane], options: Any, sampling: Sampling, rng: np.random.Generator,
                 prepared: Any = None) -> None:
        self.lanes = list(lanes)
        self.options = options
        self.sampling = sampling
        self.rng = rng
        self.prepared = prepared
        self.stats = self.Stats()
        # Alternatives per token the call asked log-probabilities for (None: none asked; the engine sets it, and
        # only a policy with the ``logprobs`` capability is asked).
        self.top_logprobs: int | None = None
        # A branching policy's answer extractor (an eval task's; None: the policy's own, or free text) and the
        # call's stop strings (the engine sets both).
        self.extract: Callable[[str], str | None] | None = None
        self.stop: tuple[str, ...] = ()
        weights = getattr(options, "weights", None)
        if weights is not None:
            for lane, w in zip(self.lanes, weights):
                lane.weight = w
        union_k = getattr(options, "union_k", UNION_K.default)
        for lane in self.lanes:
            lane.k = union_k  # per generation: a call may override the union size
        # When every member shares the drafter's tokenizer, candidates are token ids (set on the lanes).
        self.by_id = all(lane.by_id for lane in self.lanes)
        # A member sharing an earlier member's backend (the same weights listed twice) never decodes: it
        # reads that member's distributions. twin[i] = index of that earlier lane, or None.
        self.twin: list[int | None] = [next((j for j in range(i) if self.lanes[j].backend is lane.backend), None)
                                       for i, lane in enumerate(self.lanes)]

    def start(self) -> None:
        """Runs after the lanes are open, before the first step (prefills are timed as the prompt's)."""

    def step(self, budget: int) -> list[Piece]:
        """The next accepted pieces: at least one, at most ``budget``."""
        raise NotImplementedError(f"policy {self.name} makes whole answers (run_branches), not steps")

    def generate(self, max_tokens: int) -> Iterator[list[Piece]]:
        """The pieces each step accepts, until ``max_tokens`` or an end piece (the caller may stop earlier). May
        raise :class:`ContextFull`."""
        emitted = 0
        while emitted < max_tokens:
            pieces = self.step(max_tokens - emitted)
            emitted += len(pieces)
            yield pieces
            if any(p.end for p in pieces):
                return

    def run_branches(self, max_tokens: int, deadline: float = float("inf")) -> Any:
        """A branching policy's whole answers (objects with the fields of :class:`~edge_ensemble.engine.BranchInfo`
        the engine reads: index, parent, forked_at, tokens, finish_reason, origin, mean_logprob; optionally
        member and confidence): a list, or a generator that yields :class:`Progress` and returns the list."""
        raise NotImplementedError(f"policy {self.name} does not branch")

    def answer_of(self, text: str) -> str | None:
        """A branch's extracted answer, which votes compare (None: it votes for nothing)."""
        return self.extract(text) if self.extract is not None else None

    def choose(self, answers: Sequence[str | None], texts: Sequence[str], branches: Sequence[Any]) -> int:
        """The index of the branch returned: EAGER's majority vote over extracted answers, ties (and no answers
        at all) to the best mean token log-probability."""
        from ..branching import majority_vote

        return majority_vote(answers, [b.mean_logprob for b in branches])

    def text_of(self, lane: Lane, tokens: Sequence[int]) -> str:
        """A branch's text: its tokens' bytes, cut before the call's first stop string."""
        data = b"".join(lane.member.token_bytes(t) for t in tokens)
        cuts = [i for i in (data.find(s.encode("utf-8")) for s in self.stop if s) if i >= 0]
        if cuts:
            data = data[:min(cuts)]
        return data.decode("utf-8", errors="replace")

    # -- helpers for ensembling policies -------------------------------------------------------------------

    def union(self, dists: Sequence[Dist], sharpen: str | None = None,
              sharpen_lambda: float = 0.0) -> tuple[list[Key], np.ndarray, np.ndarray]:
        """Union distribution of the members' candidates: SAFE's sharpening ``sharpen`` ("prefix", "geometric",
        "none") or none at all (None: UniTE's plain union)."""
        views = [
            MemberView(top=lane.top_keys(d), prob_of=(lambda key, lane=lane, d=d: lane.prob_of(d, key)), weight=lane.weight)
            for lane, d in zip(self.lanes, dists)
        ]
        if sharpen is not None and not self.by_id:
            # SAFE across tokenizers compares whole text only: a candidate that starts or stops inside a
            # character (a byte-level fragment) means different things to different vocabularies, and
            # choosing one would push the drafter onto a fragment path (SAFE only asks at positions where the
            # drafted piece is whole text, see alignment.reliable_view).
            for v in views:
                v.top = {k: p for k, p in v.top.items() if k == EOG or is_whole_text(k)}
        keys, p, q = union_distribution(views, geometric=sharpen == "geometric")
        if sharpen == "prefix":
            texts = [k if k == EOG else self.lanes[0].key_bytes(k) for k in keys]
            p = sharpen_prefix_mass(keys, p, views[0].top, sharpen_lambda, texts)
        return keys, p, q

    def ensemble_choice(self, dists: Sequence[Dist], sharpen: str | None = None, sharpen_lambda: float = 0.0,
                        prefer: Key | None = None, tolerance: float = 0.0) -> tuple[Key, str]:
        """Pick the ensembled candidate and the member whose candidate it was (highest own probability).
        Greedy: ``prefer`` (the drafted candidate) wins near-ties (``tolerance``). Sampling applies top-k / top-p
        to the union distribution."""
        keys, p, q = self.union(dists, sharpen, sharpen_lambda)
        if not keys:  # every member proposed only empty control tokens: end the answer
            return EOG, self.lanes[0].name
        if not self.sampling.greedy:
            p = filter_probs(p, self.sampling.top_k, self.sampling.top_p)
        i = choose(keys, p, None if self.sampling.greedy else self.rng, prefer=prefer, tolerance=tolerance)
        winner = self.lanes[int(np.argmax(q[:, i]))].name
        return keys[i], winner

    def scored(self, lane: Lane, dist: Any, token: int, text: bytes | None = None) -> TokenLogprob | None:
        """``token`` (an id of ``lane``'s model) as that model scored it in ``dist``, when the call asked for
        log-probabilities; ``text``: the emitted text it stands for, when not the token's own."""
        if self.top_logprobs is None:
            return None
        return token_logprob(lane, dist, token, self.top_logprobs, self.temperature, text)

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
