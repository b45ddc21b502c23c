"""Engine configurations an evaluation compares: each member alone, every-token, faithful and gated SAFE, and
the branching ones (EAGER, EAGER-adapt, full parallel sampling, ensemble branching).

The ensemble configurations share one loaded :class:`Ensemble` (only its policy knobs change between
calls); each member alone gets its own single-model ensemble, so its numbers are exactly what a user of that
model alone would see.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from ..api import Ensemble, EnsembleConfig
from ..branching import reallocate
from ..errors import Cancelled, UsageError
from ..policies import EvalConfig, Policy, registry
from ..rounds import DecodeRounds


def offered() -> dict[str, tuple[type[Policy], EvalConfig]]:
    """Every configuration the registered policies offer, by name, in registry order."""
    return {c.name: (cls, c) for cls in registry.policies().values() for c in cls.eval_configs}


@dataclass
class EngineConfig:
    """One named configuration over a loaded ensemble, in the shape :func:`run_eval` expects."""

    name: str
    ensemble: Ensemble
    config: EnsembleConfig

    sampling: dict[str, Any] = field(default_factory=dict)  # per-call generation options (branching: temperature)
    offer: EvalConfig | None = None  # what the policy offered (None: a configuration made by hand)
    _plan: dict[str, tuple[dict[str, Any], int]] = field(default_factory=dict, repr=False)
    plan_signature: str | None = None  # of the slice and first-pass sizes plan() read; kept in each record
    _together: bool = field(default=False, repr=False)  # inside decoding_together()
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def parallel(self) -> int:
        """How many items' answers the runner may decode together (the ``parallel`` load option; 1 for the
        policies that cannot share their decodes with other answers)."""
        if registry.get(self.config.policy).batchable and self.builds_on is None:
            return self.config.parallel
        return 1

    @property
    def builds_on(self) -> str | None:
        """The configuration whose records a second pass re-spends the saved budget of (EAGER-adapt), or None."""
        second = self.offer.second_pass if self.offer is not None else None
        return second.builds_on if second is not None else None

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
        return registry.get(self.config.policy).branches

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
        assert self.offer is not None and self.offer.second_pass is not None
        m = self.offer.second_pass.cap(self.config.policy_options())
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
        options = self.config.policy_options()
        names = self.offer.record_settings if self.offer is not None else ()
        return {**{n: getattr(options, n) for n in names}, **self.sampling, **overrides}

    def _second_pass(self, messages: list[dict[str, str]], max_tokens: int,
                     extract: Callable[[str], str | None] | None, item: str | None) -> dict[str, Any]:
        """An item's EAGER-adapt answer: its first-pass answer again, or for an item that was given more
        sequences, a rerun with the options the second pass gives them (EAGER-adapt: at a threshold 10 % lower, the
        authors' retry); the cost of both passes."""
        if item not in self._plan:
            raise UsageError(f"{self.name}: plan() the run before generating (item {item} not planned)")
        first, extra = self._plan[item]
        if extra == 0:
            return {"text": first["output"], "tokens": first["tokens"], "seconds": first["seconds"],
                    "prompt_seconds": first.get("prompt_seconds"), "finish_reason": first.get("finish_reason"),
                    "ensembled_fraction": first.get("ensembled_fraction"), "generated_tokens": first["generated_tokens"],
                    "branches": [{k: v for k, v in b.items() if k != "correct"} for b in first["branches"]],
                    "settings": first.get("settings"), "reallocated": 0, "plan": self.plan_signature}
        assert self.offer is not None and self.offer.second_pass is not None
        self.ensemble.config = self.config
        self.ensemble.reset_cache()
        overrides = {**self.offer.second_pass.retry(self.config.policy_options(), extra), **self._seed(item)}
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
    if s.figure("routed_tokens"):
        out.update({k: s.policy_stats[k] for k in ("routed_tokens", "route_decisions", "catch_up_tokens",
                                                   "catch_up_seconds")})
        # what each model decoded and how long it took: the router's own (bulk, when gated) catch-up included
        out["member_decoded_tokens"] = dict(s.member_decoded_tokens)
        out["member_decode_seconds"] = dict(s.member_decode_seconds)
    if result.branches:
        out["branches"] = [{"answer": b.answer, "tokens": b.tokens, "finish_reason": b.finish_reason,
                            "origin": b.origin, "forked_at": b.forked_at, "votes": b.votes, "chosen": b.chosen,
                            # a vote's: who wrote it and its trace confidence (offline replays of the gate read it)
                            **({"member": b.member, "confidence": b.confidence, "mean_logprob": b.mean_logprob}
                               if b.confidence is not None else {})}
                           for b in result.branches]
        if s.policy_stats:  # the policy's own figures (a vote's samples, windows, gate, ...)
            out["policy_figures"] = dict(s.policy_stats)
        out["generated_tokens"] = s.generated_tokens  # the drafter's branches
        if len(s.member_decoded_tokens) > 1:  # eager-ensemble: and what every member decoded (verifiers' catch-up)
            out["member_decoded_tokens"] = dict(s.member_decoded_tokens)
    return out


def check_config_names(names: Sequence[str] | None) -> None:
    """Refuse, before any model loads, a configuration name that is none of ours (``NAME:<member>`` of a
    configuration run by each member alone is checked against the members once they are loaded)."""
    known = list(offered())
    each = [n for n, (_, c) in offered().items() if c.each_member]
    unknown = [n for n in names or () if n not in known and n.split(":", 1)[0] not in each]
    if unknown:
        raise UsageError(f"--configs: unknown {', '.join(map(repr, unknown))}; use "
                         f"{', '.join(f'{n}, {n}:<member>' for n in each)}, "
                         f"{', '.join(n for n in known if n not in each)} (comma-separated)")


def build_configs(members: Sequence[str], names: Sequence[str] | None, base: EnsembleConfig,
                  **given: Any) -> tuple[list[EngineConfig], list[Ensemble]]:
    """The requested configurations (those offered by default when ``names`` is None): each member alone, then
    every policy's configurations in registry order (SAFE's faithful and gated; with a route ``head=`` given, the
    route ones; branching ones only when named). ``given``: option values over ``base`` (``head=FILE``). Returns
    them and the ensembles to close afterwards."""
    wanted = list(names) if names else None
    check_config_names(wanted)
    base = dataclasses.replace(base, **given) if given else base
    chosen = _chosen(wanted, base, len(members))
    ensembles: list[Ensemble] = []
    configs: list[EngineConfig] = []
    try:
        for cls, offer in chosen:
            if offer.each_member:
                configs += _each_member(members, wanted, base, cls, offer, ensembles)
        loaded: dict[Any, Ensemble] = {}
        for cls, offer in chosen:
            if offer.each_member:
                continue
            specs = list(members[:1]) if offer.drafter_only else list(members)
            n_ctx = max(base.n_ctx, offer.min_n_ctx)
            # Configurations whose load needs nothing of their own share one ensemble (only their options change
            # between calls); one that loads for its policy (branches, hidden states) gets its own, loaded once.
            own = bool(offer.load) or cls.hidden_states
            key = (len(specs), cls.name if own else None, tuple(sorted(offer.load.items())), n_ctx)
            if key not in loaded:
                load_cfg = dataclasses.replace(base, **{**({"policy": cls.name, **offer.options, **offer.load} if own
                                                            else {}), "n_ctx": n_ctx})
                loaded[key] = Ensemble(specs, config=load_cfg.validate(len(specs)), progress=True)
                ensembles.append(loaded[key])
            cfg = dataclasses.replace(base, **{"policy": cls.name, **offer.load, "n_ctx": n_ctx, **offer.options}
                                      ).validate(len(specs))
            configs.append(EngineConfig(offer.name, loaded[key], cfg, sampling=dict(offer.sampling), offer=offer))
    except BaseException:
        for e in ensembles:
            e.close()
        raise
    return configs, ensembles


def _chosen(wanted: list[str] | None, base: EnsembleConfig, n_members: int) -> list[tuple[type[Policy], EvalConfig]]:
    """The offered configurations asked for (or offered by default), refused in one line, before any model
    loads, where one cannot run as asked."""
    out = []
    for name, (cls, offer) in offered().items():
        asked = wanted is not None and (name in wanted or (offer.each_member and any(
            n.split(":", 1)[0] == name for n in wanted)))
        missing = [msg for option, msg in offer.requires.items() if base.given.get(option) is None]
        if not asked and (wanted is not None or not offer.by_default or missing):
            continue
        if missing:
            raise UsageError(missing[0])
        if n_members < offer.needs_members:
            count = {2: "two", 3: "three"}.get(offer.needs_members, str(offer.needs_members))
            raise UsageError(f"{name} needs {count} or more models: give them with -m ... -m ...")
        # what the policy checks of its options (route: that its head file reads), before any model loads
        cls.check(dataclasses.replace(base, policy=cls.name, **offer.options).policy_options(), n_members)
        second = offer.second_pass
        if second is not None and second.builds_on not in (wanted or ()):
            raise UsageError(f"{name} re-spends the sequences {second.builds_on} saved on the same items: add "
                             f"{second.builds_on} to --configs")
        out.append((cls, offer))
    return out


def _each_member(members: Sequence[str], wanted: list[str] | None, base: EnsembleConfig, cls: type[Policy],
                 offer: EvalConfig, ensembles: list[Ensemble]) -> list[EngineConfig]:
    """``NAME:<member>`` for each member alone (NAME alone: all of them), each its own one-member ensemble, so
    that its numbers are exactly what a user of that model alone would see."""
    configs: list[EngineConfig] = []
    matched: set[str] = set()
    alone: list[str] = []  # every member's NAME:<member>, for the message below
    for spec in members:
        ens = Ensemble([spec], config=dataclasses.replace(base, policy=cls.name, **offer.options), progress=True)
        name = f"{offer.name}:{ens.members[0].name}"
        alone.append(name)
        asked = {name, f"{offer.name}:{spec}"} & set(wanted or ())  # its display name or the spec it was given by
        matched |= asked
        if wanted is None or asked or offer.name in wanted:
            ensembles.append(ens)
            configs.append(EngineConfig(name, ens, ens.config, offer=offer))
        else:
            ens.close()
    unmatched = [n for n in wanted or () if n.split(":", 1)[0] == offer.name and ":" in n and n not in matched]
    if unmatched:
        raise UsageError(f"--configs: {', '.join(unmatched)} names no member; the members alone are "
                         f"{', '.join(alone)} (or {offer.name} for each)")
    return configs
