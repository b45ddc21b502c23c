"""Calibrate the ``vote`` policy (``edge-ensemble calibrate --policy vote``): draw every answer once, then replay
each setting of the sweep over what was drawn, choose on one slice of the items and check on the other.

**The draw.** On every development item the drafter answers alone (``single:<drafter>``, greedy) and eval's
``vote-all`` draws its greedy first answer and 7 samples at the sampling temperature, each with its trace
confidence and its extracted answer. Those are the records of eval itself (``OUT/<task>.jsonl``), so a
calibration resumes, and eval records of the same two configurations can be calibrated on without running again
(a record of another vote configuration that drew all 8 answers of the first member, at the same temperature and
with nothing killed, is a draw too).

**The replay is exact for answers and tokens.** Each sample draws from its own random generator (seed, index), so
the samples a setting would draw are the first ones of the draw whatever its window (up to batch numerics: a
near-tie may break the other way in another batch size). A setting (gate, window, most samples, stopping rule,
weighting) is replayed item by item with the policy's own rules (:mod:`edge_ensemble.voting`): the gate on the
first answer's confidence, windows until the stopping rule or the cap, then the vote. Its seconds are an
ESTIMATE: the first answer at the drafter's measured rate, each window at the per-step time measured on the
``vote-all`` rows for their batch of 7, interpolated linearly in the batch size from one sequence alone.
Not replayed: the online kill (needs per-token confidences) and several members sampling (cascade, together).

**The rule** (:data:`RULE`). The first ``fit_items`` items (default: half) choose, the rest check:

1. on the fit items, a candidate answers at least ``min_gain`` items more than the drafter alone, and its paired
   record against it (items only it / only the drafter got right) has an exact McNemar p below ``significance``
   (``off``: the gain alone);
2. the cheapest candidate in estimated seconds per answer is chosen (ties: more items right, then the earlier
   setting of the sweep);
3. it is written only if on the check items it also answers at least ``min_gain`` more than the drafter alone;
   otherwise (or with no candidate) the drafter alone is written, and the result says why.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edge_ensemble import voting
from edge_ensemble.api import EnsembleConfig
from edge_ensemble.calibration import calibration_key, toml_key
from edge_ensemble.errors import UsageError
from edge_ensemble.eval import scoring
from edge_ensemble.eval.calibrate import MIN_GAIN
from edge_ensemble.eval.devsets import describe_dev_set
from edge_ensemble.eval.runner import read_records, results_path, run_eval
from edge_ensemble.eval.tasks import Task
from edge_ensemble.options import Option, checked_sweep, option
from edge_ensemble.policies import BASELINE_POLICY
from edge_ensemble.sources import SpecLike, parse_spec

DRAW = "vote-all"  # eval's configuration that draws every answer (the greedy first answer and 7 samples)


def _draw_policy() -> str:
    """The name of the policy whose eval configuration :data:`DRAW` is (the vote), read from the registry."""
    from edge_ensemble.eval.configs import offered

    return offered()[DRAW][0].name


VOTE_POLICY = _draw_policy()
DRAWN = 8  # answers per item in the draw, the first one included
WEIGHTINGS_REPLAYED = ("majority", "confidence", "filter")

# -- the sweep, declared once ---------------------------------------------------------------------------------

VOTE_GATES = Option("vote_gates", tuple, None, "vote: gates to try (--vote-gate values: the first answer's "
                    "confidence); never is always tried.", item=float, range=(0.0, 1000.0),
                    shown_default="the 10th, 25th, 40th, 50th, 60th, 75th and 90th percentiles of the fit items' "
                    "first answers")
WINDOWS = Option("windows", tuple, (2, 4), "vote: windows to try (samples per window).", item=int,
                 range=(1, DRAWN - 1), shown_default="2,4")
CAPS = Option("caps", tuple, (5, 8), "vote: most answers per prompt to try (--max-samples, the first answer "
              "included).", item=int, range=(2, DRAWN), shown_default="5,8")
STOPPINGS = Option("stoppings", tuple, ("unanimous", "beta"), "vote: stopping rules to try (repeat the flag).", item=str,
                   choices=voting.STOP_RULES, shown_default="unanimous and beta")
WEIGHTINGS = Option("weightings", tuple, ("majority", "confidence"), "vote: weightings to try (repeat the flag).", item=str,
                    choices=WEIGHTINGS_REPLAYED, shown_default="majority and confidence")
WEIGHT_TEMPERATURES = Option("weight_temperatures", tuple, (0.5, 1.0, 2.0), "vote: softmax temperatures to try "
                             "with the confidence weighting.", item=float, range=(0.0, 1000.0), above=True,
                             shown_default="0.5,1,2")
FIT_ITEMS = Option("fit_items", int, None, "vote: the first this many items choose the setting, the others "
                   "check it.", range=(1, 1 << 20), shown_default="half of the items")
SIGNIFICANCE = Option("significance", float, 0.05, "vote: a setting is chosen only if its record against the "
                      "drafter alone on the fit items has an exact McNemar p below this; off: a gain of "
                      "--min-gain items is enough.", range=(0.0, 1.0), above=True, off=True)
VOTE_SWEEP_OPTIONS: tuple[Option, ...] = (VOTE_GATES, WINDOWS, CAPS, STOPPINGS, WEIGHTINGS, WEIGHT_TEMPERATURES,
                                          FIT_ITEMS, SIGNIFICANCE)
GATE_PERCENTILES = (10, 25, 40, 50, 60, 75, 90)
SHOWN = 60  # settings the markdown lists (most right on the fit items first), besides the candidates
KEEP_PERCENT = 90.0  # the filter weighting's share (the policy's default)
STOP_CONFIDENCE = 0.95  # the beta rule's posterior (the policy's default)

RULE = ("vote: on the fit items, settings that answer at least min_gain more items than the drafter alone with "
        "McNemar p below significance; the cheapest in estimated seconds per answer; written only if it also "
        "gains min_gain items on the check items, else the drafter alone")


@dataclass(frozen=True)
class VoteSweep:
    """What :func:`calibrate_vote` replays (fields: :data:`VOTE_SWEEP_OPTIONS`, and ``min_gain`` as SAFE's)."""

    vote_gates: tuple[float, ...] | None = option(VOTE_GATES)
    windows: tuple[int, ...] = option(WINDOWS)
    caps: tuple[int, ...] = option(CAPS)
    stoppings: tuple[str, ...] = option(STOPPINGS)
    weightings: tuple[str, ...] = option(WEIGHTINGS)
    weight_temperatures: tuple[float, ...] = option(WEIGHT_TEMPERATURES)
    fit_items: int | None = option(FIT_ITEMS)
    significance: float | None = option(SIGNIFICANCE)
    min_gain: int = option(MIN_GAIN)  # (SAFE's sweep's: one flag for both)

    def validate(self, where: Callable[[str], str] = str) -> "VoteSweep":
        """This sweep with every value checked (``where(name)`` names a bad one, e.g. its flag)."""
        return checked_sweep(self, (*VOTE_SWEEP_OPTIONS, MIN_GAIN), where)


@dataclass(frozen=True)
class VoteSetting:
    """One point of the sweep, as the vote policy's options."""

    vote_gate: float | None  # None: never accept the first answer
    window: int
    max_samples: int
    stopping: str
    weighting: str
    weight_temperature: float = 1.0

    @property
    def name(self) -> str:
        gate = "never" if self.vote_gate is None else f"{self.vote_gate:g}"
        weighting = self.weighting + (f" T={self.weight_temperature:g}" if self.weighting == "confidence" else "")
        return f"vote gate={gate} window={self.window} max={self.max_samples} {self.stopping} {weighting}"

    def values(self, sample_temperature: float) -> dict[str, Any]:
        """The config keys a calibration table sets (``never`` for no gate: TOML has no null)."""
        out: dict[str, Any] = {"policy": VOTE_POLICY, "vote_gate": "never" if self.vote_gate is None else self.vote_gate,
                               "window": self.window, "max_samples": self.max_samples, "stopping": self.stopping,
                               "weighting": self.weighting, "sample_temperature": sample_temperature,
                               "sample_from": "first"}
        if self.weighting == "confidence":
            out["weight_temperature"] = self.weight_temperature
        return out


# -- the replay ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepTimes:
    """Seconds per decoding step: one sequence alone (the drafter's rate) and a batch of ``batch``."""

    one: float
    batch_time: float
    batch: int = DRAWN - 1

    def window(self, k: int) -> float:
        """Estimated seconds per step of a window of ``k`` samples (linear in k between 1 and ``batch``)."""
        if self.batch <= 1:
            return self.one
        return self.one + (self.batch_time - self.one) * (k - 1) / (self.batch - 1)


def step_times(draws: Sequence[dict[str, Any]], drafter: Sequence[dict[str, Any]]) -> StepTimes:
    """The step times measured in the records: the drafter alone's median seconds per token, and the draw's
    median seconds per step of its window (its seconds less its first answer's, over its longest sample)."""
    rates = [r["tokens"] / r["seconds"] for r in drafter if r.get("seconds") and r.get("tokens")]
    one = 1.0 / float(np.median(rates)) if rates else 0.025
    per = []
    for r in draws:
        b = r["branches"]
        steps = max((x["tokens"] for x in b[1:]), default=0)
        if steps:
            per.append(max(r["seconds"] - b[0]["tokens"] * one, 0.0) / steps)
    return StepTimes(one, float(np.median(per)) if per else one * (DRAWN - 1))


@dataclass(frozen=True)
class Replayed:
    """One item under one setting."""

    right: bool
    samples: int
    tokens: int
    seconds: float
    answer: str | None = None  # the returned answer (the first answer's when no sample has one)


def replay_item(record: dict[str, Any], setting: VoteSetting, times: StepTimes) -> Replayed:
    """What ``setting`` would have answered on the item of a ``vote-all`` ``record`` (its branches: the first
    answer, then the samples in the order they were drawn), with the policy's own rules."""
    b = record["branches"]
    first = b[0]
    seconds = first["tokens"] * times.one
    gate = setting.vote_gate
    if gate is not None and (first["confidence"] >= gate if first["answer"] is not None else gate <= 0.0):
        return Replayed(bool(first["correct"]), 1, first["tokens"], seconds, first["answer"])
    pool = [first]
    rest = b[1:setting.max_samples]
    for at in range(0, len(rest), setting.window):
        window = rest[at:at + setting.window]
        pool += window
        seconds += max(x["tokens"] for x in window) * times.window(len(window))
        if voting.should_stop(setting.stopping, [x["answer"] for x in pool], [x["answer"] for x in window],
                              STOP_CONFIDENCE):
            break
    confs = [float(x["confidence"]) for x in pool]
    if setting.weighting == "confidence":
        weights = voting.confidence_weights(confs, setting.weight_temperature)
    elif setting.weighting == "filter":
        weights = voting.keep_most_confident(confs, KEEP_PERCENT).astype(float)
    else:
        weights = np.ones(len(pool))
    pick = voting.weighted_vote([x["answer"] for x in pool], weights.tolist(), confs)
    chosen = pool[pick] if pick is not None else first
    return Replayed(bool(chosen["correct"]), len(pool), sum(x["tokens"] for x in pool), seconds, chosen["answer"])


@dataclass(frozen=True)
class SliceScore:
    """A setting (or the drafter alone) on one slice of the items."""

    n: int
    right: int
    won: int = 0  # items it got right and the drafter alone wrong
    lost: int = 0
    samples: float = 1.0
    tokens: float = 0.0
    seconds: float = 0.0  # per answer; an estimate for a replayed setting

    @property
    def p(self) -> float:
        """Exact two-sided McNemar p against the drafter alone."""
        return scoring.mcnemar_exact(self.won, self.lost)

    def row(self) -> dict[str, Any]:
        return {"right": self.right, "n": self.n, "won": self.won, "lost": self.lost, "p": round(self.p, 4),
                "samples": round(self.samples, 2), "tokens": round(self.tokens, 1),
                "seconds_per_answer": round(self.seconds, 2)}


def score_slice(draws: Sequence[dict[str, Any]], drafter: dict[str, dict[str, Any]], setting: VoteSetting,
                times: StepTimes) -> SliceScore:
    """``setting`` replayed on ``draws``, paired with the drafter alone's records (by item)."""
    res = [replay_item(r, setting, times) for r in draws]
    alone = [bool(drafter[r["item"]]["correct"]) for r in draws]
    return SliceScore(len(res), sum(x.right for x in res), sum(x.right and not a for x, a in zip(res, alone)),
                      sum(a and not x.right for x, a in zip(res, alone)), float(np.mean([x.samples for x in res])),
                      float(np.mean([x.tokens for x in res])), float(np.mean([x.seconds for x in res])))


def drafter_slice(draws: Sequence[dict[str, Any]], drafter: dict[str, dict[str, Any]]) -> SliceScore:
    """The drafter alone on the items of ``draws``: its own measured tokens and seconds."""
    rows = [drafter[r["item"]] for r in draws]
    return SliceScore(len(rows), sum(bool(r["correct"]) for r in rows), tokens=float(np.mean([r["tokens"] for r in rows])),
                      seconds=float(np.mean([r["seconds"] for r in rows])))


def settings(sweep: VoteSweep, fit_first_confidences: Sequence[float]) -> list[VoteSetting]:
    """Every setting of ``sweep``; its gates default to percentiles of the fit items' first-answer confidences
    (:data:`GATE_PERCENTILES`), and no gate (never) is always among them."""
    gates: list[float | None] = list(sweep.vote_gates or ()) or sorted(
        {round(float(np.percentile(fit_first_confidences, q)), 2) for q in GATE_PERCENTILES})
    gates = [None, *gates]
    weightings: list[tuple[str, float]] = []
    for w in sweep.weightings:
        weightings += [(w, t) for t in sweep.weight_temperatures] if w == "confidence" else [(w, 1.0)]
    out = []
    for gate, cap, window, stopping, (weighting, t) in itertools.product(
            gates, sweep.caps, sweep.windows, sweep.stoppings, weightings):
        if window > cap - 1:
            continue  # a window larger than the samples the cap leaves is the same as that smaller window
        out.append(VoteSetting(gate, window, cap, stopping, weighting, t))
    return out


# -- the result -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VoteScore:
    setting: VoteSetting
    fit: SliceScore
    check: SliceScore | None


@dataclass(frozen=True)
class VoteCalibration:
    """What :func:`calibrate_vote` measured and chose; ``table()`` is what :func:`write_calibration` writes."""

    key: tuple[str, str]
    dev_set: str
    items: int
    date: str
    records: Path
    sample_temperature: float
    times: StepTimes
    drafter_name: str
    drafter_fit: SliceScore
    drafter_check: SliceScore | None
    scores: tuple[VoteScore, ...]
    chosen: VoteScore | None  # None: the drafter alone
    fitted_on: str = ""  # "items 200-229"
    checked_on: str = ""
    why: str = ""  # why the drafter alone was kept, when it was
    candidates: tuple[VoteScore, ...] = field(default=())

    def table(self) -> dict[str, Any]:
        """The config table: the chosen settings, then the evidence."""
        values = (self.chosen.setting.values(self.sample_temperature) if self.chosen is not None
                  else {"policy": BASELINE_POLICY})
        evidence = [{"setting": f"{BASELINE_POLICY}:{self.drafter_name}", "fit": self.drafter_fit.row(),
                     **({"check": self.drafter_check.row()} if self.drafter_check else {})}]
        shown = [self.chosen] if self.chosen is not None else []
        best = max(self.scores, key=lambda s: (s.fit.right, -s.fit.seconds)) if self.scores else None
        if best is not None and best is not self.chosen:
            shown.append(best)
        for s in shown:
            evidence.append({"setting": s.setting.name, "fit": s.fit.row(), **({"check": s.check.row()} if s.check else {}),
                             "estimated_seconds": True})
        return {**values, "date": self.date, "dev_set": self.dev_set, "items": self.items,
                "records": str(self.records), "rule": RULE + (f" ({self.why})" if self.why else ""),
                "evidence": evidence}

    def to_dict(self) -> dict[str, Any]:
        """The result as ``calibrate --json`` prints it."""
        kind, name = self.key
        return {"table": f"calibrated.{kind}.{toml_key(name)}",
                "chosen": self.chosen.setting.name if self.chosen else f"{BASELINE_POLICY}:{self.drafter_name}",
                "fitted_on": self.fitted_on, "checked_on": self.checked_on,
                "step_seconds": {"one": round(self.times.one, 5), f"batch_{self.times.batch}": round(self.times.batch_time, 5)},
                **self.table()}

    def markdown(self) -> str:
        """The sweep as markdown: the drafter alone, the chosen setting, then every setting by fit accuracy."""
        t = self.times
        lines = [f"# Vote calibration on {self.dev_set}", "",
                 f"Fit on {self.fitted_on}; checked on {self.checked_on or 'nothing (every item fits)'}. "
                 f"Chosen: **{self.chosen.setting.name if self.chosen else 'the drafter alone'}**"
                 + (f" ({self.why})" if self.why else "") + ".", "",
                 f"Replayed over the `{DRAW}` draws (exact for answers and tokens); seconds per answer are ESTIMATES "
                 f"from the step times measured in the records: {1000 * t.one:.0f} ms per step alone, "
                 f"{1000 * t.batch_time:.0f} ms for a batch of {t.batch}. Rule: {RULE}.", "",
                 "| setting | fit right | won | lost | p | samples | tokens | s/answer | × drafter s | check right | check won | check lost |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

        def line(name: str, fit: SliceScore, check: SliceScore | None, base: SliceScore) -> str:
            c = f"{check.right}/{check.n} | {check.won} | {check.lost}" if check else "– | – | –"
            return (f"| {name} | {fit.right}/{fit.n} | {fit.won} | {fit.lost} | {fit.p:.3f} | {fit.samples:.2f} | "
                    f"{fit.tokens:.0f} | {fit.seconds:.1f} | {fit.seconds / base.seconds if base.seconds else 0:.2f} | {c} |")

        lines.append(line(f"{BASELINE_POLICY}:{self.drafter_name} (measured)", self.drafter_fit, self.drafter_check,
                          self.drafter_fit))
        ranked = sorted(self.scores, key=lambda s: (-s.fit.right, s.fit.seconds))
        shown = [s for i, s in enumerate(ranked) if i < SHOWN or s is self.chosen or s in self.candidates]
        for s in shown:
            mark = " **chosen**" if s is self.chosen else " (candidate)" if s in self.candidates else ""
            lines.append(line(s.setting.name + mark, s.fit, s.check, self.drafter_fit))
        if len(shown) < len(ranked):
            lines += ["", f"{len(ranked) - len(shown)} more settings, fewer items right on the fit items, not shown."]
        return "\n".join(lines) + "\n"


def choose(scores: Sequence[VoteScore], sweep: VoteSweep, drafter_check: SliceScore | None
           ) -> tuple[VoteScore | None, tuple[VoteScore, ...], str]:
    """The rule (:data:`RULE`): (the chosen setting or None for the drafter alone, the fit candidates, why the
    drafter alone was kept)."""
    candidates = tuple(s for s in scores if s.fit.won - s.fit.lost >= sweep.min_gain
                       and (sweep.significance is None or s.fit.p < sweep.significance))
    if not candidates:
        level = "" if sweep.significance is None else f" with McNemar p < {sweep.significance:g}"
        return None, (), f"no setting gained {sweep.min_gain} or more items on the fit items{level}"
    order = {id(s): i for i, s in enumerate(scores)}
    pick = min(candidates, key=lambda s: (s.fit.seconds, -s.fit.right, order[id(s)]))
    if pick.check is not None and pick.check.won - pick.check.lost < sweep.min_gain:
        return None, candidates, (f"the cheapest fit candidate, {pick.setting.name}, gained "
                                  f"{pick.check.won - pick.check.lost} items on the check items")
    return pick, candidates, ""


def replay_calibration(records: Sequence[dict[str, Any]], task: str, item_ids: Sequence[str], sweep: VoteSweep, *,
                       key: tuple[str, str], dev_set: str, records_path: Path, drafter_name: str,
                       sample_temperature: float) -> VoteCalibration:
    """The calibration over recorded draws: ``item_ids`` in order (the first ``sweep.fit_items`` fit)."""
    sweep = sweep.validate()
    single = f"{BASELINE_POLICY}:{drafter_name}"
    drafter: dict[str, dict[str, Any]] = {}
    draws: dict[str, dict[str, Any]] = {}
    for r in records:  # the first record of a pair counts, as a resume would have skipped a second
        if r.get("task") == task:
            if r.get("config") == single:
                drafter.setdefault(r["item"], r)
            elif r.get("config") == DRAW and len(r.get("branches") or ()) >= DRAWN:
                draws[r["item"]] = draws[r["item"]] if draws.get(r["item"], {}).get("config") == DRAW else r
            elif _full_vote(r, sample_temperature):
                draws.setdefault(r["item"], r)
    ids = [i for i in item_ids if i in draws and i in drafter]
    if len(ids) < 2:
        raise UsageError(f"a vote calibration needs {single} and {DRAW} records of at least two items; "
                         f"found {len(ids)} in {records_path}")
    fit_n = sweep.fit_items if sweep.fit_items is not None else max(1, len(ids) // 2)
    if fit_n > len(ids):
        raise UsageError(f"--fit-items {fit_n} is more than the {len(ids)} items recorded")
    fit = [draws[i] for i in ids[:fit_n]]
    check = [draws[i] for i in ids[fit_n:]]
    # (the step time of a batch of 7 from eval's own draws: another vote configuration's windows are smaller)
    own = [r for r in draws.values() if r.get("config") == DRAW]
    times = step_times(own or list(draws.values()), list(drafter.values()))
    scores = tuple(VoteScore(s, score_slice(fit, drafter, s, times),
                             score_slice(check, drafter, s, times) if check else None)
                   for s in settings(sweep, [r["branches"][0]["confidence"] for r in fit]))
    drafter_check = drafter_slice(check, drafter) if check else None
    chosen, candidates, why = choose(scores, sweep, drafter_check)
    return VoteCalibration(key=key, dev_set=dev_set, items=len(ids),
                           date=datetime.now(timezone.utc).isoformat(timespec="seconds"), records=records_path,
                           sample_temperature=sample_temperature, times=times, drafter_name=drafter_name,
                           drafter_fit=drafter_slice(fit, drafter), drafter_check=drafter_check, scores=scores,
                           chosen=chosen, fitted_on=_span(ids[:fit_n]), checked_on=_span(ids[fit_n:]), why=why,
                           candidates=candidates)


def _full_vote(record: dict[str, Any], sample_temperature: float) -> bool:
    """Whether a record of another vote configuration holds a whole draw: the first member sampled alone, at the
    draw's temperature, nothing killed, and all 8 answers drawn (its samples are then the draw's: each sample has
    its own generator, whatever the window)."""
    settings = record.get("settings") or {}
    return (str(record.get("config", "")).startswith(VOTE_POLICY) and len(record.get("branches") or ()) >= DRAWN
            and settings.get("sample_from", "first") == "first" and settings.get("kill") is None
            and settings.get("sample_temperature") == sample_temperature)


def _span(ids: Sequence[str]) -> str:
    if not ids:
        return ""
    if all(i.isdigit() for i in ids):
        return f"{len(ids)} items ({ids[0]}-{ids[-1]})"
    return f"{len(ids)} items ({ids[0]} … {ids[-1]})"


# -- the run --------------------------------------------------------------------------------------------------------


def calibrate_vote(members: Sequence[SpecLike], dev_set: Task, out_dir: str | os.PathLike[str], *,
                   preset: str | None = None, start: int = 0, limit: int | None = None,
                   sweep: VoteSweep | None = None, base: EnsembleConfig | None = None,
                   max_tokens: int | None = None, progress: bool = True,
                   dev_file: str | os.PathLike[str] | None = None) -> VoteCalibration:
    """Draw (the drafter alone and ``vote-all`` on the first member, on ``dev_set`` items ``start``..
    ``start+limit``: records in ``out_dir/<task>.jsonl``, a rerun resumes), then replay the sweep and choose by
    :data:`RULE`. ``preset`` names the preset ``members`` came from (it keys the config table)."""
    from edge_ensemble.eval.configs import build_configs

    sweep = (sweep or VoteSweep()).validate()
    specs = [parse_spec(m) for m in members]
    if not specs:
        raise UsageError("calibrate needs at least one member")
    base = (base or EnsembleConfig()).validate(len(specs))
    items = dev_set.items(start, limit)
    if len(items) < 2:
        raise UsageError(f"{dev_set.name} has {len(items)} item(s) from {start}; a vote calibration needs two or more "
                         "(one slice fits, the other checks)")
    if sweep.fit_items is not None and sweep.fit_items > len(items):
        raise UsageError(f"--fit-items {sweep.fit_items} is more than the {len(items)} items")
    out = Path(out_dir)
    from edge_ensemble import paths
    paths.check_out_dir(out)
    configs, ensembles = build_configs([specs[0].text], [BASELINE_POLICY, DRAW], base)
    try:
        drafter_name = configs[0].name.split(":", 1)[1]
        sample_temperature = float(configs[1].config.policy_options().sample_temperature)
        run_eval(dev_set, configs, out, start=start, limit=limit, max_tokens=max_tokens, progress=progress)
    finally:
        for e in ensembles:
            e.close()
    path = results_path(out, dev_set.name)
    return replay_calibration(read_records(path), dev_set.name, [item.id for item in items], sweep,
                              key=calibration_key(preset, specs), dev_set=describe_dev_set(dev_set, dev_file, items, start),
                              records_path=path.resolve(), drafter_name=drafter_name,
                              sample_temperature=sample_temperature)


__all__ = ["DRAW", "RULE", "VOTE_POLICY", "VOTE_SWEEP_OPTIONS", "SliceScore", "StepTimes", "VoteCalibration", "VoteScore",
           "VoteSetting", "VoteSweep", "calibrate_vote", "choose", "replay_calibration", "replay_item", "settings",
           "step_times"]
