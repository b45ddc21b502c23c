"""Accuracy against seconds per answer for the `vote` gate, from one run's records (no model is run).

    python benchmarks/vote_curve.py results/vote-gsm8k-0.5b-claim/gsm8k.jsonl [--parallel RECORDS]

A run of `vote` records, per item, the first answer's confidence and what the vote did; the same items' greedy
`single` records give the first answer's own time (the first answer is the greedy one). A gate *more permissive*
than the run's accepts more first answers; each such item then costs its greedy record's measured seconds and
scores the greedy answer, every other item keeps its measured vote. So every point below the run's gate is made
of measured answers and measured seconds, recombined: from "always" (greedy alone) to the shipped gate. Writes
accuracy-vs-seconds.png and .md beside the records. `--parallel` adds a point from other records (another
build and load: marked as such).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def mcnemar(b: int, c: int) -> float:
    n, k = b + c, min(b, c)
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", type=Path)
    ap.add_argument("--parallel", type=Path, help="records with a `parallel` configuration on the same items")
    args = ap.parse_args()
    vote, greedy = {}, {}
    for line in args.records.read_text().splitlines():
        r = json.loads(line)
        if r["config"] == "vote":
            vote[r["item"]] = r
        elif r["config"].startswith("single"):
            greedy[r["item"]] = r
    items = sorted(set(vote) & set(greedy), key=int)
    if not items:
        sys.exit(f"no items with both vote and single records in {args.records}")
    gate = vote[items[0]]["settings"]["vote_gate"]
    confs = sorted({vote[i]["policy_figures"]["first_confidence"] for i in items})
    gates = [0.0] + [c for c in confs if c < gate] + [gate]
    rows = []
    for g in gates:
        right = seconds = won = lost = 0
        for i in items:
            v, s = vote[i], greedy[i]
            take_first = v["policy_figures"]["gate_accepted"] or v["policy_figures"]["first_confidence"] >= g
            ok, sec = (s["correct"], s["seconds"]) if take_first else (v["correct"], v["seconds"])
            right += ok
            seconds += sec
            won += ok and not s["correct"]
            lost += s["correct"] and not ok
        rows.append((g, right, seconds / len(items), won, lost))
    n = len(items)
    greedy_s = sum(greedy[i]["seconds"] for i in items) / n
    out = [f"# vote: accuracy against seconds per answer ({args.records}, items {items[0]}-{items[-1]}, n = {n})", "",
           "Each row: a gate at most the run's own; items whose first answer passes it are scored and timed by their "
           "greedy record, the others by their vote record (both measured in this run's build).", "",
           "| gate | right | accuracy | s/answer | × greedy | won | lost | McNemar p vs greedy |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for g, right, sec, won, lost in rows:
        label = "always (greedy)" if g == 0.0 else (f"{g:.2f} (the run's)" if g == gate else f"{g:.2f}")
        out.append(f"| {label} | {right} | {right / n:.1%} | {sec:.2f} | {sec / greedy_s:.2f} | {won} | {lost} | "
                   f"{mcnemar(won, lost):.3f} |")
    par = None
    if args.parallel:
        recs = [json.loads(x) for x in args.parallel.read_text().splitlines()]
        par = {r["item"]: r for r in recs if r["config"] == "parallel" and r["item"] in set(items)}
        if par:
            common = sorted(par, key=int)
            pr = sum(par[i]["correct"] for i in common)
            vr = sum(vote[i]["correct"] for i in common)
            out += ["", f"`parallel` (8 samples at T = 0.6, majority; {args.parallel}, an earlier build and load, so "
                    f"its seconds do not compare): {pr}/{len(common)} right on items {common[0]}-{common[-1]}, where "
                    f"`vote` has {vr}; generated tokens per item: parallel "
                    f"{sum(par[i]['generated_tokens'] for i in common) / len(common):.0f}, vote "
                    f"{sum(vote[i]['generated_tokens'] for i in common) / len(common):.0f}."]
    md = args.records.parent / "accuracy-vs-seconds.md"
    md.write_text("\n".join(out) + "\n")
    print("\n".join(out))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r[2] for r in rows], [100 * r[1] / n for r in rows], "o-", label="vote, gate from always to the run's")
    ax.annotate("greedy", (rows[0][2], 100 * rows[0][1] / n), textcoords="offset points", xytext=(5, -12))
    ax.annotate(f"shipped gate {gate}", (rows[-1][2], 100 * rows[-1][1] / n), textcoords="offset points",
                xytext=(-60, 8))
    ax.set_xlabel("seconds per answer (measured, this CPU, 2 threads)")
    ax.set_ylabel(f"accuracy, % of {n} GSM8K items")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.records.parent / "accuracy-vs-seconds.png", dpi=100)


if __name__ == "__main__":
    main()
