"""Calibrate an ensemble on the user's own machine: sweep the drafter's weight, the gate and (optionally) the
sharpening over a development set, score each setting with the eval harness, keep the best one.

The drafter alone (``single:<drafter>``) is always one of the settings, and the selection rule
(:func:`select`) keeps it unless an ensemble setting answers more items right:

1. every setting answers the same items, so their correct counts compare item for item;
2. a setting is a candidate if it is the drafter alone, or an ensemble setting that answers at least
   ``min_gain`` items more than the drafter alone (default 1: a tie goes to the drafter, which is cheaper);
   with several development sets pooled (:func:`pool`), it must also not answer more than one item per
   hundred fewer than the drafter alone on any one of them;
3. among the candidates the most items right wins; a tie goes to the fewer seconds per answer, then to the
   drafter alone, then to the earlier setting of the sweep.

A setting that is clearly losing is dropped early (``drop_level``): every 20 items, an ensemble setting whose
paired record against the drafter alone so far is significantly worse (a one-sided sign test on the items
exactly one of the two got right, below ``drop_level``) runs on no further item and is never a candidate. Most
of a sweep's cost is its losing settings, and they tend to show it early; ``--drop-level off`` runs everything.
``screen`` (off by default) goes further: after that many items only the ensemble setting with the most items
right so far (ties: fewer seconds per answer, then the earlier one) goes on beside the drafter alone, so the
sweep costs about the drafter, the settings on the screened items, and one setting on the rest; the choice is
still made by the rule above on every item, so a setting that led by luck is still only chosen if it holds up.

``min_gain`` is the guard against noise: the best of a dozen settings beats the drafter by an item or two
by luck alone on a few hundred items, so raise it (``--min-gain 3``) when a false win would cost more than a
missed one. The evidence written with the choice carries, per setting, the accuracy with its 95% Wilson
interval and the paired counts against the drafter (items only it got right, items only the drafter got right).

A development set is an eval task's items (``gsm8k``, ``arc-challenge``, ...) or the user's own JSONL file,
one ``{"prompt": ..., "answer": ...}`` object a line (``id`` optional). A reference answer that is a number
("42", 42, "1,000", "3.5") is matched as GSM8K answers are: the number after the output's last "answer is",
else its last number, equal as a decimal. Any other reference is matched against the whole output after
normalisation (:func:`normalize_text`: Unicode NFKC, lower case, white space folded, a leading "the answer is"
and surrounding quotes, asterisks and punctuation dropped): ask for the bare answer in the prompt.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

from edge_ensemble import paths
from edge_ensemble.api import Ensemble, EnsembleConfig
from edge_ensemble.calibration import calibration_key
from edge_ensemble.errors import EdgeEnsembleError, UsageError, warn
from edge_ensemble.eval import scoring
from edge_ensemble.eval.calibrate_file import plain, write_calibration
from edge_ensemble.eval.calibrate_results import (RULE, CalibrationResult, Score, Setting, dropped_note, pool, select,
                                                  sweep_table, within_allowance)
from edge_ensemble.eval.configs import EngineConfig
from edge_ensemble.eval.devsets import USER_FILE_MAX_TOKENS, describe_dev_set, dev_task, load_dev_file, normalize_text
from edge_ensemble.eval.report import paired_comparisons, summarize
from edge_ensemble.eval.runner import Progress, read_records, results_path, run_eval
from edge_ensemble.eval.tasks import Item, Task
from edge_ensemble.options import Option, checked_sweep, option
from edge_ensemble.policies import BASELINE_POLICY, DEFAULT_POLICY, declarations, registry
from edge_ensemble.sources import ModelSpec, SpecLike, parse_spec

CALIBRATED = DEFAULT_POLICY  # the policy whose member weights and gate a calibration sweeps (SAFE)

# The results, the rule and pooling are in calibrate_results, the config table in calibrate_file, the development
# sets in devsets; every name is importable from here as before.

# -- the sweep, declared once: flags, defaults, ranges and checks ---------------------------------------------

DRAFTER_WEIGHTS = Option("drafter_weights", tuple, (1.0, 1.5, 2.0, 3.0), "Drafter weights to try (the others weigh 1).",
                         item=float, range=(0.0, math.inf), above=True, shown_default="1,1.5,2,3")
GATES = Option("gates", tuple, (0.3, 0.5, 0.7), "Gates to try (verify where the drafter's top-1 probability is "
               "below it).", item=float, range=(0.0, 1.0), shown_default="0.3,0.5,0.7")
SHARPEN_MODES = Option("sharpen_modes", tuple, (), "Sharpening modes to try, repeat for several: prefix, geometric, "
                       "none.", item=str, choices=("prefix", "geometric", "none"),
                       shown_default="the default sharpening only")
MIN_GAIN = Option("min_gain", int, 1, "Items an ensemble setting must answer right beyond the drafter alone to be "
                  "chosen (0: a tie may go to a faster ensemble setting).", range=(0, 1 << 20))
DROP_LEVEL = Option("drop_level", float, 0.01, "Stop running an ensemble setting once a one-sided sign test against "
                    "the drafter alone on the items so far is below this (checked every 20 items); off: every "
                    "setting runs on every item.", range=(0.0, 0.5), above=True, off=True)
SCREEN = Option("screen", int, None, "After this many items only the best ensemble setting so far goes on, beside "
                "the drafter alone: a cheaper sweep whose choice is still measured on every item; off: every setting "
                "runs on every item.", range=(1, 1 << 20), off=True, shown_default="off")
SWEEP_OPTIONS: tuple[Option, ...] = (DRAFTER_WEIGHTS, GATES, SHARPEN_MODES, MIN_GAIN, DROP_LEVEL, SCREEN)
DROP_CHECK_EVERY = 20  # items between two checks of drop_level (a check is cheap; fewer looks, fewer false drops)


@dataclass(frozen=True)
class Sweep:
    """What :func:`calibrate` tries (fields: :data:`SWEEP_OPTIONS`); :meth:`validate` checks every value."""

    drafter_weights: tuple[float, ...] = option(DRAFTER_WEIGHTS)
    gates: tuple[float, ...] = option(GATES)
    sharpen_modes: tuple[str, ...] = option(SHARPEN_MODES)
    min_gain: int = option(MIN_GAIN)
    drop_level: float | None = option(DROP_LEVEL)
    screen: int | None = option(SCREEN)

    def validate(self, where: Callable[[str], str] = str) -> "Sweep":
        """This sweep with every value checked (``where(name)`` names a bad one, e.g. its flag); a value given
        twice (``0.5,0.5``, ``1,1.0``) would be two settings of one name, so it is refused."""
        return checked_sweep(self, SWEEP_OPTIONS, where)


# -- the sweep and the choice ---------------------------------------------------------------------------------


def settings(sweep: Sweep, n_members: int, default_sharpen: str) -> list[Setting]:
    """The ensemble settings of ``sweep`` (the drafter alone is added by :func:`calibrate`)."""
    modes = sweep.sharpen_modes or (default_sharpen,)
    out = []
    for w in sweep.drafter_weights:
        for g in sweep.gates:
            for mode in modes:
                name = f"{CALIBRATED} w={w:g} gate={g:g}" + (f" sharpen={mode}" if sweep.sharpen_modes else "")
                values: dict[str, Any] = {"policy": CALIBRATED, "weights": [float(w)] + [1.0] * (n_members - 1),
                                          "gate": float(g)}
                values["sharpen"] = mode  # measured with it, so the calibration applies it (not another one)
                out.append(Setting(name, values))
    return out


def _fingerprint(members: Sequence[ModelSpec], base: EnsembleConfig, sweep: Sweep) -> dict[str, Any]:
    """What the records of a calibration depend on besides the sweep: a resumed run must match it (the
    sharpening too, unless the sweep tries several)."""
    cfg = base.to_dict()
    swept = {"weights", "gate", *(("sharpen",) if sweep.sharpen_modes else ())}
    # Only what the settings' policies read: another policy's option (eager's threshold) changes no record.
    read = [o.name for name in _SETTING_POLICIES for o in declarations(registry.get(name).Options)]
    return plain({"members": calibration_key(None, members)[1],
                   # parallel: answers decoded side by side share their seconds (the tie-break) and batch numerics
                   "options": {k: cfg[k] for k in dict.fromkeys((*read, "n_ctx", "parallel")) if k not in swept}})


# The policies a calibration's settings use: the drafter alone, and the default policy (SAFE) whose member weights
# and gate it sweeps.
_SETTING_POLICIES = (BASELINE_POLICY, CALIBRATED)


def _first_difference(earlier: Any, now: dict[str, Any]) -> str | None:
    """What a calibration directory's manifest says that this run does not (None: nothing this run's records
    depend on). Only the keys this run records are compared: a manifest of an older calibrate also lists
    options no setting reads, which change no record."""
    if not isinstance(earlier, dict) or not isinstance(earlier.get("options"), dict):
        return "an unreadable manifest (calibrate.json)"
    if earlier.get("members") != now["members"]:
        return f"other members ({earlier.get('members')}, not {now['members']})"
    then = {**_UNRECORDED, **earlier["options"]}
    for key, value in now["options"].items():
        if key not in then:
            return f"an older calibrate that did not record {key}"
        if then[key] != value:
            return f"{key} = {then[key]} (this run: {value})"
    return None


_UNRECORDED = {"parallel": 1}  # what a calibrate that did not record an option ran with


def _check_resume(out_dir: Path, fingerprint: dict[str, Any]) -> bool:
    """Refuse an ``out_dir`` whose records were made another way, or that cannot be written; True when its
    manifest must be (re)written (see :func:`_write_manifest`). Writes nothing: a run that fails before its
    first record (a missing model) must not leave a manifest that blocks the corrected rerun, and a manifest
    with no record beside it (a run that failed on its first item) blocks nothing."""
    paths.check_out_dir(out_dir)
    manifest = out_dir / "calibrate.json"
    if not manifest.exists():
        return True
    try:
        earlier = json.loads(manifest.read_text("utf-8"))
    except (OSError, ValueError):
        earlier = None
    difference = _first_difference(earlier, fingerprint)
    if difference is not None and _holds_records(out_dir):
        raise UsageError(f"{out_dir} holds a calibration made with {difference}; "
                         "pass another --out (or move it away) so the two are not mixed")
    return earlier != fingerprint  # an older manifest of the same options: rewritten in this run's form


def _holds_records(out_dir: Path) -> bool:
    return any(p.stat().st_size > 0 for p in out_dir.glob("*.jsonl"))


def _write_manifest(out_dir: Path, fingerprint: dict[str, Any]) -> None:
    """Write the manifest, checked again first: another run may have begun in this directory while the models
    loaded."""
    _check_resume(out_dir, fingerprint)
    paths.make_out_dir(out_dir)
    try:
        paths.write_text_atomic(out_dir / "calibrate.json", json.dumps(fingerprint, indent=1) + "\n")
    except OSError as e:
        raise UsageError(f"--out {out_dir}: cannot write calibrate.json ({e.strerror or e}); pass another --out") from None


def calibrate(members: Sequence[SpecLike], dev_set: Task, out_dir: str | os.PathLike[str], *,
              preset: str | None = None, start: int = 0, limit: int | None = None, sweep: Sweep | None = None,
              base: EnsembleConfig | None = None, max_tokens: int | None = None, progress: bool = True,
              dev_file: str | os.PathLike[str] | None = None, skip: Collection[str] = ()) -> CalibrationResult:
    """Run the drafter alone and every setting of ``sweep`` on ``dev_set`` items ``start``..``start+limit``
    (records in ``out_dir/<task>.jsonl``: a rerun resumes), dropping clear losers on the way (``drop_level``),
    and choose one by :func:`select`.

    ``preset`` names the preset ``members`` came from (it keys the config table); ``base`` holds the other
    options (load options such as ``n_threads``; policy options stay at their defaults otherwise); ``skip``:
    names of settings not to run at all (dropped on an earlier development set that will be pooled with this one).
    """
    sweep = (sweep or Sweep()).validate()
    specs = [parse_spec(m) for m in members]
    if len(specs) < 2:
        raise UsageError("calibrate needs an ensemble of at least two members (the first drafts)")
    base = (base or EnsembleConfig()).validate(len(specs))
    items = dev_set.items(start, limit)
    if not items:
        raise UsageError(f"{dev_set.name} has no items from {start}")
    if sweep.screen is not None and sweep.screen >= len(items):
        warn(f"--screen {sweep.screen} is not below the {len(items)} items: every setting runs on every item")
    out = Path(out_dir)
    fingerprint = _fingerprint(specs, base, sweep)
    rewrite = _check_resume(out, fingerprint)
    ensembles: list[Ensemble] = []
    try:
        single = Ensemble([specs[0]], config=replace(base, policy=BASELINE_POLICY), progress=progress)
        ensembles.append(single)
        full = Ensemble(specs, config=base, progress=progress)
        ensembles.append(full)
        if rewrite:  # (once the models have loaded: see _check_resume)
            _write_manifest(out, fingerprint)
        drafter = Setting(f"{BASELINE_POLICY}:{single.members[0].name}", {"policy": BASELINE_POLICY})
        every = [drafter, *(s for s in settings(sweep, len(specs), base.sharpen) if s.name not in skip)]
        configs = [EngineConfig(drafter.name, single, single.config)] + [
            EngineConfig(s.name, full, replace(base, **{k: tuple(v) if k == "weights" else v
                                                        for k, v in s.values.items()}).validate(len(specs)))
            for s in every[1:]]
        path, dropped, screened = _run_dropping(dev_set, configs, out, items, start, max_tokens, progress,
                                                sweep.drop_level, sweep.screen)
    finally:
        for e in ensembles:
            e.close()
    scores = _scores(read_records(path), every, [item.id for item in items], dev_set.name, dropped, screened)
    return CalibrationResult(
        key=calibration_key(preset, specs), dev_set=describe_dev_set(dev_set, dev_file, items, start), items=len(items),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), scores=tuple(scores),
        chosen=select(scores, sweep.min_gain), records=path.resolve())


def _run_dropping(task: Task, configs: Sequence[EngineConfig], out: Path, items: Sequence[Item], start: int,
                  max_tokens: int | None, progress: bool, level: float | None,
                  screen: int | None = None) -> tuple[Path, dict[str, int], set[str]]:
    """Run ``configs`` (the drafter alone first) on ``items`` in chunks; every :data:`DROP_CHECK_EVERY` items
    drop the ensemble settings that lose to the drafter alone below ``level``, and after ``screen`` items all
    but the best ensemble setting. Returns the records' path, the stopped settings with the items each ran on,
    and which of them were screened out. A resumed run replays the same checks on the same records, so it stops
    the same settings at the same points."""
    path = results_path(out, task.name)
    ids = [item.id for item in items]
    drafter, alive = configs[0].name, list(configs)
    dropped: dict[str, int] = {}
    screened: set[str] = set()
    bar = Progress(_pending(read_records(path), task.name, [c.name for c in alive], ids), task.name, enabled=progress)
    checks = set(range(DROP_CHECK_EVERY, len(items), DROP_CHECK_EVERY)) if level is not None else set()
    if screen is not None and screen < len(items):
        checks.add(screen)
    try:
        lo = 0
        for hi in sorted(checks | {len(items)}):
            run_eval(task, alive, out, start=start + lo, limit=hi - lo, max_tokens=max_tokens, progress=progress,
                     bar=bar)
            lo = hi
            if hi >= len(items):  # after the last item there is nothing left to spare
                break
            records = read_records(path)
            seen, names = set(ids[:hi]), {c.name for c in alive}
            so_far = [r for r in records if r.get("task") == task.name and r.get("item") in seen
                      and r.get("config") in names]
            if level is not None and hi % DROP_CHECK_EVERY == 0:
                versus = {p.config: p for p in paired_comparisons(so_far) if p.baseline == drafter}
                for config in alive[1:]:
                    pair = versus.get(config.name)
                    if pair is not None and scoring.sign_test_fewer(pair.only_config, pair.only_baseline) < level:
                        dropped[config.name] = hi
            if hi == screen:
                summaries = {x.config: x for x in summarize(so_far)}
                rest = [(i, c) for i, c in enumerate(alive[1:]) if c.name not in dropped and c.name in summaries]
                if rest:
                    best = min(rest, key=lambda ic: (-summaries[ic[1].name].correct,
                                                     summaries[ic[1].name].seconds_per_answer or 0.0, ic[0]))[1]
                    for _, config in rest:
                        if config is not best:
                            dropped[config.name] = hi
                            screened.add(config.name)
            alive = [c for c in alive if c.name not in dropped]
            bar.total = bar.done + _pending(records, task.name, [c.name for c in alive], ids[hi:])
    finally:
        bar.close()
    return path, dropped, screened


def _pending(records: Sequence[dict[str, Any]], task: str, names: Sequence[str], ids: Sequence[str]) -> int:
    """How many (item, setting) pairs of ``ids`` x ``names`` have no record yet."""
    done = {(r.get("item"), r.get("config")) for r in records if r.get("task") == task}
    return sum((i, n) not in done for i in ids for n in names)


def _scores(records: Sequence[dict[str, Any]], every: Sequence[Setting], items: Sequence[str], task: str,
            dropped: dict[str, int], screened: Collection[str] = ()) -> list[Score]:
    """Each setting's summary on exactly these items (a results file may hold others from earlier sweeps); a
    dropped setting's on the items it ran on before it was dropped (records of later items from an earlier run
    without dropping are left out, so a resumed run scores what a fresh one would)."""
    names = {s.name for s in every}
    ran = {s.name: set(items[:dropped.get(s.name, len(items))]) for s in every}
    mine = [r for r in records if r.get("task") == task and r.get("config") in names and r.get("item") in ran[r["config"]]]
    # Two processes writing one results file (a record shared in beside a run that had the same item in flight)
    # may leave two answers to one item: the first one written counts, as a resume would have skipped the second.
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for r in mine:
        first.setdefault((r["config"], r["item"]), r)
    mine = list(first.values())
    summaries = {s.config: s for s in summarize(mine)}
    paired = {p.config: p for p in paired_comparisons(mine) if p.baseline == every[0].name}
    missing = [s.name for s in every if s.name not in summaries]
    if missing:  # run_eval writes every pair: only a file changed under us gets here
        raise EdgeEnsembleError(f"no records of {', '.join(missing)} in the results; rerun calibrate")
    return [Score(s, summaries[s.name], paired[s.name].only_config if s.name in paired else 0,
                  paired[s.name].only_baseline if s.name in paired else 0, dropped.get(s.name), s.name in screened)
            for s in every]


__all__ = ["DROP_CHECK_EVERY", "SWEEP_OPTIONS", "CalibrationResult", "Score", "Setting", "Sweep", "calibrate", "dev_task",
           "dropped_note", "load_dev_file", "normalize_text", "pool", "select", "settings", "within_allowance", "write_calibration"]
