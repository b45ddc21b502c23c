"""What a calibration (:mod:`edge_ensemble.eval.calibrate`) measured and chose: each setting's :class:`Score`, the
:class:`CalibrationResult`, the selection rule (:func:`select`), several development sets pooled into one
(:func:`pool`), and the result as markdown (:func:`sweep_table`, :func:`dropped_note`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from edge_ensemble.calibration import toml_key
from edge_ensemble.errors import UsageError
from edge_ensemble.eval import scoring
from edge_ensemble.eval.report import Summary
from edge_ensemble.policies import BASELINE_POLICY


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: a name for the records and the options it sets."""

    name: str
    values: dict[str, Any]  # config key -> value: policy, and for an ensemble weights, gate (and sharpen)


@dataclass(frozen=True)
class Score:
    """A setting's result on the development set."""

    setting: Setting
    summary: Summary
    only_setting: int = 0  # items this setting got right and the drafter alone wrong
    only_drafter: int = 0
    dropped_after: int | None = None  # items it ran on before drop_level or screen stopped it (None: it ran on all)
    screened_out: bool = False  # stopped by screen (another setting was ahead), not as clearly losing
    ran_on: str = ""  # pooled and not run on every item: where it ran and where it stopped, set by set

    @property
    def is_drafter(self) -> bool:
        return self.setting.values.get("policy") == BASELINE_POLICY

    def evidence(self) -> dict[str, Any]:
        """One row of the evidence written into the config."""
        s = self.summary
        row: dict[str, Any] = {"setting": self.setting.name, "correct": s.correct, "n": s.n,
                               "accuracy": round(s.accuracy, 4), "ci95": [round(s.ci_low, 4), round(s.ci_high, 4)],
                               "tokens_per_second": round(s.tokens_per_second or 0.0, 2),
                               "seconds_per_answer": round(s.seconds_per_answer or 0.0, 3)}
        if not self.is_drafter:
            row.update(only_setting=self.only_setting, only_drafter=self.only_drafter)
        if self.dropped_after is not None:
            # the items it ran on (pooled: over every set), as the row's n
            row["screened_out_after" if self.screened_out else "dropped_after"] = self.dropped_after
        if self.ran_on:
            row["ran_on"] = self.ran_on
        return row


@dataclass(frozen=True)
class CalibrationResult:
    """What :func:`calibrate` measured and chose, and where its config table goes (:func:`write_calibration`)."""

    key: tuple[str, str]  # :func:`edge_ensemble.calibration.calibration_key`
    dev_set: str
    items: int
    date: str
    scores: tuple[Score, ...]  # the drafter alone first, then the sweep in order
    chosen: Score
    records: Path

    @property
    def drafter(self) -> Score:
        return self.scores[0]

    def table(self) -> dict[str, Any]:
        """The config table: the chosen settings, then the evidence."""
        return {**self.chosen.setting.values, "date": self.date, "dev_set": self.dev_set, "items": self.items,
                "records": str(self.records), "rule": RULE, "evidence": [s.evidence() for s in self.scores]}

    def to_dict(self) -> dict[str, Any]:
        """The result as ``calibrate --json`` prints it."""
        kind, name = self.key
        return {"table": f"calibrated.{kind}.{toml_key(name)}", "chosen": self.chosen.setting.name,
                **self.table()}


RULE = ("drafter alone unless an ensemble setting answers at least min_gain more items right; then most right, "
        "ties to fewer seconds per answer; settings dropped early as losing or screened out are never chosen")


def select(scores: Sequence[Score], min_gain: int, eligible: Sequence[bool] | None = None) -> Score:
    """The chosen setting (the rule: see :mod:`edge_ensemble.eval.calibrate`): ``scores[0]`` is the drafter alone;
    ``eligible``: which settings may be chosen at all (:func:`pool`: not worse than the drafter on any one
    development set)."""
    drafter = scores[0]
    candidates = [(i, s) for i, s in enumerate(scores)
                  if s is drafter or (s.dropped_after is None and s.summary.correct >= drafter.summary.correct + min_gain
                                      and (eligible is None or eligible[i]))]
    return min(candidates, key=lambda c: (-c[1].summary.correct, c[1].summary.seconds_per_answer or 0.0,
                                          c[1] is not drafter, c[0]))[1]


# -- several development sets as one --------------------------------------------------------------------------


def pool(results: Sequence[CalibrationResult], min_gain: int = 1) -> CalibrationResult:
    """Several development sets (say GSM8K and ARC) as one: each setting's items added up, the rule applied
    to the sums, among the settings that on no single set answer more than one item per hundred fewer than
    the drafter alone (a gain on one set must not hide a loss on another). The results must be of the same
    ensemble and sweep."""
    if not results:
        raise UsageError("nothing to pool")
    if len({r.key for r in results}) != 1 or len({r.drafter.setting.name for r in results}) != 1:
        raise UsageError("pool needs calibrations of one ensemble")
    by_name = [{s.setting.name: s for s in r.scores} for r in results]
    names = list(by_name[0])
    if any(not b.keys() <= by_name[0].keys() for b in by_name[1:]):
        raise UsageError("pool needs calibrations of one sweep (the later sets may only skip settings)")
    # A setting dropped on one set (or skipped there, having been dropped on an earlier one) is shown with
    # the items it ran on and is never chosen.
    scores: list[Score] = []
    eligible: list[bool] = []
    for name in names:
        parts = [b[name] for b in by_name if name in b]
        first = parts[0]
        n = sum(p.summary.n for p in parts)
        correct = sum(p.summary.correct for p in parts)
        seconds = sum((p.summary.seconds_per_answer or 0.0) * p.summary.n for p in parts)
        tokens = sum((p.summary.tokens_per_second or 0.0) * (p.summary.seconds_per_answer or 0.0) * p.summary.n
                     for p in parts)
        low, high = scoring.wilson_interval(correct, n)
        summary = Summary("+".join(p.summary.task for p in parts), first.summary.config, n, correct, correct / n,
                          low, high, tokens / seconds if seconds > 0 else None, None, seconds_per_answer=seconds / n)
        complete = len(parts) == len(results) and all(p.dropped_after is None for p in parts)
        scores.append(Score(first.setting, summary, sum(p.only_setting for p in parts),
                            sum(p.only_drafter for p in parts), None if complete else n,
                            any(p.screened_out for p in parts), "" if complete else _ran_on(name, by_name, results)))
        eligible.append(complete and all(within_allowance(b[name], r) for b, r in zip(by_name, results)))
    return replace(results[0], dev_set=" + ".join(r.dev_set for r in results), items=sum(r.items for r in results),
                   date=max(r.date for r in results),  # (ISO dates in UTC compare as text) when the last set ended
                   scores=tuple(scores), chosen=select(scores, min_gain, eligible),
                   records=Path(os.path.commonpath([r.records.parent for r in results])))


def _ran_on(name: str, by_name: Sequence[dict[str, Score]], results: Sequence[CalibrationResult]) -> str:
    """Where a pooled setting ran, set by set: "all arc-challenge items 0-299, 60 of gsm8k items 0-199
    (screened out)"."""
    out = []
    for b, r in zip(by_name, results):
        part = b.get(name)
        if part is None:
            out.append(f"not run on {r.dev_set}")
        elif part.dropped_after is None:
            out.append(f"all {r.dev_set}")
        else:
            out.append(f"{part.dropped_after} of {r.dev_set} ({'screened out' if part.screened_out else 'dropped'})")
    return ", ".join(out)


def within_allowance(score: Score, result: CalibrationResult) -> bool:
    """Whether ``score`` answers at most one item per hundred fewer than the drafter alone on ``result``'s set:
    the condition :func:`pool` puts on every set."""
    return score.summary.correct >= result.drafter.summary.correct - result.items // 100


# -- the result as markdown -----------------------------------------------------------------------------------


def dropped_note(scores: Sequence[Score]) -> str:
    """A line naming the settings that did not run on every item (their rows count fewer), or "" when all did."""
    dropped = [f"{s.setting.name} ran on {s.dropped_after} items"
               + (f": {s.ran_on}" if s.ran_on else " (screened out)" if s.screened_out else "")
               for s in scores if s.dropped_after is not None]
    return (f"Not run on every item, so never chosen (dropped as clearly losing to the drafter alone, skipped "
            f"after losing on an earlier set, or screened out: another setting was ahead after the screening "
            f"items): {'; '.join(dropped)}.\n") if dropped else ""


def sweep_table(result: CalibrationResult) -> str:
    """``result``'s settings as a markdown table: accuracy with its 95 % interval, speed, and the paired record
    against the drafter alone (items only this setting / only the drafter got right, exact McNemar p)."""
    lines = ["| setting | right | accuracy | 95% CI | tok/s | s/answer | vs drafter (+won -lost) | McNemar p | |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for score in result.scores:
        s = score.summary
        if score.is_drafter:
            versus, p = "", ""
        else:
            versus = f"+{score.only_setting} -{score.only_drafter}"
            p = f"{scoring.mcnemar_exact(score.only_setting, score.only_drafter):.2f}"
        mark = ("**chosen**" if score is result.chosen
                else f"{'screened out' if score.screened_out else 'dropped'} ({score.ran_on or f'ran on {score.dropped_after} items'})"
                if score.dropped_after is not None else "")
        lines.append(f"| {score.setting.name} | {s.correct}/{s.n} | {100 * s.accuracy:.1f}% | "
                     f"{100 * s.ci_low:.1f}–{100 * s.ci_high:.1f}% | {s.tokens_per_second or 0:.1f} | "
                     f"{s.seconds_per_answer or 0:.2f} | {versus} | {p} | {mark} |")
    return "\n".join(lines) + "\n"


__all__ = ["RULE", "CalibrationResult", "Score", "Setting", "dropped_note", "pool", "select", "sweep_table",
           "within_allowance"]
