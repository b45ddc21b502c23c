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

import hashlib
import json
import math
import os
import re
import sys
import unicodedata
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

from edge_ensemble import paths
from edge_ensemble.api import Ensemble, EnsembleConfig
from edge_ensemble.config import calibration_key, parse_calibrations, toml_key
from edge_ensemble.errors import EdgeEnsembleError, UsageError, warn
from edge_ensemble.eval import scoring
from edge_ensemble.eval.configs import EngineConfig
from edge_ensemble.eval.report import Summary, paired_comparisons, summarize
from edge_ensemble.eval.runner import Progress, read_records, results_path, run_eval
from edge_ensemble.eval.tasks import Item, Task, get_task
from edge_ensemble.options import Option, replace_checked, with_options
from edge_ensemble.policies import declarations, registry
from edge_ensemble.sources import ModelSpec, SpecLike, parse_spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

# -- the sweep, declared once: flags, defaults, ranges and checks ---------------------------------------------

SWEEP_OPTIONS: tuple[Option, ...] = (
    Option("drafter_weights", tuple, (1.0, 1.5, 2.0, 3.0), "Drafter weights to try (the others weigh 1).",
           item=float, range=(0.0, math.inf), above=True, shown_default="1,1.5,2,3"),
    Option("gates", tuple, (0.3, 0.5, 0.7), "Gates to try (verify where the drafter's top-1 probability is "
           "below it).", item=float, range=(0.0, 1.0), shown_default="0.3,0.5,0.7"),
    Option("sharpen_modes", tuple, (), "Sharpening modes to try, repeat for several: prefix, geometric, none.",
           item=str, choices=("prefix", "geometric", "none"), shown_default="the default sharpening only"),
    Option("min_gain", int, 1, "Items an ensemble setting must answer right beyond the drafter alone to be chosen "
           "(0: a tie may go to a faster ensemble setting).", range=(0, 1 << 20)),
    Option("drop_level", float, 0.01, "Stop running an ensemble setting once a one-sided sign test against the "
           "drafter alone on the items so far is below this (checked every 20 items); off: every setting runs on "
           "every item.", range=(0.0, 0.5), above=True, off=True),
    Option("screen", int, None, "After this many items only the best ensemble setting so far goes on, beside the "
           "drafter alone: a cheaper sweep whose choice is still measured on every item; off: every setting runs "
           "on every item.", range=(1, 1 << 20), off=True, shown_default="off"),
)
DROP_CHECK_EVERY = 20  # items between two checks of drop_level (a check is cheap; fewer looks, fewer false drops)
USER_FILE_MAX_TOKENS = 256  # a user file's answers are short: the prompt asks for the answer alone


@with_options(*SWEEP_OPTIONS)
class Sweep:
    """What :func:`calibrate` tries (fields: :data:`SWEEP_OPTIONS`); :meth:`validate` checks every value."""

    def validate(self, where: Callable[[str], str] = str) -> "Sweep":
        """This sweep with every value checked (``where(name)`` names a bad one, e.g. its flag); a value given
        twice (``0.5,0.5``, ``1,1.0``) would be two settings of one name, so it is refused."""
        checked = replace_checked(self, {o.name: o for o in SWEEP_OPTIONS}, where)
        for o in SWEEP_OPTIONS:
            values = getattr(checked, o.name)
            if isinstance(values, tuple) and len(set(values)) != len(values):
                raise UsageError(f"{where(o.name)}: {','.join(f'{v:g}' if isinstance(v, float) else str(v) for v in values)}"
                                 " repeats a value; give each once")
        return checked


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
        return self.setting.values.get("policy") == "single"

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

    key: tuple[str, str]  # :func:`edge_ensemble.config.calibration_key`
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


# -- development sets -----------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """An answer reduced for exact matching: NFKC, lower case, white space folded, a leading "the answer is" /
    "answer:" and surrounding quotes, asterisks and punctuation dropped."""
    s = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    s = re.sub(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*", "", s)
    return s.strip(" \t\"'`*_.,;:!?()[]{}")


def _is_number(answer: str) -> bool:
    return scoring.normalize_number(answer) is not None


def _file_extract(item: Item, text: str) -> str | None:
    return scoring.extract_gsm8k_answer(text) if _is_number(item.gold) else normalize_text(text)


def _file_score(item: Item, extracted: str | None) -> tuple[bool, str]:
    if _is_number(item.gold):
        return scoring.numbers_equal(extracted, item.gold), ""
    return extracted is not None and extracted == normalize_text(item.gold), ""


def load_dev_file(path: str | os.PathLike[str]) -> Task:
    """The user's JSONL development file as a :class:`Task`; a :class:`UsageError` naming ``file:line`` for a
    line that is not a JSON object with a non-empty string ``prompt`` and a string or number ``answer``.

    The task is named after the file and a hash of its content, so an edited file never resumes old records.
    """
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except OSError as e:
        raise UsageError(f"cannot read development file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"development file {path} is not UTF-8 text") from None
    items: list[Item] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise UsageError(f'{where}: expected an object {{"prompt": ..., "answer": ...}}; got {type(row).__name__}')
        missing = [k for k in ("prompt", "answer") if k not in row]
        if missing:
            raise UsageError(f'{where}: missing {" and ".join(map(repr, missing))} (each line is '
                             '{"prompt": ..., "answer": ...})')
        prompt, answer = row["prompt"], row["answer"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"{where}: prompt must be a non-empty string; got {prompt!r}")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            raise UsageError(f"{where}: answer must be a non-empty string or a number; got {answer!r}")
        item_id = str(row.get("id", number))
        if item_id in seen:
            raise UsageError(f"{where}: id {item_id!r} is used twice")
        seen.add(item_id)
        items.append(Item(id=item_id, gold=str(answer).strip(), data={"prompt": prompt}))
    if not items:
        raise UsageError(f"development file {path} holds no items")
    name = f"file-{path.stem}-{hashlib.sha256(data).hexdigest()[:8]}"
    return Task(name, lambda: items, lambda item: [{"role": "user", "content": item.data["prompt"]}],
                _file_extract, _file_score, max_tokens=USER_FILE_MAX_TOKENS, dev_limit=None)


def dev_task(task: str | None = None, file: str | os.PathLike[str] | None = None) -> Task:
    """The development set: the eval task called ``task`` or the JSONL ``file`` (exactly one of them)."""
    if (task is None) == (file is None):
        raise UsageError("give the development set: either --task NAME or --file FILE.jsonl")
    return get_task(task) if task is not None else load_dev_file(file)  # type: ignore[arg-type]


def _describe(task: Task, file: Any, items: Sequence[Item], start: int) -> str:
    source = str(Path(file).expanduser().resolve()) if file is not None else task.name
    return f"{source} items {start}-{start + len(items) - 1}"


# -- the sweep and the choice ---------------------------------------------------------------------------------


def settings(sweep: Sweep, n_members: int, default_sharpen: str) -> list[Setting]:
    """The ensemble settings of ``sweep`` (the drafter alone is added by :func:`calibrate`)."""
    modes = sweep.sharpen_modes or (default_sharpen,)  # type: ignore[attr-defined]
    out = []
    for w in sweep.drafter_weights:  # type: ignore[attr-defined]
        for g in sweep.gates:  # type: ignore[attr-defined]
            for mode in modes:
                name = f"safe w={w:g} gate={g:g}" + (f" sharpen={mode}" if sweep.sharpen_modes else "")  # type: ignore[attr-defined]
                values: dict[str, Any] = {"policy": "safe", "weights": [float(w)] + [1.0] * (n_members - 1),
                                          "gate": float(g)}
                values["sharpen"] = mode  # measured with it, so the calibration applies it (not another one)
                out.append(Setting(name, values))
    return out


def select(scores: Sequence[Score], min_gain: int, eligible: Sequence[bool] | None = None) -> Score:
    """The chosen setting (see the module docstring): ``scores[0]`` is the drafter alone; ``eligible``: which
    settings may be chosen at all (:func:`pool`: not worse than the drafter on any one development set)."""
    drafter = scores[0]
    candidates = [(i, s) for i, s in enumerate(scores)
                  if s is drafter or (s.dropped_after is None and s.summary.correct >= drafter.summary.correct + min_gain
                                      and (eligible is None or eligible[i]))]
    return min(candidates, key=lambda c: (-c[1].summary.correct, c[1].summary.seconds_per_answer or 0.0,
                                          c[1] is not drafter, c[0]))[1]


def _fingerprint(members: Sequence[ModelSpec], base: EnsembleConfig, sweep: Sweep) -> dict[str, Any]:
    """What the records of a calibration depend on besides the sweep: a resumed run must match it (the
    sharpening too, unless the sweep tries several)."""
    cfg = base.to_dict()
    swept = {"weights", "gate", *(("sharpen",) if sweep.sharpen_modes else ())}  # type: ignore[attr-defined]
    # Only what the settings' policies read: another policy's option (eager's threshold) changes no record.
    read = [o.name for name in _SETTING_POLICIES for o in declarations(registry.get(name).Options)]
    return _plain({"members": calibration_key(None, members)[1],
                   # parallel: answers decoded side by side share their seconds (the tie-break) and batch numerics
                   "options": {k: cfg[k] for k in dict.fromkeys((*read, "n_ctx", "parallel")) if k not in swept}})


_SETTING_POLICIES = ("single", "safe")  # the policies a calibration's settings use (drafter alone; SAFE)


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists, dates strings): for comparisons."""
    return json.loads(json.dumps(value, default=str))


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
    if sweep.screen is not None and sweep.screen >= len(items):  # type: ignore[attr-defined]
        warn(f"--screen {sweep.screen} is not below the {len(items)} items: every setting runs on every item")  # type: ignore[attr-defined]
    out = Path(out_dir)
    fingerprint = _fingerprint(specs, base, sweep)
    rewrite = _check_resume(out, fingerprint)
    ensembles: list[Ensemble] = []
    try:
        single = Ensemble([specs[0]], config=replace(base, policy="single"), progress=progress)
        ensembles.append(single)
        full = Ensemble(specs, config=base, progress=progress)
        ensembles.append(full)
        if rewrite:  # (once the models have loaded: see _check_resume)
            _write_manifest(out, fingerprint)
        drafter = Setting(f"single:{single.members[0].name}", {"policy": "single"})
        every = [drafter, *(s for s in settings(sweep, len(specs), base.sharpen) if s.name not in skip)]  # type: ignore[attr-defined]
        configs = [EngineConfig(drafter.name, single, single.config)] + [
            EngineConfig(s.name, full, replace(base, **{k: tuple(v) if k == "weights" else v
                                                        for k, v in s.values.items()}).validate(len(specs)))
            for s in every[1:]]
        path, dropped, screened = _run_dropping(dev_set, configs, out, items, start, max_tokens, progress,
                                                sweep.drop_level, sweep.screen)  # type: ignore[attr-defined]
    finally:
        for e in ensembles:
            e.close()
    scores = _scores(read_records(path), every, [item.id for item in items], dev_set.name, dropped, screened)
    return CalibrationResult(
        key=calibration_key(preset, specs), dev_set=_describe(dev_set, dev_file, items, start), items=len(items),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"), scores=tuple(scores),
        chosen=select(scores, sweep.min_gain), records=path.resolve())  # type: ignore[attr-defined]


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


# -- the config table -----------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _table_text(header: str, table: dict[str, Any]) -> str:
    lines = [f"# {_MARK} {table.get('date', '')}: {table.get('dev_set', '')}", f"[{header}]"]
    for key, value in table.items():
        if key == "evidence":
            lines.append("evidence = [")
            lines += [f"  {_toml_value(row)}," for row in value]
            lines.append("]")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


_MARK = "written by edge-ensemble calibrate"


def _header_path(line: str) -> tuple[str, ...] | None:
    """The key path of a table header line (``[a.b."c d"]`` -> ("a", "b", "c d")), None for any other line."""
    stripped = line.strip()
    if not stripped.startswith("["):
        return None
    try:
        data = tomllib.loads(stripped)
    except tomllib.TOMLDecodeError:
        return None
    keys: list[str] = []
    while isinstance(data, dict) and len(data) == 1:
        key, data = next(iter(data.items()))
        keys.append(key)
        if isinstance(data, list):
            data = data[-1] if data else {}
    return tuple(keys)


def _without_table(text: str, path: tuple[str, ...]) -> str:
    """``text`` without the table at ``path`` (and its sub-tables, and the comment calibrate wrote above it)."""
    lines = text.splitlines()
    keep: list[str] = []
    dropped: list[str] = []
    dropping = False
    for line in lines:
        header = _header_path(line)
        if header is not None:
            now = header[:len(path)] == path
            if dropping and not now:  # comments (and blank lines) right above the next header are that table's
                tail = len(dropped)
                while tail and (not dropped[tail - 1].strip() or dropped[tail - 1].lstrip().startswith("#")):
                    tail -= 1
                keep += dropped[tail:]
            if now and not dropping and keep and keep[-1].startswith(f"# {_MARK}"):
                keep.pop()
            dropping, dropped = now, []
        (dropped if dropping else keep).append(line)
    while keep and not keep[-1].strip():
        keep.pop()
    return "\n".join(keep) + ("\n" if keep else "")


def write_calibration(result: CalibrationResult, path: str | os.PathLike[str] | None = None, *,
                      table: Sequence[str] | None = None) -> Path:
    """Write ``result``'s table into the user config file (default :func:`paths.config_path`), replacing an
    earlier calibration of the same ensemble and keeping everything else; atomic, and checked by reading it
    back before it replaces the file. ``table``: another key path (``("presets", "tiny", "calibrated")`` in
    models/presets.toml). Returns the path."""
    path = Path(path) if path is not None else paths.config_path()
    try:
        old = path.read_text("utf-8") if path.exists() else ""
        before = tomllib.loads(old)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML ({e}); fix it, then rerun calibrate") from None
    table_path = tuple(table) if table is not None else ("calibrated", *result.key)
    kept = _without_table(old, table_path)
    new = (kept + "\n" if kept else "") + _table_text(".".join(map(toml_key, table_path)), result.table())
    expected = _plain(before)
    node = expected
    for key in table_path[:-1]:
        node = node.setdefault(key, {})
    node[table_path[-1]] = _plain(result.table())
    try:
        after = tomllib.loads(new)
    except tomllib.TOMLDecodeError:
        after = None
    if after is None or _plain(after) != expected:
        raise EdgeEnsembleError(f"cannot update {path} safely (its [{'.'.join(table_path[:-1])}] tables are written "
                                "in a way calibrate does not rewrite); remove them by hand and rerun calibrate")
    if table is None:
        parse_calibrations(after["calibrated"], f"config file {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        paths.write_text_atomic(path, new)
    except OSError as e:
        raise EdgeEnsembleError(f"cannot write config file {path}: {e.strerror or e}") from None
    return path


__all__ = ["DROP_CHECK_EVERY", "SWEEP_OPTIONS", "CalibrationResult", "Score", "Setting", "Sweep", "calibrate", "dev_task",
           "dropped_note", "load_dev_file", "normalize_text", "pool", "select", "settings", "within_allowance", "write_calibration"]
