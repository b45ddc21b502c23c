"""The generation loop: prompts in, a stream of events out, with stops, UTF-8-safe text and statistics.

This is the single place where a policy runs (its class from :mod:`edge_ensemble.policies.registry`) and where
its accepted pieces turn into text. Every policy's answer streams as the same :class:`Event` type; a branching
policy's answers are voted here.
"""

from __future__ import annotations

import copy
import inspect
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Generator, Iterator, Mapping, Sequence

import numpy as np

from .decisions import Sampling
from .errors import ContextOverflowError, UsageError
from .member import Lane, Member
from .options import GENERATION
from .policies import DEFAULT_POLICY, ContextFull, MemberFile, Piece, Policy, TokenLogprob, registry
from .text_stream import Scores, TextStream


@dataclass
class Span:
    """A stretch of the answer and where it came from."""

    kind: str  # the Piece kinds that made it (policies/base.py Piece.kind); winner: the member that wrote or won it
    text: str
    winner: str | None = None


# Figures every answer reported before each policy counted its own (stats JSON, scripts reading them): an answer
# of a policy that does not count one reports it at this value, so `run --json`, the server and eval records keep
# their keys. A new policy's figures are its own (PolicyStats.figures), not added here.
COMPAT_FIGURES: dict[str, Any] = {
    "drafted_tokens": 0, "draft_acceptance_rate": None, "overridden_tokens": 0, "verification_calls": 0,
    "unreliable_positions": 0, "routed_tokens": {}, "route_decisions": 0, "catch_up_tokens": 0, "catch_up_seconds": 0.0,
}


@dataclass
class GenerationStats:
    """Figures of one generation: those of every policy, and the policy's own (:attr:`policy_stats`, e.g.
    SAFE's ``draft_acceptance_rate`` or route's ``routed_tokens``), readable as attributes too."""

    policy: str
    members: list[str]
    tokens: int = 0  # accepted tokens (drafter-side count: one per drafted or ensembled token)
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    tokens_per_second: float = 0.0
    ensembled_tokens: int = 0  # tokens more than one member chose
    ensembled_fraction: float = 0.0  # E/T
    shared_tokenizer: dict[str, bool] = field(default_factory=dict)  # member -> uses the drafter's token ids
    member_decode_seconds: dict[str, float] = field(default_factory=dict)
    member_decoded_tokens: dict[str, int] = field(default_factory=dict)
    peak_memory_mb: float = 0.0
    branches: int = 0  # answers a branching policy generated; 0 for the others
    generated_tokens: int = 0  # tokens decoded across all branches, shared prefixes once; ``tokens``: the chosen one's
    policy_stats: dict[str, Any] = field(default_factory=dict)  # the policy's own figures (PolicyStats.figures)

    def __getattr__(self, name: str) -> Any:
        # (only called for names that are not fields: the policy's own figures, then the figures every answer
        # reported before policies had their own, at their "nothing happened" value)
        figures = self.__dict__.get("policy_stats") or {}
        if name in figures:
            return figures[name]
        if name in COMPAT_FIGURES:
            return copy.copy(COMPAT_FIGURES[name])
        raise AttributeError(f"{type(self).__name__} of policy {self.__dict__.get('policy')!r} has no {name!r}")

    def figure(self, name: str, default: Any = None) -> Any:
        """A policy's own figure, or ``default`` when this policy does not report it."""
        return self.policy_stats.get(name, default)

    def summary(self) -> list[str]:
        """The policy's own parts of the footer line (e.g. ``drafts accepted 93%``)."""
        return registry.get(self.policy).Stats().summary(self.policy_stats) if self.policy in registry.names() else []

    def to_dict(self) -> dict:
        out = asdict(self)
        # the policy's figures at the top level, as every key is, after the figures every answer used to report
        out.update({**copy.deepcopy(COMPAT_FIGURES), **out.pop("policy_stats")})
        return out


@dataclass
class Event:
    """One step of a stream: newly printable text and where it came from. The last event has
    ``finish_reason`` set and carries the :class:`GenerationResult`."""

    text: str
    kind: str
    winner: str | None = None
    finish_reason: str | None = None
    result: "GenerationResult | None" = None
    # (GenerationOptions.preview) text of a first answer that a vote may still replace; kind "status" events
    # carry a line about the run instead of answer text
    provisional: bool = False
    # (asked for log-probabilities) the tokens whose text this event completes (a token whose text is held back,
    # e.g. while it could still become a stop string, comes with the event that prints it)
    logprobs: "list[TokenLogprob] | None" = None
    # the accepted pieces since the previous event, in order (their text is this event's, less what is held back
    # or cut by a stop string): who wrote each token, for a client that shows it (the server's provenance)
    pieces: "list[Piece]" = field(default_factory=list)


@dataclass
class GenerationResult:
    """A finished generation."""

    text: str
    finish_reason: str  # "stop" (end of generation or a stop string), "length" (max_tokens or context full)
    stats: GenerationStats
    provenance: list[Span]
    branches: list["BranchInfo"] = field(default_factory=list)  # every answer of a branching policy (eager)
    # (asked for log-probabilities) each token of the text, as the model that wrote it scored it
    logprobs: "list[TokenLogprob] | None" = None

    def to_dict(self) -> dict:
        out = {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
            "provenance": [asdict(s) for s in self.provenance],
        }
        if self.branches:
            out["branches"] = [asdict(b) for b in self.branches]
        if self.logprobs is not None:
            out["logprobs"] = [{"token": t.token.decode("utf-8", errors="replace"), "logprob": t.logprob,
                                "top": [[a.decode("utf-8", errors="replace"), lp] for a, lp in t.top]}
                               for t in self.logprobs]
        return out


@dataclass
class BranchInfo:
    """One answer of a branching run: its text, where it forked from, what it answered and how it voted."""

    index: int
    text: str
    tokens: int
    finish_reason: str
    parent: int | None  # the branch it forked from (None for the first)
    forked_at: int  # token index in the parent's answer where it forked
    origin: str  # "root", "entropy" (EAGER's top-2 fork), "ensemble" (the members' alternative); a vote's "first", "sample"
    mean_logprob: float
    answer: str | None = None  # the extracted answer (None: no extractor, or nothing found)
    votes: int = 0  # branches that gave the same answer (itself included)
    chosen: bool = False
    member: str | None = None  # the member that wrote it (a vote's samples may come from several)
    confidence: float | None = None  # a vote's trace confidence (DeepConf's lowest window mean)


@dataclass(frozen=True)
class GenerationOptions:
    """Per-call settings, validated at the edge."""

    max_tokens: int = GENERATION["max_tokens"].default
    stop: tuple[str, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    # A branching policy votes over the answers this extracts (an eval task's extractor); None = free text,
    # where the branch with the best mean token log-probability is chosen.
    extract: Callable[[str], str | None] | None = None
    time_limit: float | None = None  # seconds from the start (prompt included), then finish_reason "length"
    # False: the answer's cells are freed at its end, so the next answer prefills its prompt from scratch (what a
    # fair benchmark of answers decoded side by side needs; reset_cache() does it for the whole ensemble).
    keep_cache: bool = True
    # Each token's log-probability and this many alternatives (None: not asked; a policy with the ``logprobs``
    # capability only).
    logprobs: int | None = None
    # Stream what a branching policy reports while it runs (a vote's first answer as it is written, status
    # lines) as provisional / "status" events before the final answer: for a terminal, not for an API stream.
    preview: bool = False


UNPREPARED: Any = object()  # generate_events was not given what the policy prepared: it prepares for this answer


def member_files(members: Sequence[Member]) -> list[MemberFile]:
    """What :meth:`Policy.prepare` may know of loaded members."""
    return [MemberFile(m.name, getattr(getattr(m.backend, "model", None), "path", None),
                       remote=not hasattr(m.backend, "feed_hidden")) for m in members]


def open_lanes(members: Sequence[Member], messages: Sequence[dict[str, str]] | None = None, *,
               raw: str | None = None) -> list[Lane]:
    """One lane per member for a new generation: the prompt in each member's own template (or ``raw`` text
    tokenized by each member itself, no template), checked against its context.

    Members with the drafter's tokenizer follow its token ids; when all of them do, candidates are token ids.
    A member whose backend is an earlier member's (the same weights listed twice) shares that lane's sequence.
    """
    drafter = members[0]
    shared = [m.tokenizer_id == drafter.tokenizer_id for m in members]
    by_id = all(shared)
    lanes: list[Lane] = []
    try:
        for i, m in enumerate(members):
            twin = next((lane for lane in lanes if lane.backend is m.backend), None)
            if twin is not None:
                prompt = list(twin.prompt)
            else:
                prompt = m.backend.raw_prompt(raw) if raw is not None else m.backend.chat_prompt(messages or [])
            if len(prompt) + 1 >= m.backend.n_ctx:
                raise ContextOverflowError(
                    f"the prompt is {len(prompt)} tokens for {m.name} but its context holds {m.backend.n_ctx}; "
                    "raise --n-ctx or shorten the prompt"
                )
            lanes.append(m.open_lane(prompt, follows_drafter=shared[i] and i > 0, by_id=by_id, twin_of=twin))
    except BaseException:
        close_lanes(lanes)
        raise
    return lanes


def close_lanes(lanes: Sequence[Lane], *, keep_cache: bool = True) -> None:
    """Give every lane's sequence back (cells kept for the next generation's shared prefix unless
    ``keep_cache`` is False)."""
    for lane in lanes:
        lane.close(keep_cache=keep_cache)


def generate_events(
    members: Sequence[Member],
    messages: Sequence[dict[str, str]] | None = None,
    *,
    raw: str | None = None,
    policy: str = DEFAULT_POLICY,
    policy_options: Any = None,
    prepared: Any = UNPREPARED,
    options: GenerationOptions = GenerationOptions(),
) -> Iterator[Event]:
    """Stream one answer to a conversation (``messages``) or a continuation of ``raw`` text. ``policy_options``:
    the policy's ``Options`` (or a mapping of option values, checked here; None: its defaults); ``prepared``: what
    :meth:`Policy.prepare` read once for the loaded ensemble (not given: prepared here, for this answer). The generator may be closed early (Ctrl-C): its
    lanes are given back, and caches stay consistent because every lane re-synchronises its sequence against the
    tokens it should hold."""
    cls = registry.get(policy)
    if policy_options is None or isinstance(policy_options, Mapping):
        policy_options = registry.make_options(policy, dict(policy_options or {}))
    active = list(members[:1]) if cls.drafter_only else list(members)
    if prepared is UNPREPARED:
        prepared = cls.prepare(policy_options, member_files(active))
    rng = np.random.default_rng(options.sampling.seed)
    stats = GenerationStats(policy=policy, members=[m.name for m in active])

    t0 = time.perf_counter()
    lanes = open_lanes(active, messages, raw=raw)
    try:
        if cls.shared_tokenizer and not all(lane.by_id for lane in lanes):
            raise UsageError(f"policy {policy} needs every member to share one tokenizer (as the `coder` preset's "
                             f"models do): {policy} across tokenizers is not supported")
        runner = cls(lanes, policy_options, options.sampling, rng, prepared)
        runner.top_logprobs = options.logprobs if cls.logprobs else None
        run = _run_branches if cls.branches else _run
        done = yield from run(lanes, runner, options, stats, t0)
    finally:
        close_lanes(lanes, keep_cache=options.keep_cache)  # before the last event: a caller who stops reading there leaves nothing open
    yield done


def _run(lanes: list[Lane], runner: Policy, options: GenerationOptions, stats: GenerationStats,
         t0: float) -> Generator[Event, None, Event]:
    """The loop of :func:`generate_events` over open lanes; returns the last event (with the result)."""
    runner.start()
    t1 = time.perf_counter()
    stats.prompt_seconds = t1 - t0
    stats.prompt_tokens = {lane.name: len(lane.prompt) for lane in lanes}
    prefill_seconds = {lane.name: lane.decode_seconds for lane in lanes}
    prefill_tokens = {lane.name: lane.decoded_tokens for lane in lanes}

    stream = TextStream(options.stop)
    scores = Scores() if options.logprobs is not None else None
    spans: list[Span] = []
    printing: list[Piece] = []  # the pieces of the next event
    finish = "length"
    tokens = 0
    deadline = t0 + options.time_limit if options.time_limit is not None else float("inf")
    steps = runner.generate(options.max_tokens)
    try:
        while tokens < options.max_tokens and time.perf_counter() < deadline:
            try:
                pieces = next(steps, None)
            except (ContextFull, ContextOverflowError):
                finish = "length"
                break
            if pieces is None:
                break
            ended = False
            for piece in pieces:
                if piece.end:
                    ended = True
                    if piece.kind == "ensemble":  # the members chose to end: that choice counts as a token
                        tokens += 1
                        spans.append(Span("ensemble", "", piece.winner))
                        printing.append(piece)
                    break
                tokens += 1
                printing.append(piece)
                if scores is not None and piece.logprob is not None:
                    scores.add(len(stream.data), len(piece.data), piece.logprob)
                text = stream.push(piece.data)
                _add_span(spans, piece.kind, piece.data, piece.winner)
                if text:
                    yield Event(text, piece.kind, piece.winner, pieces=printing,
                                logprobs=None if scores is None else scores.take(stream.emitted))
                    printing = []
                if stream.stopped:
                    ended = True
                    break
            if ended:
                finish = "stop"
                break
        tail = stream.finish()
        rest = None if scores is None else scores.rest(len(stream.data))
        if tail or rest:
            yield Event(tail, "draft", logprobs=rest, pieces=printing)
    finally:
        steps.close()
        t2 = time.perf_counter()
        stats.generation_seconds = t2 - t1
    stats.tokens = tokens
    stats.tokens_per_second = tokens / stats.generation_seconds if stats.generation_seconds > 0 else 0.0
    _policy_figures(stats, runner, tokens)
    stats.shared_tokenizer = {lane.name: i == 0 or lane.follows_drafter for i, lane in enumerate(lanes)}
    stats.member_decode_seconds = {lane.name: round(lane.decode_seconds - prefill_seconds[lane.name], 4) for lane in lanes}
    stats.member_decoded_tokens = {lane.name: lane.decoded_tokens - prefill_tokens[lane.name] for lane in lanes}
    stats.peak_memory_mb = _peak_rss_mb()
    text = bytes(stream.data).decode("utf-8", errors="replace")
    spans = _cut_spans(spans, len(stream.data))  # a stop string may have cut the last pieces
    result = GenerationResult(text=text, finish_reason=finish, stats=stats, provenance=_finish_spans(spans),
                              logprobs=None if scores is None else scores.kept(len(stream.data)))
    return Event("", "done", finish_reason=finish, result=result, pieces=printing)


def _policy_figures(stats: GenerationStats, runner: Policy, tokens: int) -> None:
    """The policy's own figures, and E/T from its ensembled count."""
    stats.ensembled_tokens = runner.stats.ensembled
    stats.ensembled_fraction = runner.stats.ensembled / tokens if tokens else 0.0
    stats.policy_stats = runner.stats.figures(tokens)


def _run_branches(lanes: list[Lane], runner: Policy, options: GenerationOptions, stats: GenerationStats,
                  t0: float) -> Generator[Event, None, Event]:
    """A branching policy: every branch to its end (``run_branches``), then the policy's vote (``choose``); the
    chosen answer is streamed at the end. With ``options.preview``, what the policy reports while it runs (a
    first answer as it is written, status lines) streams first, as provisional events. Returns the last event,
    whose result lists every branch."""
    t1 = time.perf_counter()
    stats.prompt_seconds = t1 - t0
    stats.prompt_tokens = {lane.name: len(lane.prompt) for lane in lanes}
    runner.extract, runner.stop = options.extract, tuple(options.stop)
    preview = TextStream(options.stop)
    try:
        deadline = t0 + options.time_limit if options.time_limit is not None else float("inf")
        produced = runner.run_branches(options.max_tokens, deadline=deadline)
        if inspect.isgenerator(produced):
            while True:
                try:
                    progress = next(produced)
                except StopIteration as done:
                    branches = done.value
                    break
                if not options.preview:
                    continue
                if progress.kind == "text" and not preview.stopped:
                    text = preview.push(progress.data)  # type: ignore[arg-type]
                    if text:
                        yield Event(text, "draft", progress.member, provisional=True)
                elif progress.kind == "status":
                    yield Event(str(progress.data), "status")
        else:
            branches = produced
    finally:
        stats.generation_seconds = time.perf_counter() - t1
    tail = preview.finish()
    if tail:
        yield Event(tail, "draft", provisional=True)
    infos: list[BranchInfo] = []
    for b in branches:
        finish = b.finish_reason or "length"
        member = (b.lane or lanes[0]).member  # a vote's samples may come from any member
        data = b"".join(member.token_bytes(t) for t in b.tokens)
        cut = TextStream(options.stop)
        cut.push(data)
        if cut.stopped and finish != "killed":
            finish = "stop"
        text = bytes(cut.data).decode("utf-8", errors="replace")
        confidence = getattr(b, "confidence", None)
        infos.append(BranchInfo(b.index, text, len(b.tokens), finish, b.parent, b.forked_at, b.origin,
                                round(b.mean_logprob, 4), runner.answer_of(text) if finish != "killed" else None,
                                member=getattr(b, "member", None),
                                confidence=None if confidence is None else round(float(confidence), 4)))
    chosen = runner.choose([i.answer for i in infos], [i.text for i in infos], branches)
    for i in infos:
        i.votes = sum(1 for j in infos if i.answer is not None and j.answer == i.answer and j.finish_reason != "killed")
    infos[chosen].chosen = True
    best = infos[chosen]
    # The compute a branching run spends: each branch's tokens after its fork (the prefix it shares with its
    # parent was decoded once, by the parent, and its cells are shared).
    generated = sum(i.tokens - i.forked_at for i in infos)
    stats.tokens = best.tokens
    stats.generated_tokens = generated
    stats.branches = len(infos)
    stats.tokens_per_second = generated / stats.generation_seconds if stats.generation_seconds > 0 else 0.0
    _policy_figures(stats, runner, best.tokens)
    stats.ensembled_fraction = 0.0  # (branches started at the members' alternative are not tokens of the answer)
    stats.shared_tokenizer = {lane.name: i == 0 or lane.follows_drafter for i, lane in enumerate(lanes)}
    stats.member_decode_seconds = {lane.name: round(lane.decode_seconds, 4) for lane in lanes}
    stats.member_decoded_tokens = {lane.name: lane.decoded_tokens for lane in lanes}
    stats.peak_memory_mb = _peak_rss_mb()
    shown = bytes(preview.data).decode("utf-8", errors="replace")
    if options.preview and shown and len(infos) > 1:
        # the first answer was shown: say whether the vote kept it, and if not, stream the voted one
        if best.text == shown:
            yield Event(f"the first answer won ({best.votes} of {len(infos)} samples)" if best.answer is not None
                        else f"the first answer was kept (of {len(infos)} samples)", "status")
        else:
            yield Event(f"voted answer ({best.votes} of {len(infos)} samples agree)" if best.answer is not None
                        else f"consensus answer (of {len(infos)} samples)", "status")
            yield Event(best.text, "draft", best.member)
    elif best.text and not (options.preview and shown == best.text):
        yield Event(best.text, "draft", best.member)
    spans = [Span("draft", best.text, best.member)] if best.member else [Span("draft", best.text)]
    result = GenerationResult(text=best.text, finish_reason=best.finish_reason, stats=stats,
                              provenance=spans, branches=infos)
    return Event("", "done", finish_reason=best.finish_reason, result=result)


def _add_span(spans: list[Span], kind: str, data: bytes, winner: str | None) -> None:
    # Consecutive drafted tokens (routed tokens of one expert) form one span; every ensembled token is its own.
    if (spans and kind != "ensemble" and spans[-1].kind == kind and spans[-1].winner == winner
            and isinstance(spans[-1].text, bytes)):
        spans[-1].text += data  # type: ignore[operator]
    else:
        spans.append(Span(kind, data, winner))  # type: ignore[arg-type]


def _cut_spans(spans: list[Span], length: int) -> list[Span]:
    out, used = [], 0
    for s in spans:
        data = s.text if isinstance(s.text, bytes) else s.text.encode()
        if used >= length and data:
            break
        if used + len(data) > length:
            s.text = data[: length - used]
        used += len(data)
        out.append(s)
    return out


def _finish_spans(spans: list[Span]) -> list[Span]:
    for s in spans:
        if isinstance(s.text, bytes):
            s.text = s.text.decode("utf-8", errors="replace")
    return spans


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024
