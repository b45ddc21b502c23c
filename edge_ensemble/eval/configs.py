"""Engine configurations an evaluation compares: each member alone, every-token, faithful and gated SAFE, and
the branching ones (EAGER, EAGER-adapt, full parallel sampling, ensemble branching).

The ensemble configurations share one loaded :class:`Ensemble` (only its policy knobs change between
calls); each member alone gets its own single-model ensemble, so its numbers are exactly what a user of that
model alone would see.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

from ..api import Ensemble, EnsembleConfig
from ..branching import reallocate
from ..errors import Cancelled, UsageError
from ..rounds import DecodeRounds

ENSEMBLE_CONFIGS = {
    # name: (policy, gate)
    "every-token": ("every-token", 0.5),
    "safe": ("safe", None),
    "safe-gated": ("safe", 0.5),
}
# FusionRoute over every member with a trained head (--head): beta as fitted, pure routing, and gated (the router
# consulted only where the expert writing is unsure; beta as fitted there). name: options over the route policy.
ROUTE_GATE = 0.5  # as SAFE's default gate
ROUTE_CONFIGS: dict[str, dict[str, Any]] = {"route": {}, "route-b0": {"beta": 0.0},
                                            "route-gated": {"route_gate": ROUTE_GATE}}
NEEDS_HEAD = "the route configurations need a head: --head FILE (train one with `edge-ensemble route train`)"
# Branching configurations over the drafter alone (eager-ensemble: over every member), at the authors'
# temperature. M = BRANCHES answers per item; "parallel" samples them independently in one batch.
BRANCHES = 8
BRANCH_TEMPERATURE = 0.6
BRANCH_CONFIGS: dict[str, dict[str, Any]] = {
    "parallel": {"initial_branches": BRANCHES, "threshold": None},
    "eager": {},
    "eager-adapt": {},  # a second pass over eager's records: the budget saved re-spent (EngineConfig.plan)
    "eager-ensemble": {},
}
# Context for the branching configurations: up to 4 × M branches (eager-adapt) share one context.
BRANCH_N_CTX = 16384
# Policies whose answers the runner may decode side by side (--parallel): one sequence per member and answer.
# The branching ones already batch their branches, route serializes its router's hidden-state decodes.
TOGETHER_POLICIES = ("single", "every-token", "safe")


@dataclass
class EngineConfig:
    """One named configuration over a loaded ensemble, in the shape :func:`run_eval` expects."""

    name: str
    ensemble: Ensemble
    config: EnsembleConfig

    sampling: dict[str, Any] = field(default_factory=dict)  # per-call generation options (branching: temperature)
    # EAGER-adapt: a second pass over the records this configuration's first pass (eager) made on the run's items
    builds_on: str | None = None
    _plan: dict[str, tuple[dict[str, Any], int]] = field(default_factory=dict, repr=False)
    plan_signature: str | None = None  # of the slice and first-pass sizes plan() read; kept in each record
    _together: bool = field(default=False, repr=False)  # inside decoding_together()
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def parallel(self) -> int:
        """How many items' answers the runner may decode together (the ``parallel`` load option; 1 for the
        policies that cannot share their decodes with other answers)."""
        if self.config.policy in TOGETHER_POLICIES and self.builds_on is None:
            return self.config.parallel
        return 1

    @contextlib.contextmanager
    def decoding_together(self) -> Iterator[DecodeRounds]:
        """While the block runs, threads inside ``rounds.taking_part()`` may call :meth:`generate` at once, their
        decodes batched (:meth:`Ensemble.decode_together`). Every answer still prefills its prompt from scratch:
        the cache is reset once here, and each answer frees its cells at its end. :meth:`cancel` ends the
        answers in progress (they raise :class:`Cancelled`)."""
        self.ensemble.config = self.config
        self.ensemble.reset_cache()
        self._cancel.clear()
        self._together = True
        try:
            with self.ensemble.decode_together() as rounds:
                yield rounds
        finally:  # (after decode_together() has waited for every thread of the rounds)
            self._together = False

    def cancel(self) -> None:
        """Stop the answers :meth:`decoding_together` is making, at their next token."""
        self._cancel.set()

    @property
    def branching(self) -> bool:
        """Whether answers are voted over branches (the runner then passes the task's extractor)."""
        return self.config.policy == "eager"  # type: ignore[attr-defined]

    def plan(self, records: Sequence[dict[str, Any]], items: Sequence[str]) -> None:
        """EAGER-adapt's re-allocation over the run, as the authors do it once every prompt has had its first
        pass: the sequences ``builds_on`` (eager) saved on ``items`` (M × prompts − sequences generated) are split
        evenly over the items that hit the cap M, at most 3 × M more each (:func:`~edge_ensemble.branching.reallocate`).
        Items that did not hit the cap keep their first-pass answer."""
        first = {r["item"]: r for r in records if r.get("config") == self.builds_on}
        missing = [i for i in items if i not in first]
        if missing:
            raise UsageError(f"{self.name} re-spends what {self.builds_on} saved on the run's items, but {len(missing)}"
                             f" of them (item {missing[0]}, ...) have no {self.builds_on} record")
        m = self.config.max_branches  # type: ignore[attr-defined]
        used = [len(first[i].get("branches") or ()) for i in items]
        extra = reallocate(used, [u >= m for u in used], m)
        self._plan = {i: (first[i], e) for i, e in zip(items, extra)}
        basis = json.dumps([m, [[i, u] for i, u in zip(items, used)]])
        self.plan_signature = f"{len(items)} items, " + hashlib.sha256(basis.encode()).hexdigest()[:12]

    def generate(self, messages: list[dict[str, str]], max_tokens: int,
                 extract: Callable[[str], str | None] | None = None, item: str | None = None) -> dict[str, Any]:
        if self.builds_on is not None:
            return self._second_pass(messages, max_tokens, extract, item)
        if not self._together:  # (together: decoding_together() set both up for every answer)
            self.ensemble.config = self.config
            # The ensemble configurations share one loaded Ensemble: without this, the second and third
            # would find the item's prompt already cached by the first and look faster than they are.
            self.ensemble.reset_cache()
        seeded = self._seed(item)
        out = _record_of(self._answer(messages, max_tokens, extract, seeded))
        if self.branching:  # what the run used, so that records made at other settings are told apart
            out["settings"] = self._settings(**seeded)
        return out

    def _seed(self, item: str | None) -> dict[str, int]:
        """A sampling configuration's seed for ``item`` (``{"seed": n}``; ``{}`` when greedy), from its name and
        the item's id: a rerun (or another machine) samples the same answer, and no two configurations share
        their random draws."""
        if item is None or not self.sampling.get("temperature"):
            return {}
        return {"seed": int.from_bytes(hashlib.sha256(f"{self.name}:{item}".encode()).digest()[:4], "big")}

    def _settings(self, **overrides: Any) -> dict[str, Any]:
        c = self.config
        return {"max_branches": c.max_branches, "threshold": c.threshold,  # type: ignore[attr-defined]
                "percentile": c.percentile, "entropy": c.entropy, **self.sampling, **overrides}  # type: ignore[attr-defined]

    def _second_pass(self, messages: list[dict[str, str]], max_tokens: int,
                     extract: Callable[[str], str | None] | None, item: str | None) -> dict[str, Any]:
        """An item's EAGER-adapt answer: its first-pass answer again, or for an item that was given more
        sequences, a rerun with them at a threshold 10 % lower (the authors' retry); the cost of both passes."""
        if item not in self._plan:
            raise UsageError(f"{self.name}: plan() the run before generating (item {item} not planned)")
        first, extra = self._plan[item]
        if extra == 0:
            return {"text": first["output"], "tokens": first["tokens"], "seconds": first["seconds"],
                    "prompt_seconds": first.get("prompt_seconds"), "finish_reason": first.get("finish_reason"),
                    "ensembled_fraction": first.get("ensembled_fraction"), "generated_tokens": first["generated_tokens"],
                    "branches": [{k: v for k, v in b.items() if k != "correct"} for b in first["branches"]],
                    "settings": first.get("settings"), "reallocated": 0, "plan": self.plan_signature}
        m = self.config.max_branches + extra  # type: ignore[attr-defined]
        threshold = self.config.threshold  # type: ignore[attr-defined]
        threshold = None if threshold is None else round(threshold * 0.9, 6)
        self.ensemble.config = self.config
        self.ensemble.reset_cache()
        overrides = {"max_branches": m, "threshold": threshold, **self._seed(item)}
        out = _record_of(self._answer(messages, max_tokens, extract, overrides))
        out["seconds"] += first["seconds"]
        out["generated_tokens"] += first["generated_tokens"]
        out["reallocated"] = extra
        out["first_pass_branches"] = len(first["branches"])
        out["plan"] = self.plan_signature
        out["settings"] = self._settings(**overrides)
        return out

    def _answer(self, messages: list[dict[str, str]], max_tokens: int, extract: Callable[[str], str | None] | None,
                overrides: dict[str, Any]) -> Any:
        kwargs = {"messages": messages, "max_tokens": max_tokens, **self.sampling, **overrides,
                  **({"extract": extract} if self.branching else {})}
        if not self._together:
            return self.ensemble.generate(**kwargs)
        events = self.ensemble.stream(**kwargs, keep_cache=False)
        try:
            for event in events:
                if self._cancel.is_set():
                    raise Cancelled("the run is ending")
                if event.result is not None:
                    return event.result
        finally:
            events.close()  # type: ignore[attr-defined]  # (its lanes given back in this thread)
        raise AssertionError("the answer's stream ended without a result")


def _record_of(result: Any) -> dict[str, Any]:
    """What the runner records of one answer (every branch's answer and size, for a branching policy)."""
    s = result.stats
    out = {"text": result.text, "tokens": s.tokens, "seconds": s.generation_seconds + s.prompt_seconds,
           "prompt_seconds": s.prompt_seconds, "ensembled_fraction": s.ensembled_fraction,
           "finish_reason": result.finish_reason}
    if s.routed_tokens:
        out["routed_tokens"] = dict(s.routed_tokens)
        out["route_decisions"] = s.route_decisions
        out["catch_up_tokens"], out["catch_up_seconds"] = s.catch_up_tokens, s.catch_up_seconds
        # what each model decoded and how long it took: the router's own (bulk, when gated) catch-up included
        out["member_decoded_tokens"] = dict(s.member_decoded_tokens)
        out["member_decode_seconds"] = dict(s.member_decode_seconds)
    if result.branches:
        out["branches"] = [{"answer": b.answer, "tokens": b.tokens, "finish_reason": b.finish_reason,
                            "origin": b.origin, "forked_at": b.forked_at, "votes": b.votes, "chosen": b.chosen}
                           for b in result.branches]
        out["generated_tokens"] = s.generated_tokens  # the drafter's branches
        if len(s.member_decoded_tokens) > 1:  # eager-ensemble: and what every member decoded (verifiers' catch-up)
            out["member_decoded_tokens"] = dict(s.member_decoded_tokens)
    return out


def check_config_names(names: Sequence[str] | None) -> None:
    """Refuse, before any model loads, a configuration name that is none of ours (``single:<member>`` is
    checked against the members once they are loaded)."""
    known = ("single", *ENSEMBLE_CONFIGS, *BRANCH_CONFIGS, *ROUTE_CONFIGS)
    unknown = [n for n in names or () if n not in known and not n.startswith("single:")]
    if unknown:
        raise UsageError(f"--configs: unknown {', '.join(map(repr, unknown))}; use single, "
                         f"single:<member>, {', '.join(known[1:])} (comma-separated)")


def build_configs(members: Sequence[str], names: Sequence[str] | None, base: EnsembleConfig,
                  head: str | None = None) -> tuple[list[EngineConfig], list[Ensemble]]:
    """The requested configurations (all when ``names`` is None): ``single:<member>`` for each member, then
    every-token, safe (faithful) and safe-gated, and with a route ``head`` route (its fitted beta), route-b0 (beta 0)
    and route-gated (:data:`ROUTE_CONFIGS`). Returns them and the ensembles to close afterwards."""
    wanted = list(names) if names else None
    check_config_names(wanted)
    if wanted and "eager-ensemble" in wanted and len(members) < 2:  # (before any model loads)
        raise UsageError("eager-ensemble branches where the members disagree: give it two or more models (-m ... -m ...)")
    if wanted and "eager-adapt" in wanted and "eager" not in wanted:
        raise UsageError("eager-adapt re-spends the sequences eager saved on the same items: add eager to --configs")
    ensembles: list[Ensemble] = []
    configs: list[EngineConfig] = []
    full = None
    try:
        # A member alone is loaded only to learn its name when some single configuration is asked for.
        singles = wanted is None or any(n == "single" or n.startswith("single:") for n in wanted)
        matched: set[str] = set()
        alone: list[str] = []  # every member's single:<name>, for the message below
        for spec in members if singles else ():
            single = Ensemble([spec], config=replace(base, policy="single"), progress=True)
            name = f"single:{single.members[0].name}"
            alone.append(name)
            asked = {name, f"single:{spec}"} & set(wanted or ())  # its display name or the spec it was given by
            matched |= asked
            if wanted is None or asked or "single" in wanted:
                ensembles.append(single)
                configs.append(EngineConfig(name, single, single.config))
            else:
                single.close()
        unmatched = [n for n in wanted or () if n.startswith("single:") and n not in matched]
        if unmatched:
            raise UsageError(f"--configs: {', '.join(unmatched)} names no member; the members alone are "
                             f"{', '.join(alone)} (or single for each)")
        for name, (policy, gate) in ENSEMBLE_CONFIGS.items():
            if wanted is not None and name not in wanted:
                continue
            if full is None:
                full = Ensemble(list(members), config=base, progress=True)
                ensembles.append(full)
            cfg = replace(base, policy=policy, gate=gate).validate(len(members))
            configs.append(EngineConfig(name, full, cfg))
        routes = [n for n in ROUTE_CONFIGS if (wanted is None and head is not None) or (wanted and n in wanted)]
        if routes:
            configs += _route_configs(members, routes, base, head, ensembles)
        branching = [n for n in BRANCH_CONFIGS if wanted is not None and n in wanted]
        if branching:
            configs += _branch_configs(members, branching, base, ensembles)
    except BaseException:
        for e in ensembles:
            e.close()
        raise
    return configs, ensembles


def _branch_configs(members: Sequence[str], names: Sequence[str], base: EnsembleConfig,
                    ensembles: list[Ensemble]) -> list[EngineConfig]:
    """The requested branching configurations: one eager-loaded ensemble of the drafter alone (every member
    for eager-ensemble), each configuration a set of eager options over it."""
    loaded: dict[int, Ensemble] = {}
    out = []
    for name in names:
        specs = list(members) if name == "eager-ensemble" else list(members[:1])
        n = len(specs)
        if n not in loaded:
            cfg = replace(base, policy="eager", max_branches=4 * BRANCHES, n_ctx=max(base.n_ctx, BRANCH_N_CTX), parallel=1)
            loaded[n] = Ensemble(specs, config=cfg.validate(n), progress=True)
            ensembles.append(loaded[n])
        cfg = replace(base, policy="eager", max_branches=BRANCHES, n_ctx=max(base.n_ctx, BRANCH_N_CTX), parallel=1,
                      **BRANCH_CONFIGS[name]).validate(n)
        out.append(EngineConfig(name, loaded[n], cfg, sampling={"temperature": BRANCH_TEMPERATURE},
                                builds_on="eager" if name == "eager-adapt" else None))
    return out


def _route_configs(members: Sequence[str], names: Sequence[str], base: EnsembleConfig, head: str | None,
                   ensembles: list[Ensemble]) -> list[EngineConfig]:
    """The route configurations over one route-loaded ensemble of every member (its router gives hidden
    states, which the other ensembles' contexts do not pay for)."""
    if head is None:
        raise UsageError(NEEDS_HEAD)
    cfg = replace(base, policy="route", head=head, parallel=1).validate(len(members))
    routed = Ensemble(list(members), config=cfg, progress=True)
    ensembles.append(routed)
    return [EngineConfig(name, routed, replace(cfg, **ROUTE_CONFIGS[name]).validate(len(members)))
            for name in names]
