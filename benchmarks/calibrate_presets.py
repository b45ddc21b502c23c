"""Calibrate the shipped presets on the development slices and write each choice into models/presets.toml.

    taskset -c 1 python benchmarks/calibrate_presets.py --threads 1      # tiny, coder, trio: GSM8K 0-199 + ARC 0-299
    taskset -c 1 python benchmarks/calibrate_presets.py --presets tiny --limit 3 --no-write --threads 1  # timing
    ... --parallel 8   # eight items' answers decoded together: about 1.2x the answers per CPU second here
    ... --screen gsm8k=60   # on GSM8K, after 60 items only the best setting so far goes on beside the drafter

Each preset runs the drafter alone and the sweep (default: the calibrate command's, drafter weight 1, 1.5, 2, 3 x
gate 0.3, 0.5, 0.7; ``--drafter-weights 2,3 --gates 0.3,0.5`` for a smaller one) on both slices, ARC first
(short answers: cheap). A setting that lost there by more than the pooled rule allows (one item per hundred) is
not run on GSM8K, since the rule can no longer choose it; nor is one dropped there early as clearly losing
(``drop_level``), which is a heuristic: a setting dropped after a bad start might have recovered; nor, with
``--screen``, one screened out on an earlier slice. The two slices are pooled (items added up) and the rule of
``edge_ensemble.eval.calibrate`` picks one setting, written as ``[presets.<name>.calibrated]`` with its evidence. Resumable: the records are in
results/calibrate/<preset>/<task>.jsonl, and a rerun only makes the missing ones. Prints the CPU seconds each
(preset, slice) took, which is how the cost of the full run was estimated from a 3-item run.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from edge_ensemble.api import EnsembleConfig
from edge_ensemble.errors import EdgeEnsembleError
from edge_ensemble import paths
from edge_ensemble.eval.calibrate import (SWEEP_OPTIONS, Sweep, calibrate, dropped_note, pool, sweep_table,
                                         within_allowance, write_calibration)
from edge_ensemble.eval.tasks import get_task
from edge_ensemble.sources import Catalog

ROOT = Path(__file__).resolve().parent.parent
DEV_SLICES = (("arc-challenge", 0, 300), ("gsm8k", 0, 200))  # the cheap one first: its drops spare GSM8K


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,coder,trio")
    parser.add_argument("--tasks", default=",".join(t for t, _, _ in DEV_SLICES), help="slices to run (pooled)")
    parser.add_argument("--limit", type=int, default=None, help="items per slice (default: the whole slice)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--parallel", type=int, default=1, help="items whose answers are decoded together "
                        "(batched: more answers per CPU second; seconds per answer then shared)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "calibrate")
    parser.add_argument("--presets-toml", type=Path, default=ROOT / "models" / "presets.toml")
    parser.add_argument("--no-write", action="store_true", help="only measure; leave presets.toml alone")
    parser.add_argument("--drafter-weights", help="comma-separated (default: the calibrate command's sweep)")
    parser.add_argument("--gates", help="comma-separated (default: the calibrate command's sweep)")
    parser.add_argument("--drop-level", help="the calibrate command's --drop-level (default: its default; off: "
                        "every setting runs on every item)")
    parser.add_argument("--screen", default="", metavar="TASK=N,...", help="the calibrate command's --screen, per "
                        "slice (e.g. gsm8k=60: the slice where the settings differ; ARC's answers are nearly the "
                        "drafter's own, so screening there would choose on noise)")
    args = parser.parse_args()
    # Spelled and checked as the calibrate command's flags ("off" included).
    options = {o.name: o for o in SWEEP_OPTIONS}
    sweep = Sweep(**{k: options[k].from_text(getattr(args, k), "--" + k.replace("_", "-"))
                     for k in ("drafter_weights", "gates", "drop_level") if getattr(args, k) is not None}).validate(
        lambda name: "--" + name.replace("_", "-"))

    tasks = [t for t, _, _ in DEV_SLICES if t in args.tasks.split(",")]
    screens = _screens(args.screen, tasks, options["screen"])
    catalog = Catalog.load()
    base = EnsembleConfig(n_ctx=2048, n_threads=args.threads, parallel=args.parallel)
    for name in args.presets.split(","):
        preset = catalog.preset(name)
        results = []
        for task, start, limit in (d for d in DEV_SLICES if d[0] in args.tasks.split(",")):
            began = time.process_time()
            skip = {s.setting.name for r in results for s in r.scores
                    if s.dropped_after is not None or not within_allowance(s, r)}
            results.append(calibrate(preset.members, get_task(task), args.out / preset.name, preset=preset.name,
                                     start=start, limit=args.limit or limit, base=base, skip=skip,
                                     sweep=replace(sweep, screen=screens.get(task))))
            print(f"{preset.name} {task}: {time.process_time() - began:.0f} CPU s for "
                  f"{results[-1].items} items x {len(results[-1].scores)} settings", flush=True)
        pooled = pool(results) if len(results) > 1 else results[0]
        report = _report(preset.name, results, pooled, args.out / preset.name)
        print("\n" + report, flush=True)
        if not args.no_write:
            # The records' path as it is in the repository, not on this machine.
            shipped = replace(pooled, records=Path("results/calibrate") / preset.name)
            write_calibration(shipped, args.presets_toml, table=("presets", preset.name, "calibrated"))


def _report(name: str, results: list, pooled, out: Path) -> str:
    """The sweep's tables, each set and pooled, with the choice: printed, and written to OUT/summary.md with
    OUT/calibrate.png (accuracy against tok/s per setting, a panel per set; with matplotlib)."""
    parts = [f"# Calibration of `{name}`: {pooled.dev_set}\n"]
    for r in ([*results, pooled] if pooled is not results[0] else results):
        parts.append(f"\n## {r.dev_set}{' (pooled: the choice)' if r is pooled and len(results) > 1 else ''}\n\n"
                     + sweep_table(r))
    parts.append("\n" + dropped_note(pooled.scores) + f"\nchosen: {pooled.chosen.setting.name}\n")
    report = "".join(parts)
    paths.write_text_atomic(out / "summary.md", report)
    try:
        from edge_ensemble.eval.report import plot_accuracy_vs_speed

        plot_accuracy_vs_speed([s.summary for r in (*results, pooled) for s in r.scores], out / "calibrate.png")
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'edge-ensemble[eval]')", file=sys.stderr)
    return report


def _screens(text: str, tasks: list[str], option) -> dict[str, int]:
    """``gsm8k=60,arc-challenge=100`` as {task: items} for the slices being run (``tasks``), each value checked as
    the calibrate command's --screen."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        task, sep, value = part.partition("=")
        task = task.strip()
        if not sep or task not in tasks:
            raise ValueError(f"--screen takes TASK=N with TASK one of {', '.join(tasks)}; got {part!r}")
        out[task] = option.from_text(value.strip(), "--screen")
    return out


if __name__ == "__main__":
    try:
        main()
    except (EdgeEnsembleError, ValueError) as exc:  # a bad sweep value, an unknown preset: one line
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:  # the records so far are kept: a rerun goes on from them
        print("interrupted; rerun the same command to go on", file=sys.stderr)
        sys.exit(130)
