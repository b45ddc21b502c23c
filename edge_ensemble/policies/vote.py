"""`vote`: confidence-gated, adaptive answer ensembles (../shared/research/voting.md).

The first member writes its answer (the call's own sampling: greedy by default) while the confidence of each
token is read from the row already decoded (DeepConf: minus the mean of the top-20 log-probabilities; a trace's
score is its lowest sliding-window mean). If that score passes the gate, the first answer is the answer, at the
cost of one. Otherwise samples are drawn in windows (all of a member's live samples in one ``llama_decode`` per
step, the prompt's cells shared), until a stopping rule (ESC's unanimous window, or Adaptive-Consistency's
posterior) or ``max_samples``; then a vote: majority, confidence-weighted (CISC) or over the most confident
traces (DeepConf's filter), with per-member weights. Answers are compared as extracted strings (a number, a
choice letter, a boxed expression), so members with different tokenizers vote together; without an extractor
(free text) the sample most similar to the others is returned (Universal Self-Consistency).

The decisions themselves are pure functions in :mod:`edge_ensemble.voting`; this module runs the samples.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Sequence

import numpy as np

from .. import voting
from ..decisions import Sampling, filter_probs
from ..dist import Dist, FullDist
from ..member import Lane
from ..options import Option
from .base import WEIGHTS, EvalConfig, LoadNeeds, Policy, PolicyStats, Progress, option
from .registry import register

# Tokens per sliding window of a trace's confidence (DeepConf's group confidence). The authors used 2048 on
# long reasoning traces; a small model's answers here are 100-500 tokens, so a window of 32 still finds the
# weakest stretch instead of averaging it away.
CONFIDENCE_WINDOW = 32
TOP_LOGPROBS = 20  # DeepConf's k: the top-20 log-probabilities (what vLLM returns)

# The shipped defaults were set on GSM8K items 200-212 (Qwen2.5-Coder-0.5B, eval's vote-all records: the
# greedy first answer and 7 samples each), not on the items the results report (0-199): the gate sits near the
# 40th percentile of the first answers' confidences there (so about 60 % of answers cost one answer), window 4,
# Adaptive-Consistency's Beta rule, majority vote (softmax(confidence / 1) let one confident sample outvote the
# rest there; no weighting temperature was fitted). docs/vote.md has the measurements.
VOTE_GATE = Option(
    "vote_gate", float, 8.5,
    "Accept the first answer without sampling when its confidence (the lowest 32-token mean of minus the "
    "mean top-20 log-probability) is at least this; always: every first answer; never (or off): always vote.",
    range=(0.0, 1000.0), off=True, named=(("always", 0.0), ("never", None)))
WINDOW = Option("window", int, 4, "Samples drawn per window (one batch per member), before the stopping rule "
                "looks again.", range=(1, 64))
MAX_SAMPLES = Option("max_samples", int, 8, "Most answers per prompt, the first one included (1: the first "
                     "answer only).", range=(1, 256))
STOPPING = Option("stopping", str, "beta", "When to stop drawing windows: unanimous (ESC: a window whose "
                  "answers all agree), beta (Adaptive-Consistency: the leading answer's posterior probability "
                  "reaches --stop-confidence), none (max_samples always).", choices=("unanimous", "beta", "none"))
STOP_CONFIDENCE = Option("stop_confidence", float, 0.95, "beta stopping: stop once the leading answer wins with "
                         "this posterior probability.", range=(0.5, 1.0), above=True)
WEIGHTING = Option("weighting", str, "majority", "How samples vote: majority (one vote each), confidence "
                   "(softmax of confidence / --weight-temperature, CISC), filter (only the --keep-percent most "
                   "confident vote).", choices=("majority", "confidence", "filter"))
WEIGHT_TEMPERATURE = Option("weight_temperature", float, 1.0, "confidence weighting: softmax temperature over "
                            "the samples' confidences (lower: the most confident sample counts more).",
                            range=(0.0, 1000.0), above=True)
KEEP_PERCENT = Option("keep_percent", float, 90.0, "filter weighting: the share of samples, most confident "
                      "first, that vote.", range=(0.0, 100.0), above=True)
KILL = Option("kill", float, None, "Stop a sample early once its running 32-token confidence falls below the "
              "(100 - this) percentile of the finished samples' confidences (DeepConf online; its cells are "
              "freed and it does not vote); off: never.", range=(0.0, 100.0), above=True, off=True)
SAMPLE_TEMPERATURE = Option("sample_temperature", float, 0.6, "Temperature of the samples after the first "
                            "answer.", range=(0.0, 5.0), above=True)
SAMPLE_FROM = Option("sample_from", str, "first", "Who samples: first (the first member alone), cascade (members in "
                 "order, the next one when a window disagrees or is unsure), together (each window shared "
                 "among all members).", choices=("first", "cascade", "together"))
ANSWER = Option("answer", str, "text", "What a vote compares: number (the last number, as GSM8K), choice (the "
                "answer letter), boxed (the last \\boxed{}), text (free text: the sample most similar to the "
                "others wins).", choices=voting.ANSWER_KINDS)


@dataclass(frozen=True)
class VoteOptions:
    """The vote's options."""

    vote_gate: float | None = option(VOTE_GATE)
    window: int = option(WINDOW)
    max_samples: int = option(MAX_SAMPLES)
    stopping: str = option(STOPPING)
    stop_confidence: float = option(STOP_CONFIDENCE)
    weighting: str = option(WEIGHTING)
    weight_temperature: float = option(WEIGHT_TEMPERATURE)
    keep_percent: float = option(KEEP_PERCENT)
    kill: float | None = option(KILL)
    sample_temperature: float = option(SAMPLE_TEMPERATURE)
    sample_from: str = option(SAMPLE_FROM)
    answer: str = option(ANSWER)
    weights: tuple[float, ...] | None = option(WEIGHTS)


@dataclass
class VoteStats(PolicyStats):
    """What a vote spent: samples (the first answer included), windows, whether the gate accepted."""

    samples: int = 0
    windows: int = 0
    gate_accepted: bool = False
    first_confidence: float | None = None
    stopped_early: bool = False  # the stopping rule ended it before max_samples
    killed: int = 0  # samples stopped early for low confidence (they do not vote)
    without_answer: int = 0  # samples whose text held no answer of the kind compared (they vote for nothing)
    escalations: int = 0  # cascade: windows moved on to the next member
    agreement: float | None = None  # share of the vote's weight behind the returned answer

    def figures(self, tokens: int) -> dict[str, Any]:
        return {"samples": self.samples, "windows": self.windows, "gate_accepted": self.gate_accepted,
                "first_confidence": self.first_confidence, "stopped_early": self.stopped_early,
                "killed_samples": self.killed, "samples_without_answer": self.without_answer,
                "escalations": self.escalations, "vote_agreement": self.agreement}

    def summary(self, figures: dict[str, Any]) -> list[str]:
        conf = figures.get("first_confidence")
        conf_text = "" if conf is None else f" (confidence {conf:.1f})"
        if figures.get("gate_accepted"):
            return [f"first answer accepted{conf_text}"]
        parts = [f"voted over {figures.get('samples', 0)} samples in {figures.get('windows', 0)} window(s)"
                 f"{conf_text}"]
        if figures.get("vote_agreement") is not None:
            parts.append(f"agreement {figures['vote_agreement']:.0%}")
        if figures.get("killed_samples"):
            parts.append(f"{figures['killed_samples']} killed")
        return parts


@dataclass
class Sample:
    """One answer of a vote (the engine reads it as a branch)."""

    index: int
    member: str
    member_index: int
    lane: Lane
    origin: str = "sample"  # "first" (the first member's answer, the call's sampling) or "sample"
    tokens: list[int] = field(default_factory=list)
    logprob: float = 0.0
    confs: list[float] = field(default_factory=list)  # each token's confidence
    finish_reason: str | None = None  # "stop", "length" or "killed"
    dist: Dist | None = None
    running: voting.RunningConfidence = field(default_factory=lambda: voting.RunningConfidence(CONFIDENCE_WINDOW))
    answer: str | None = None
    parent: int | None = None
    forked_at: int = 0
    rng: np.random.Generator | None = None  # its own draws: a sample does not change with what is batched beside it

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(len(self.tokens), 1)

    @property
    def confidence(self) -> float:
        """The trace's score: its lowest sliding-window mean confidence (0 for an empty answer)."""
        score = voting.group_confidence(self.confs, CONFIDENCE_WINDOW) if self.confs else 0.0
        return score if math.isfinite(score) else 0.0


def _token_confidence(dist: Dist, temperature: float) -> float:
    """DeepConf's confidence of one position, from the row already read: the model's own logits (the dist
    holds them divided by ``temperature``), or a remote member's reported top-n probabilities."""
    logits = getattr(dist, "logits", None)
    if logits is not None:
        row = logits * np.float32(temperature) if temperature != 1.0 else logits
        return voting.token_confidence(voting.top_logprobs(row, TOP_LOGPROBS))
    _, probs = dist.top(TOP_LOGPROBS)
    probs = np.asarray(probs, dtype=np.float64)
    return voting.token_confidence(np.log(np.clip(probs, 1e-300, None)))


@register
class VotePolicy(Policy):
    """The first answer, then (unless the gate accepts it) windows of samples and a vote."""

    name = "vote"
    summary = "answer first; if unsure, sample in windows and vote"
    Options = VoteOptions
    Stats = VoteStats
    options: VoteOptions
    stats: VoteStats
    branches = True
    batchable = False  # its samples are batched already, one context's sequences
    text_choice = "the sample most similar to the others"  # Universal Self-Consistency (chrF)
    eval_configs = ()  # set below, after the module's settings

    @classmethod
    def load_needs(cls, options: VoteOptions, n_members: int, prepared: Any) -> LoadNeeds:
        # a window's samples live at once beside the prompt's sequence (together: the window shared)
        per_member = options.window if options.sample_from != "together" else -(-options.window // max(n_members, 1))
        return LoadNeeds(sequences=1 + min(per_member, max(options.max_samples - 1, 0)))

    def __init__(self, lanes: Sequence[Lane], options: VoteOptions, sampling: Sampling, rng: np.random.Generator,
                 prepared: Any = None) -> None:
        super().__init__(lanes, options, sampling, rng, prepared)
        for lane in self.lanes:
            lane.weight = 1.0  # member weights are vote weights here, not union weights
        self.vote_sampling = Sampling(temperature=options.sample_temperature, top_p=sampling.top_p,
                                      top_k=sampling.top_k)
        self.samples: list[Sample] = []
        self._root_dists: dict[int, Dist] = {}
        self._seed: int | None = None  # drawn from the call's generator once the first answer is written

    # -- answers ------------------------------------------------------------------------------------------

    def extractor(self) -> Callable[[str], str | None] | None:
        """What votes compare: the caller's extractor (an eval task's), else the ``answer`` option's kind."""
        if self.extract is not None:
            return self.extract
        if self.options.answer == "text":
            return None
        kind = self.options.answer
        return lambda text: voting.extract_answer(text, kind)

    def answer_of(self, text: str) -> str | None:
        find = self.extractor()
        return find(text) if find is not None else None

    def choose(self, answers: Sequence[str | None], texts: Sequence[str], branches: Sequence[Any]) -> int:
        """The returned sample: the weighted vote over extracted answers; without answers, the consensus text.
        Killed samples never vote."""
        o = self.options
        valid = [i for i, b in enumerate(branches) if b.finish_reason != "killed"] or list(range(len(branches)))
        confs = [float(branches[i].confidence) for i in valid]
        member_w = [o.weights[branches[i].member_index] if o.weights else 1.0 for i in valid]
        if o.weighting == "confidence":
            w = voting.confidence_weights(confs, o.weight_temperature) * np.asarray(member_w)
        elif o.weighting == "filter":
            w = voting.keep_most_confident(confs, o.keep_percent).astype(np.float64) * np.asarray(member_w)
        else:
            w = np.asarray(member_w, dtype=np.float64)
        sub = [answers[i] for i in valid]
        pick = voting.weighted_vote(sub, w.tolist(), confs)
        if pick is None:
            keep = [j for j, x in enumerate(w) if x > 0] or list(range(len(valid)))
            pick = keep[voting.consensus_index([texts[valid[j]] for j in keep], [float(w[j]) for j in keep])]
            self.stats.agreement = None
        else:
            total = float(np.sum(w))
            won = sum(float(w[j]) for j, a in enumerate(sub) if a is not None and a == sub[pick])
            self.stats.agreement = round(won / total, 4) if total > 0 else None
        return valid[pick]

    # -- the run ------------------------------------------------------------------------------------------

    def run_branches(self, max_tokens: int, deadline: float = float("inf")) -> Generator[Progress, None, list[Sample]]:
        """The first answer (streamed as progress), the gate, then windows of samples until the stopping rule;
        returns every sample (the engine votes with :meth:`choose`)."""
        o = self.options
        first = yield from self._first_answer(max_tokens, deadline)
        self.samples.append(first)
        self.stats.samples = 1
        self.stats.first_confidence = round(first.confidence, 4)
        self.stats.gate_accepted = self._accepts(first)
        if self.stats.gate_accepted or o.max_samples == 1:
            return self.samples
        order = self._member_order()
        at = 0
        threshold: float | None = None
        while len(self.samples) < o.max_samples and time.perf_counter() < deadline:
            k = min(o.window, o.max_samples - len(self.samples))
            if o.sample_from == "together":
                groups = [(m, k // len(order) + (1 if j < k % len(order) else 0)) for j, m in enumerate(order)]
                groups = [(m, n) for m, n in groups if n > 0]
            else:
                groups = [(order[at], k)]
            yield Progress("status", f"checking: window {self.stats.windows + 1} "
                           f"({', '.join(self.lanes[m].name for m, _ in groups)}), {self._tally_text()}")
            window = self._draw(groups, max_tokens, deadline, threshold)
            self.stats.windows += 1
            self.samples.extend(window)
            self.stats.samples = len(self.samples)
            answers = [s.answer for s in self.samples if s.finish_reason != "killed"]
            if self.extractor() is None:
                break  # free text: one window, then the consensus
            if voting.should_stop(o.stopping, answers, [s.answer for s in window if s.finish_reason != "killed"],
                                  o.stop_confidence):
                self.stats.stopped_early = len(self.samples) < o.max_samples
                break
            if o.kill is not None and threshold is None:
                done = [s.confidence for s in self.samples if s.finish_reason != "killed"]
                threshold = voting.kill_threshold(done, o.kill) if done else None
            if o.sample_from == "cascade" and at + 1 < len(order):
                # the next member when this member's window does not settle it, or is unsure (MoT, ModelSwitch)
                window_answers = [s.answer for s in window if s.finish_reason != "killed"]
                unsure_below = o.vote_gate if o.vote_gate is not None else 0.0
                if voting.escalate(window_answers, [s.confidence for s in window], unsure_below, o.stopping,
                                   o.stop_confidence):
                    at += 1
                    self.stats.escalations += 1
        self.stats.without_answer = sum(1 for s in self.samples
                                        if s.answer is None and s.finish_reason != "killed") if self.extractor() else 0
        return self.samples

    def _accepts(self, first: Sample) -> bool:
        gate = self.options.vote_gate
        if gate is None:
            return False
        if self.extractor() is not None and first.answer is None:
            return gate <= 0.0  # an answer with nothing to compare is accepted only by "always"
        return first.confidence >= gate

    def _member_order(self) -> list[int]:
        """Who samples, in order: the first member alone, or every member (a twin listed twice samples once)."""
        if self.options.sample_from == "first":
            return [0]
        return [i for i, t in enumerate(self.twin) if t is None]

    def _first_answer(self, max_tokens: int, deadline: float) -> Generator[Progress, None, Sample]:
        """The first member's answer with the call's sampling, token by token (streamed), its confidence read
        from each row."""
        lane = self.lanes[0]
        s = Sample(0, lane.name, 0, lane, origin="first")
        dist = self.next_dist(lane, [])
        self._root_dists[0] = dist
        while True:
            tok = self.pick(dist)
            self._score(s, dist, tok, self.temperature)
            if lane.member.is_eog(tok):
                s.finish_reason = "stop"
                break
            s.tokens.append(tok)
            yield Progress("text", lane.member.token_bytes(tok), lane.name)
            if len(s.tokens) >= max_tokens or lane.room < 1 or len(lane.prompt) + len(s.tokens) + 1 >= lane.backend.n_ctx:
                s.finish_reason = "length"
                break
            if time.perf_counter() > deadline:
                s.finish_reason = "length"
                break
            dist = lane.step(tok, self.temperature)
        s.answer = self.answer_of(self.text_of(lane, s.tokens))
        return s

    def _score(self, s: Sample, dist: Dist, tok: int, temperature: float) -> None:
        s.confs.append(_token_confidence(dist, temperature))
        # a greedy token's probability without the full float64 softmax (the first answer's every token)
        p = float(dist.top1) if tok == dist.argmax else float(dist.prob(tok))
        s.logprob += math.log(p) if p > 0 else -1e9

    def _root(self, m: int) -> Dist:
        """Member ``m``'s distribution after the prompt at the samples' temperature (its prompt decoded once; the
        samples fork from it)."""
        if m not in self._root_dists:
            self._root_dists[m] = self.next_dist(self.lanes[m], [])
        dist = self._root_dists[m]
        logits = getattr(dist, "logits", None)
        if logits is None:  # a remote member's top-n: as reported
            return dist
        own = logits * np.float32(self.temperature) if self.temperature != 1.0 else logits
        return FullDist(own, self.vote_sampling.temperature)

    def _draw(self, groups: list[tuple[int, int]], max_tokens: int, deadline: float,
              threshold: float | None) -> list[Sample]:
        """``n`` samples from each member ``m`` of ``groups``, decoded together: every step, one batch per
        member for all its live samples. A sample whose running confidence falls below ``threshold`` is
        killed (its cells freed)."""
        live: list[Sample] = []
        for m, n in groups:
            root = self._root(m)
            lane = self.lanes[m]
            for _ in range(n):
                s = Sample(len(self.samples) + len(live), lane.name, m, lane.fork())
                s.dist = root
                live.append(s)
        if self._seed is None:
            self._seed = int(self.rng.integers(2**62))
        for s in live:
            s.rng = np.random.default_rng((self._seed, s.index))
        out = list(live)
        temp = self.vote_sampling.temperature
        while live:
            going: list[Sample] = []
            for s in live:
                tok = self._sample(s.dist, s.rng)
                self._score(s, s.dist, tok, temp)
                s.running.add(s.confs[-1])
                if s.lane.member.is_eog(tok):
                    self._finish(s, "stop")
                    continue
                s.tokens.append(tok)
                if len(s.tokens) >= max_tokens or s.lane.room < 1 or time.perf_counter() > deadline:
                    self._finish(s, "length")
                elif threshold is not None and s.running.full and s.running.window_mean < threshold:
                    self._finish(s, "killed")
                    self.stats.killed += 1
                else:
                    going.append(s)
            live = []
            for backend in {id(s.lane.backend): s.lane.backend for s in going}.values():
                mine = [s for s in going if s.lane.backend is backend]
                requests = [(s.lane.seq, s.lane.prompt + s.tokens, [len(s.lane.prompt) + len(s.tokens) - 1])
                            for s in mine]
                t0 = time.perf_counter()
                results = backend.feed_many(requests, temp)
                spent = time.perf_counter() - t0
                for s, res, (_, _, rows) in zip(mine, results, requests):
                    if res is None:  # its tokens no longer fit in the context
                        self._finish(s, "length")
                        continue
                    s.dist = res[0][rows[0]]
                    s.lane.decoded_tokens += res[1]
                    live.append(s)
                mine[0].lane.decode_seconds += spent
        for s in out:
            if s.finish_reason != "killed":
                s.answer = self.answer_of(self.text_of(s.lane, s.tokens))
        return out

    def _sample(self, dist: Dist, rng: np.random.Generator | None) -> int:
        s = self.vote_sampling
        proposal = filter_probs(dist.sampling_probs(), s.top_k, s.top_p)  # (the root dist is shared: not stored)
        return int((rng or self.rng).choice(proposal.size, p=proposal))

    def _finish(self, s: Sample, reason: str) -> None:
        s.finish_reason = reason
        s.dist = None
        s.lane.close(keep_cache=False)  # a sample's own cells are freed; the prompt's stay with the root lane

    def _tally_text(self) -> str:
        counts: dict[str, int] = {}
        for s in self.samples:
            if s.answer is not None:
                counts[s.answer] = counts.get(s.answer, 0) + 1
        if not counts:
            return f"{len(self.samples)} answer(s) so far"
        return "answers so far " + ", ".join(f"{a!s:.20} ×{n}" for a, n in sorted(counts.items(), key=lambda x: -x[1]))


# Eval's vote configurations (the first answer at the call's sampling: greedy in eval). Each is loaded once for
# its own window; the context holds the prompt, the first answer and a window of samples.
VOTE_N_CTX = 8192
_RECORDED = ("vote_gate", "window", "max_samples", "stopping", "weighting", "sample_temperature", "sample_from", "kill")


def _vote(name: str, options: dict[str, Any], **kwargs: Any) -> EvalConfig:
    return EvalConfig(name, options, by_default=False, load={**{k: v for k, v in options.items()
                                                                if k in ("window", "sample_from", "max_samples")},
                                                             "parallel": 1},
                      min_n_ctx=VOTE_N_CTX, record_settings=_RECORDED, **kwargs)


VotePolicy.eval_configs = (
    _vote("vote", {}, drafter_only=True),  # the shipped defaults, over the first member
    _vote("vote-nogate", {"vote_gate": None}, drafter_only=True),
    _vote("vote-confidence", {"weighting": "confidence"}, drafter_only=True),
    _vote("vote-fixed", {"stopping": "none"}, drafter_only=True),
    # every answer drawn (no gate, no early stop, one window of 7 after the first): what offline replays of the
    # gate, the stopping rule and the weighting read (benchmarks/vote_replay.py)
    _vote("vote-all", {"vote_gate": None, "stopping": "none", "window": 7, "max_samples": 8}, drafter_only=True),
    _vote("vote-cascade", {"sample_from": "cascade"}, needs_members=2),
)
