"""The generation loop: prompts in, a stream of events out, with stops, UTF-8-safe text and statistics.

This is the single place where a policy is chosen (through :func:`policies.make_policy`) and where its
accepted pieces turn into text. Every policy yields the same :class:`Event` type.
"""

from __future__ import annotations

import codecs
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .decisions import Sampling
from .errors import ContextOverflowError
from .member import Member
from .policies import ContextFull, PolicyConfig, make_policy
from .prompt import Prompt, prompt_tokens_for


@dataclass
class Span:
    """A stretch of the answer and where it came from."""

    kind: str  # "draft" | "ensemble" | "single"
    text: str
    winner: str | None = None


@dataclass
class GenerationStats:
    """Figures of one generation."""

    policy: str
    members: list[str]
    tokens: int = 0  # accepted tokens (drafter-side count: one per drafted or ensembled token)
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    tokens_per_second: float = 0.0
    drafted_tokens: int = 0
    draft_acceptance_rate: float | None = None
    ensembled_tokens: int = 0
    ensembled_fraction: float = 0.0  # E/T
    overridden_tokens: int = 0  # ensembled tokens that differ from the drafter's own choice
    verification_calls: int = 0
    # Positions the gate or a faithful cycle wanted checked but that were left to the drafter because a
    # re-tokenizing verifier's view of them was unreliable (mid-character, a token boundary it does not share).
    unreliable_positions: int = 0
    shared_tokenizer: dict[str, bool] = field(default_factory=dict)  # member -> uses the drafter's token ids
    member_decode_seconds: dict[str, float] = field(default_factory=dict)
    member_decoded_tokens: dict[str, int] = field(default_factory=dict)
    peak_memory_mb: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Event:
    """One step of a stream: newly printable text and where it came from. The last event has
    ``finish_reason`` set and carries the :class:`GenerationResult`."""

    text: str
    kind: str
    winner: str | None = None
    finish_reason: str | None = None
    result: "GenerationResult | None" = None


@dataclass
class GenerationResult:
    """A finished generation."""

    text: str
    finish_reason: str  # "stop" (end of generation or a stop string), "length" (max_tokens or context full)
    stats: GenerationStats
    provenance: list[Span]

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
            "provenance": [asdict(s) for s in self.provenance],
        }


@dataclass(frozen=True)
class GenerationOptions:
    """Per-call settings, validated at the edge."""

    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    time_limit: float | None = None  # seconds from the start (prefill included), then finish_reason "length"


def prepare_prompts(members: Sequence[Member], prompt: Prompt) -> None:
    """Tokenize the prompt (a conversation in each member's own template, or raw text) for each member and
    check it fits its context."""
    for m in members:
        m.model.reconcile()  # a previous generation may have been interrupted mid-decode
        m.prompt = prompt_tokens_for(m.model, prompt)
        if len(m.prompt) + 1 >= m.model.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(m.prompt)} tokens for {m.name} but its context holds {m.model.n_ctx}; "
                "raise --n-ctx or shorten the prompt"
            )
        m.reset_timers()  # each member's track is made fresh when the policy aligns it (PolicyBase)


class _TextStream:
    """Accepted bytes -> printable text: whole UTF-8 characters only, stop strings cut, tail held back
    while it could still become a stop string."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.data = bytearray()
        self.stops = [s.encode("utf-8") for s in stop if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.emitted = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stopped = False

    def push(self, data: bytes) -> str:
        self.data += data
        if self.stops:
            lo = max(0, self.emitted - self.hold - len(data))
            hits = [i for i in (self.data.find(s, lo) for s in self.stops) if i >= 0]
            if hits:
                del self.data[min(hits):]
                self.stopped = True
                return self._emit(len(self.data), final=True)
        return self._emit(max(self.emitted, len(self.data) - self.hold))

    def finish(self) -> str:
        return self._emit(len(self.data), final=True)

    def _emit(self, upto: int, final: bool = False) -> str:
        chunk = bytes(self.data[self.emitted:upto])
        self.emitted = max(self.emitted, upto)
        return self.decoder.decode(chunk, final=final)


def generate_events(
    members: Sequence[Member],
    messages: Prompt,
    *,
    policy: str = "safe",
    policy_config: PolicyConfig = PolicyConfig(),
    options: GenerationOptions = GenerationOptions(),
) -> Iterator[Event]:
    """Stream one answer to ``messages`` (a conversation, or a :class:`~edge_ensemble.prompt.RawText`).
    The generator may be closed early (Ctrl-C): caches stay consistent because
    every member re-synchronises its cache against its own token list at the next generation."""
    rng = np.random.default_rng(options.sampling.seed)
    active = list(members[:1]) if policy == "single" else list(members)
    stats = GenerationStats(policy=policy, members=[m.name for m in active])

    t0 = time.perf_counter()
    deadline = t0 + options.time_limit if options.time_limit is not None else float("inf")
    prepare_prompts(active, messages)
    runner = make_policy(policy, active, policy_config, options.sampling, rng)
    runner.start()
    t1 = time.perf_counter()
    stats.prompt_seconds = t1 - t0
    stats.prompt_tokens = {m.name: len(m.prompt) for m in active}
    prefill_seconds = {m.name: m.decode_seconds for m in active}
    prefill_tokens = {m.name: m.decoded_tokens for m in active}

    stream = _TextStream(options.stop)
    spans: list[Span] = []
    finish = "length"
    tokens = 0
    try:
        while tokens < options.max_tokens and time.perf_counter() < deadline:
            try:
                pieces = runner.step(options.max_tokens - tokens)
            except (ContextFull, ContextOverflowError):
                finish = "length"
                break
            ended = False
            for piece in pieces:
                if piece.end:
                    ended = True
                    if piece.kind == "ensemble":
                        tokens += 1
                        spans.append(Span("ensemble", "", piece.winner))
                    break
                tokens += 1
                text = stream.push(piece.data)
                _add_span(spans, piece.kind, piece.data, piece.winner)
                if text:
                    yield Event(text, piece.kind, piece.winner)
                if stream.stopped:
                    ended = True
                    break
            if ended:
                finish = "stop"
                break
        tail = stream.finish()
        if tail:
            yield Event(tail, "draft")
    finally:
        t2 = time.perf_counter()
        stats.generation_seconds = t2 - t1
    ps = runner.stats
    stats.tokens = tokens
    stats.tokens_per_second = tokens / stats.generation_seconds if stats.generation_seconds > 0 else 0.0
    stats.drafted_tokens = ps.drafted
    stats.draft_acceptance_rate = (ps.accepted_drafts / ps.drafted) if ps.drafted else None
    stats.ensembled_tokens = ps.ensembled
    stats.ensembled_fraction = ps.ensembled / tokens if tokens else 0.0
    stats.overridden_tokens = ps.overrides
    stats.verification_calls = ps.verification_calls
    stats.unreliable_positions = ps.unreliable
    stats.shared_tokenizer = {m.name: i == 0 or m.follows_drafter for i, m in enumerate(active)}
    stats.member_decode_seconds = {m.name: round(m.decode_seconds - prefill_seconds[m.name], 4) for m in active}
    stats.member_decoded_tokens = {m.name: m.decoded_tokens - prefill_tokens[m.name] for m in active}
    stats.peak_memory_mb = _peak_rss_mb()
    text = bytes(stream.data).decode("utf-8", errors="replace")
    spans = _cut_spans(spans, len(stream.data))  # a stop string may have cut the last pieces
    result = GenerationResult(text=text, finish_reason=finish, stats=stats, provenance=_finish_spans(spans))
    yield Event("", "done", finish_reason=finish, result=result)


def _add_span(spans: list[Span], kind: str, data: bytes, winner: str | None) -> None:
    # Consecutive drafted tokens form one span; every ensembled token is its own span.
    if spans and kind != "ensemble" and spans[-1].kind == kind and isinstance(spans[-1].text, bytes):
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
