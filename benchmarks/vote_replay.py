"""Replay `vote` settings offline over records where every answer was drawn (eval's `vote-all` beside the drafter
alone's `single:<drafter>`), without running a model: what `edge-ensemble calibrate --policy vote` does after its
draw, on any records file and item range, and without writing a config.

    python benchmarks/vote_replay.py results/vote-gsm8k-0.5b/gsm8k.jsonl --items 200-259 [--fit-items 30] [--out FILE.md]

Prints (or writes) the sweep's markdown table: every setting's items right, its paired record against the drafter
alone, samples, tokens and ESTIMATED seconds per answer (see edge_ensemble/eval/calibrate_vote.py), on the fit
items and the check items, and the setting the calibration rule would choose.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_ensemble.errors import UsageError  # noqa: E402
from edge_ensemble.eval.calibrate_vote import VoteSweep, replay_calibration  # noqa: E402
from edge_ensemble.eval.runner import read_records  # noqa: E402


def plot(result, path: Path) -> None:
    """Every setting as a point: items right over all replayed items against estimated seconds per answer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def total(fit, check):
        n = fit.n + (check.n if check else 0)
        right = fit.right + (check.right if check else 0)
        seconds = (fit.seconds * fit.n + (check.seconds * check.n if check else 0)) / n
        return seconds, right

    fig, ax = plt.subplots(figsize=(8, 5))
    points = [total(s.fit, s.check) for s in result.scores]
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=10, alpha=0.4, label="vote settings (replayed)")
    x, y = total(result.drafter_fit, result.drafter_check)
    ax.scatter([x], [y], color="black", marker="s", label="greedy alone (measured)")
    if result.chosen is not None:
        cx, cy = total(result.chosen.fit, result.chosen.check)
        ax.scatter([cx], [cy], color="red", marker="*", s=120, label="chosen by the rule")
    ax.set_xlabel("seconds per answer (estimated from the draw's step times)")
    ax.set_ylabel(f"items right of {result.items}")
    ax.set_title(f"vote settings replayed: {result.dev_set}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", type=Path)
    ap.add_argument("--items", default="0-100000", help="LO-HI item range (inclusive) to replay")
    ap.add_argument("--task", default=None, help="the records' task [default: the first record's]")
    ap.add_argument("--fit-items", type=int, default=None, help="items that choose (the rest check) [default: half]")
    ap.add_argument("--significance", default="0.05", help="McNemar level on the fit items, or off")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path, help="also a PNG: items right (fit + check) against estimated seconds per "
                    "answer, one point per setting, the drafter alone measured")
    args = ap.parse_args()
    lo, hi = (int(x) for x in args.items.split("-"))
    records = read_records(args.records)
    task = args.task or (records[0]["task"] if records else "")
    drafters = sorted({r["config"].split(":", 1)[1] for r in records if r.get("config", "").startswith("single:")})
    if len(drafters) != 1:
        sys.exit(f"{args.records}: expected the records of one drafter alone (single:<name>), found {drafters}")
    ids = sorted({r["item"] for r in records if r.get("task") == task and lo <= int(r["item"]) <= hi}, key=int)
    draws = [r for r in records if r.get("config") == "vote-all"]
    temperature = float((draws[0].get("settings") or {}).get("sample_temperature", 0.6)) if draws else 0.6
    sweep = VoteSweep(fit_items=args.fit_items,
                      significance=None if args.significance == "off" else float(args.significance))
    try:
        result = replay_calibration(records, task, ids, sweep, key=("members", drafters[0]), dev_set=f"{task} {args.items}",
                                    records_path=args.records, drafter_name=drafters[0], sample_temperature=temperature)
    except UsageError as e:
        sys.exit(str(e))
    text = result.markdown()
    if args.plot:
        plot(result, args.plot)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
