"""`route`: FusionRoute's token-level routing (../shared/research/eager-fusionroute.md), with a head trained by
``edge-ensemble route train`` (:mod:`edge_ensemble.route_train`).

Per token:
1. the router decodes the last accepted token and gives its next-token logits and its last hidden state h;
2. the head picks expert I = argmax(W·h + b);
3. only expert I produces logits at this position: an expert that was not chosen lately lags behind the text and
   catches up in one bulk decode when it is chosen again (SAFE's lazy catch-up); the router itself, when it is
   also an expert, needs no second decode;
4. the token is the argmax (or a sample) of log π_I + β·log π_router; β = 0 is pure routing.

With ``route_gate`` g the router is consulted only where it may matter (SAFE's entropy gating applied to routing):
the expert the head chose last goes on alone while its top-1 probability is at least g, the router lags, and at
the first unsure token the router catches up in one bulk decode, the head decides, and β applies. On a CPU the
router's step per token is most of route's cost over its strongest expert (a 0.5B router beside a 1.5B expert:
about 1.6× the expert alone); gated, it is paid at the unsure tokens only, in bulk.

With ``overlap`` the router's step and the step of the expert chosen last (other than the router) run at the same
time in two threads: both read the same new token, so on two cores a token costs about the slower of the two
instead of their sum, and that expert is ready if it is chosen again.

The router and every expert must share one tokenizer (token ids): the sum of log-probabilities is taken id by
id, and the head was trained on positions of one tokenization. Which member is the router and which are the
experts comes from the head file (the sha256 of their GGUF files), not from the member order.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..dist import FullDist
from ..errors import UsageError
from ..member import Lane
from ..options import Option
from ..routing import RouterHead, file_sha256, load_head
from .base import ContextFull, EvalConfig, LoadNeeds, MemberFile, Piece, Policy, PolicyStats, option
from .registry import register

HEAD = Option("head", str, None, "The selection head (.npz) `edge-ensemble route train` wrote for these models.",
              shown_default="none", metavar="FILE", per_call=False)
BETA = Option("beta", float, None, "Weight of the router's own log-probabilities added to the chosen expert's; "
              "0 = pure routing.", range=(0.0, 20.0), shown_default="the head's fitted value")
ROUTE_GATE = Option("route_gate", float, None, "Consult the router only where the expert writing now is unsure (its "
                    "top-1 probability below this); elsewhere that expert goes on alone. Off: the router decides "
                    "every token.", range=(0.0, 1.0), off=True, shown_default="off")
OVERLAP = Option("overlap", bool, False, "Decode each token with the router and the expert chosen last at the same "
                 "time, in two threads (for two or more cores: give each model half of them, e.g. --threads 1 on 2).",
                 per_call=False)

NEEDS_HEAD = "policy route needs a head: --head FILE (head= in the API); train one with `edge-ensemble route train`"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - float(logits.max())
    return z - np.log(np.exp(z).sum())


def combine(expert_logits: np.ndarray, router_logits: np.ndarray, beta: float) -> np.ndarray:
    """log π_expert + β·log π_router (unnormalised: a softmax of it is the combined distribution)."""
    return log_softmax(expert_logits) + beta * log_softmax(router_logits)


@dataclass(frozen=True)
class RouteOptions:
    """FusionRoute's options."""

    head: str | None = option(HEAD)
    beta: float | None = option(BETA)
    route_gate: float | None = option(ROUTE_GATE)
    overlap: bool = option(OVERLAP)


@dataclass
class RouteStats(PolicyStats):
    """Counts of a routed answer."""

    routed: dict[str, int] = field(default_factory=dict)  # tokens each expert wrote
    route_decisions: int = 0  # tokens the head chose the expert for (all of them unless gated)
    catch_up_tokens: int = 0  # lagging tokens an expert fed in bulk when chosen again
    catch_up_calls: int = 0
    catch_up_seconds: float = 0.0

    def figures(self, tokens: int) -> dict[str, Any]:
        return {"routed_tokens": dict(self.routed), "route_decisions": self.route_decisions,
                "catch_up_tokens": self.catch_up_tokens, "catch_up_seconds": round(self.catch_up_seconds, 4)}

    def summary(self, figures: dict[str, Any]) -> list[str]:
        routed = figures.get("routed_tokens") or {}
        total = sum(routed.values())
        if not total:
            return []
        parts = ["written by " + ", ".join(f"{n} {c / total:.0%}" for n, c in routed.items())]
        if figures.get("route_decisions", total) < total:
            parts.append(f"router consulted at {figures['route_decisions'] / total:.0%} of tokens")
        return parts


_heads: dict[tuple[str, int, int], RouterHead] = {}


def _read_head(path: str) -> RouterHead:
    """The head file read and checked once per version of the file (``check`` and ``prepare`` both ask)."""
    try:
        st = os.stat(os.path.expanduser(path))
        key = (os.path.realpath(os.path.expanduser(path)), st.st_size, st.st_mtime_ns)
    except OSError:
        return load_head(path)  # (its own one-line message for a missing file)
    if key not in _heads:
        _heads[key] = load_head(path)
    return _heads[key]


def _hidden_size(path: Any) -> int:
    """A model's hidden size (n_embd) from its file's metadata, without loading its weights."""
    from ..model_file import ModelFile

    with ModelFile.open_vocab(path) as probe:
        return probe.n_embd


@dataclass(frozen=True)
class Roles:
    """A head read once per loaded ensemble, and which members (by index) are its router and its experts."""

    head: RouterHead
    router: int
    experts: list[int]


# The route configurations eval offers given a head (--head): beta as fitted, pure routing, and gated (the router
# consulted only where the expert writing is unsure; beta as fitted there).
ROUTE_GATE_EVAL = 0.5  # as SAFE's default gate
_EVAL_NEEDS_HEAD = {"head": "the route configurations need a head: --head FILE (train one with `edge-ensemble route train`)"}


@register
class RoutePolicy(Policy):
    """One expert writes each token, chosen by the head from the router's hidden state."""

    name = "route"
    summary = "a trained head picks the member that writes each token (FusionRoute)"
    Options = RouteOptions
    Stats = RouteStats
    options: RouteOptions
    stats: RouteStats
    prepared: Roles
    shared_tokenizer = True
    hidden_states = True
    batchable = False  # the router's hidden-state decodes are serialized, not batched
    local_only = "the router's hidden states are read in this process"
    eval_configs = (EvalConfig("route", {}, requires=_EVAL_NEEDS_HEAD, load={"parallel": 1}),
                    EvalConfig("route-b0", {"beta": 0.0}, requires=_EVAL_NEEDS_HEAD, load={"parallel": 1}),
                    EvalConfig("route-gated", {"route_gate": ROUTE_GATE_EVAL}, requires=_EVAL_NEEDS_HEAD,
                               load={"parallel": 1}))

    @classmethod
    def check(cls, options: RouteOptions, n_members: int, where: Any = str) -> None:
        """A head is given, and it is a readable head file (before the members are located, which may download
        them)."""
        if options.head is None:
            raise UsageError(NEEDS_HEAD)
        _read_head(options.head)

    @classmethod
    def prepare(cls, options: RouteOptions, members: Sequence[MemberFile]) -> Roles:
        """The head read and checked once: against the members' GGUF sha256 (which is the router, which the
        experts) and the router's hidden size, before any model loads."""
        cls.check(options, len(members))
        remote = next((m for m in members if m.remote), None)
        if remote is not None:
            raise UsageError(f"policy route runs local models only; {remote.name} is not one")
        head = _read_head(options.head)  # type: ignore[arg-type]  # (check() refused None)
        where = f"route head {options.head}"
        router, experts = head.roles([file_sha256(m.path) for m in members], [m.name for m in members], where)
        head.check_hidden_size(_hidden_size(members[router].path), members[router].name, where)
        return Roles(head, router, experts)

    @classmethod
    def load_needs(cls, options: RouteOptions, n_members: int, prepared: Roles) -> LoadNeeds:
        return LoadNeeds(hidden_states=frozenset({prepared.router}))

    def __init__(self, lanes: Sequence[Lane], options: RouteOptions, sampling: Any, rng: np.random.Generator,
                 prepared: Roles | None = None) -> None:
        super().__init__(lanes, options, sampling, rng, prepared)
        if prepared is None:
            raise UsageError("policy route reads its head once, when the models load: create the Ensemble with "
                             "policy='route' and head=FILE (the CLI does)")
        if not self.by_id:
            raise UsageError("policy route needs the router and every expert to share one tokenizer (as the `coder`"
                             " preset does): routing across tokenizers is not supported")
        self.head = prepared.head
        self.router = self.lanes[prepared.router]
        self.experts = [self.lanes[i] for i in prepared.experts]
        if not getattr(self.router.backend, "hidden_states", False):
            raise UsageError(f"policy route needs the router ({self.router.name}) loaded with hidden states: create"
                             " the Ensemble with policy='route' and head=FILE (the CLI does)")
        self.beta = self.head.beta if options.beta is None else options.beta
        self.stats.routed = {lane.name: 0 for lane in self.experts}
        # overlap: the expert (other than the router) that decodes each new token alongside the router
        self.follow = next((e for e in self.experts if e.backend is not self.router.backend), None)
        self.gate: float | None = options.route_gate
        if self.gate is not None and options.overlap:
            raise UsageError("--route-gate and --overlap do not go together: gated, the router does not step with "
                             "every token (give one of them)")
        self.current: Lane | None = None  # gated: the expert the head chose last, which writes while it is sure

    def start(self) -> None:
        self.tokens: list[int] = []  # accepted tokens after the prompt (shared ids)
        # Each expert's prompt is prefilled now, in one pass with its last row read as plain decoding does (a
        # different batch split would change the logits slightly, and with them near-tie greedy choices); that
        # row serves the first token if the expert is chosen for it.
        self.ready: dict[int, object] = {}
        for e in self.experts:
            if e.backend is not self.router.backend and id(e.backend) not in self.ready:
                row = len(e.prompt) - 1
                self.ready[id(e.backend)] = e.feed(e.prompt, rows=[row])[row]
        self.pending = self._route_step()

    def _route_step(self) -> tuple[FullDist, np.ndarray]:
        """The router's distribution and hidden state after prompt + accepted tokens (one decode of the last)."""
        target = self.router.prompt + self.tokens
        if len(target) >= self.router.backend.n_ctx:
            raise ContextFull
        return self.router.feed_hidden(target)  # type: ignore[return-value]

    def _expert_logits(self, expert: Lane, router_dist: FullDist) -> np.ndarray:
        """Expert's next-token logits after the text: the router's own when it is that model; else the expert
        brings its cache up to the text in one decode (logits at the last row only)."""
        if expert.backend is self.router.backend:
            return router_dist.logits
        if id(expert.backend) in self.ready:
            return self.ready[id(expert.backend)].logits  # type: ignore[attr-defined]
        t0, before = time.perf_counter(), expert.decoded_tokens
        dist = self._catch_up(expert)
        fed = expert.decoded_tokens - before
        if fed > 1:  # more than the one new token: it lagged
            self.stats.catch_up_calls += 1
            self.stats.catch_up_tokens += fed - 1
            self.stats.catch_up_seconds += time.perf_counter() - t0
        return dist.logits  # type: ignore[attr-defined]

    def _catch_up(self, expert: Lane):  # type: ignore[no-untyped-def]
        """The expert's distribution after the text, its cache brought up to it in one decode (temperature 1:
        the distributions are combined first)."""
        target = expert.prompt + self.tokens
        if len(target) >= expert.backend.n_ctx:
            raise ContextFull
        return expert.feed(target, rows=[len(target) - 1])[len(target) - 1]

    def _advance(self) -> None:
        """After a token: the router's next step, and with ``overlap`` the followed expert's step on the same
        token at the same time (separate llama.cpp contexts; the decode calls release the GIL). Both are done
        when this returns, so no decode outlives the step."""
        follow = self.follow if self.options.overlap else None
        if follow is None:
            self.pending = self._route_step()
            return
        out: dict[str, object] = {}

        def work() -> None:
            try:
                out["dist"] = self._catch_up(follow)
            except BaseException as e:  # re-raised in the policy's thread
                out["error"] = e

        worker = threading.Thread(target=work, name="route-expert", daemon=True)
        worker.start()
        try:
            self.pending = self._route_step()
        finally:
            worker.join()
        if "error" in out:
            raise out["error"]  # type: ignore[misc]
        self.ready[id(follow.backend)] = out["dist"]

    def step(self, budget: int) -> list[Piece]:
        if self.gate is not None and self.current is not None:
            own = self._current_dist()
            if own.top1 >= self.gate:  # sure: it goes on alone, the router lags
                # (the row is at temperature 1; greedy or 1 picks from it as it is, without another copy)
                return self._emit(self.current, own if self.temperature in (0.0, 1.0)
                                  else FullDist(own.logits, self.temperature))
        if self.pending is None:  # gated, the router lagged: it catches up in one decode
            self.pending = self._route_step()
        router_dist, hidden = self.pending
        i = self.head.select(hidden)
        expert = self.experts[i]
        self.stats.route_decisions += 1
        logits = self._expert_logits(expert, router_dist)
        # The router as the chosen expert: log π + β log π would only sharpen its own distribution.
        beta = 0.0 if expert.backend is self.router.backend else self.beta
        dist = FullDist(logits if beta == 0.0 else combine(logits, router_dist.logits, beta).astype(np.float32),
                        self.temperature)
        if expert.backend is not self.router.backend:
            self.follow = expert
        self.current = expert
        return self._emit(expert, dist)

    def _current_dist(self) -> FullDist:
        """Gated: the next-token distribution (temperature 1) of the expert writing now, after the text."""
        assert self.current is not None
        if self.current.backend is self.router.backend:
            return self.pending[0]  # type: ignore[index,return-value]  # (the router stepped with it)
        return self.ready[id(self.current.backend)]  # type: ignore[return-value]

    def _emit(self, expert: Lane, dist: FullDist) -> list[Piece]:
        """Pick the token from ``dist`` as ``expert``'s, append it, and advance what the next token needs."""
        tok = self.pick(dist)
        self.stats.routed[expert.name] += 1
        if expert.member.is_eog(tok):
            return [Piece(b"", "route", expert.name, end=True)]
        # The model that decodes the new token next: the router, or gated the expert writing (the router lags).
        if (self.router if self.gate is None else expert).room < 1:
            raise ContextFull
        self.tokens.append(tok)
        self.ready = {}
        if self.gate is None:
            self._advance()
        elif expert.backend is self.router.backend:  # the router writes: its own step is the next decision's
            self.pending = self._route_step()
        else:  # only the expert writing now steps; the router catches up when next consulted
            self.pending = None
            self.ready[id(expert.backend)] = self._catch_up(expert)
        return [Piece(expert.member.token_bytes(tok), "route", expert.name)]
