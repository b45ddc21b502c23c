"""``edge-ensemble calibrate``: choose an ensemble's drafter weight and gate by measurement on a development set,
and write the choice into the user config file; resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from .. import paths
from ..api import ENSEMBLE_OPTIONS, EnsembleConfig
from ..config import OPTIONS as KEY_OPTIONS, load_config
from ..errors import UsageError
from ..eval.calibrate import CALIBRATED, SWEEP_OPTIONS as CALIBRATE_SWEEP
from ..eval.calibrate_vote import VOTE_POLICY, VOTE_SWEEP_OPTIONS
from ..policies import registry
from .common import EnsembleChoice, _catalog, _note, _table
from .flags import _EVAL_DEFAULTS, _declared_flags, _eval_options


_SWEEP_FLAGS = {o.name: o.flag for o in (*CALIBRATE_SWEEP, *VOTE_SWEEP_OPTIONS)}  # to name a bad sweep value
_CALIBRATED_POLICIES = (CALIBRATED, VOTE_POLICY)  # what calibrate sweeps: SAFE's weights and gate, or the vote's


@click.command("calibrate")
@click.option("-p", "--preset", help="Ensemble preset to calibrate [default: the catalog's default].")
@click.option("-m", "--model", "members", multiple=True, metavar="MODEL", help="Explicit members (first drafts).")
@click.option("--task", metavar="NAME", help="Development set: an eval task's items (gsm8k, arc-challenge, "
              "math-500, humaneval).")
@click.option("--file", "dev_file", metavar="FILE.jsonl",
              help='Development set: your own JSONL, one {"prompt": ..., "answer": ...} a line.')
@click.option("--start", type=click.IntRange(min=0), default=0, help="First item (dataset or file order).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Number of items [default: the task's development slice, or the whole file].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Results directory [default: results/calibrate/<preset or members>].")
@click.option("--write/--no-write", default=True, help="Write the chosen setting into the user config file "
              "[default: write].")
@click.option("--no-plot", is_flag=True, help="Skip the PNG plot of accuracy against speed.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("--policy", "calibrated", type=click.Choice(_CALIBRATED_POLICIES), default=CALIBRATED,
              show_default=True,
              help=f"What to calibrate: {CALIBRATED} (the drafter's weight and the gate, each setting run) or "
                   f"{VOTE_POLICY} (its gate, window, cap, stopping rule and weighting, replayed over one draw of 8 "
                   "answers per item; docs/vote.md).")
@_declared_flags(CALIBRATE_SWEEP, "sweep", defaults=False)
@_declared_flags(VOTE_SWEEP_OPTIONS, "vote_sweep", defaults=False)
@_eval_options
def calibrate_command(preset: str | None, members: tuple[str, ...], task: str | None, dev_file: str | None,
                      start: int, limit: int | None, out_dir: str | None, write: bool, no_plot: bool,
                      as_json: bool, calibrated: str, sweep: dict[str, Any], vote_sweep: dict[str, Any],
                      options: dict[str, Any]) -> None:
    """Choose this ensemble's drafter weight and gate by measurement; resumable.

    Runs the drafter alone and each setting of the sweep (drafter weight x gate
    [x sharpening]) on the development set, scores them with the eval harness,
    and writes the best into the user config file for this preset or member set,
    with the evidence. The drafter alone is kept unless an ensemble setting
    answers at least --min-gain items more right (ties: fewer seconds per
    answer); a setting clearly losing to the drafter alone is dropped early
    (--drop-level), and with --screen N only the best setting after N items goes on
    beside the drafter. Records: OUT/<task>.jsonl (a rerun skips what is done);
    OUT/summary.md and OUT/calibrate.png.

    --policy vote calibrates the answer-level vote instead: the first member
    alone and one draw of 8 answers per item, then every vote setting replayed
    over the draw, chosen on the first --fit-items items (McNemar p below
    --significance, the cheapest) and checked on the rest.
    """
    from ..eval.calibrate import Sweep, calibrate, dev_task, write_calibration
    from ..eval.calibrate_vote import VoteSweep, calibrate_vote
    from ..sources import parse_spec

    _check_sweep_flags(calibrated, sweep, vote_sweep)
    choice = EnsembleChoice(preset, members)
    dev = dev_task(task, dev_file)
    dev.items(start, limit)  # fail on missing data before any model loads
    catalog = _catalog()
    chosen_preset = choice.chosen_preset(catalog)
    specs = [parse_spec(m, catalog) for m in (members or chosen_preset.members)]
    if len(specs) < 2 and calibrated == CALIBRATED:
        raise UsageError("calibrate needs an ensemble of at least two members (the first drafts)")
    label = chosen_preset.name if chosen_preset else "-".join(s.display_name for s in specs)
    out = Path(out_dir or Path("results") / "calibrate" / label)
    max_tokens = options.pop("max_tokens", None)
    # The policy options of the user's config file (sharpen, draft_len, ...) are what `run` applies beside the
    # calibration, so they are what is measured; the sweep sets the policy, weights and gate itself.
    # (A config file named by $EDGE_ENSEMBLE_CONFIG may be missing when this run is to write it.)
    file_values = load_config(missing_ok=write).values
    from_file = {o.name: v for o, v in ((KEY_OPTIONS[k], v) for k, v in file_values.items() if k in KEY_OPTIONS)
                 if o.name in registry.policy_options() and o.name not in ("weights", "gate")}
    base = EnsembleConfig(**{**_EVAL_DEFAULTS, **from_file, **options}).validate(
        len(specs), lambda n: ENSEMBLE_OPTIONS[n].flag)
    if write:  # found now, not after the sweep (a rerun would resume, but a user should not have to)
        target = paths.config_path()
        real = Path(os.path.realpath(target))  # (written through a symlink, via a temp file beside it)
        if (real.exists() and paths.read_only(real)) or _unwritable(real.parent):
            raise UsageError(f"cannot write the config file {target}; make it writable, set $EDGE_ENSEMBLE_CONFIG "
                             "to another file, or pass --no-write")
    if calibrated == VOTE_POLICY:
        vote = VoteSweep(**vote_sweep, **{k: v for k, v in sweep.items() if k == "min_gain"}).validate(
            lambda n: _SWEEP_FLAGS[n])
        _vote_calibration(calibrate_vote(specs, dev, out, preset=chosen_preset.name if chosen_preset else None,
                                         start=start, limit=limit, sweep=vote, base=base, max_tokens=max_tokens,
                                         dev_file=dev_file), out, write, as_json)
        return
    result = calibrate(specs, dev, out, preset=chosen_preset.name if chosen_preset else None, start=start,
                       limit=limit, sweep=Sweep(**sweep).validate(lambda n: _SWEEP_FLAGS[n]), base=base,
                       max_tokens=max_tokens, dev_file=dev_file)
    _calibration_report(result, out, plot=not no_plot)
    written = write_calibration(result) if write else None
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "config_file": str(written) if written else None},
                              ensure_ascii=False))
    else:
        click.echo(_table(_calibration_rows(result), ("SETTING", "RIGHT", "ACCURACY", "95% CI", "TOK/S",
                                                      "S/ANSWER", "VS DRAFTER", "")))
    what = "the drafter alone" if result.chosen is result.drafter else result.chosen.setting.name
    where = f"; written to {written} [{result.to_dict()['table']}]" if written else " (not written: --no-write)"
    _note(f"chosen: {what}, {result.chosen.summary.correct}/{result.items} right on {result.dev_set}{where}")


def _check_sweep_flags(calibrated: str, sweep: dict[str, Any], vote_sweep: dict[str, Any]) -> None:
    """Refuse a sweep flag of the other policy (``--gates`` with ``--policy vote``): it would change nothing."""
    voting = calibrated == VOTE_POLICY
    other = [n for n in sweep if n != "min_gain"] if voting else list(vote_sweep)
    if other:
        theirs = CALIBRATED if voting else VOTE_POLICY
        raise UsageError(f"{_SWEEP_FLAGS[other[0]]} sweeps the {theirs} policy; drop it, or pass --policy {theirs}")


def _vote_calibration(result: Any, out: Path, write: bool, as_json: bool) -> None:
    """Report a vote calibration (OUT/summary.md, the chosen and the best rows) and write its table."""
    from ..eval.calibrate import write_calibration

    paths.write_text_atomic(out / "summary.md", result.markdown())
    written = write_calibration(result) if write else None
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "config_file": str(written) if written else None},
                              ensure_ascii=False))
    else:
        rows = [(f"single:{result.drafter_name}", f"{result.drafter_fit.right}/{result.drafter_fit.n}", "-",
                 f"{result.drafter_fit.seconds:.2f}",
                 f"{result.drafter_check.right}/{result.drafter_check.n}" if result.drafter_check else "-", "")]
        best = sorted(result.scores, key=lambda s: (-s.fit.right, s.fit.seconds))[:5]
        shown = ([result.chosen] if result.chosen is not None else []) + [s for s in best if s is not result.chosen]
        for s in shown:
            rows.append((s.setting.name, f"{s.fit.right}/{s.fit.n}", f"+{s.fit.won} -{s.fit.lost} p={s.fit.p:.3f}",
                         f"{s.fit.seconds:.2f}", f"{s.check.right}/{s.check.n}" if s.check else "-",
                         "<- chosen" if s is result.chosen else ""))
        click.echo(_table(rows, ("SETTING", "FIT RIGHT", "VS DRAFTER", "EST S/ANSWER", "CHECK RIGHT", "")))
        _note(f"every setting: {out / 'summary.md'} (seconds are estimates from the draw's step times)")
    what = result.chosen.setting.name if result.chosen is not None else f"the drafter alone ({result.why})"
    where = f"; written to {written} [{result.to_dict()['table']}]" if written else " (not written: --no-write)"
    _note(f"chosen: {what}, fit on {result.fitted_on}, checked on {result.checked_on or 'nothing'}{where}")


def _calibration_rows(result: Any) -> list[tuple[str, ...]]:
    rows = []
    for score in result.scores:
        s = score.summary
        versus = "-" if score.is_drafter else f"+{score.only_setting} -{score.only_drafter}"
        mark = ("<- chosen" if score is result.chosen
                else f"{'screened out' if score.screened_out else 'dropped'}: ran on {score.dropped_after} items"
                if score.dropped_after is not None else "")
        rows.append((score.setting.name, f"{s.correct}/{s.n}", f"{100 * s.accuracy:.1f}%",
                     f"{100 * s.ci_low:.1f}-{100 * s.ci_high:.1f}%", f"{s.tokens_per_second or 0:.1f}",
                     f"{s.seconds_per_answer or 0:.2f}", versus, mark))
    return rows


def _calibration_report(result: Any, out: Path, *, plot: bool) -> None:
    """OUT/summary.md (the sweep table, with the paired record against the drafter) and, with matplotlib,
    OUT/calibrate.png."""
    import importlib.util

    from ..eval.calibrate import dropped_note, sweep_table
    from ..eval.report import plot_accuracy_vs_speed

    summaries = [s.summary for s in result.scores]
    note = dropped_note(result.scores)
    paths.write_text_atomic(out / "summary.md", f"# Calibration on {result.dev_set}\n\n" + sweep_table(result)
                            + ("\n" + note if note else ""))
    if not plot:
        return
    if importlib.util.find_spec("matplotlib") is None:
        _note("plot skipped: matplotlib is not installed (pip install 'edge-ensemble[eval]')")
        return
    plot_accuracy_vs_speed(summaries, out / "calibrate.png")


def _unwritable(directory: Path) -> bool:
    """Whether a file could not be created in ``directory`` (or in the directory it would be made as)."""
    try:
        paths.check_out_dir(directory)
    except UsageError:
        return True
    return False
