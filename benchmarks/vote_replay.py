"""Replay `vote` settings offline over records where every answer was drawn (eval's `vote-all`: the greedy
first answer and 7 samples at T = 0.6, each with its confidence and whether it is right), to choose the gate,
the window, the stopping rule and the weighting on a development slice without running the model again.

    python benchmarks/vote_replay.py results/vote-gsm8k-0.5b/gsm8k.jsonl --items 200-259 [--out FILE.md]

For each setting: accuracy, mean samples and generated tokens per item, and estimated seconds per answer. The
seconds are an ESTIMATE (said in the output): the first answer at the greedy rate of the same records' `single`
rows (or of the first answers), each window at the per-step time measured on the vote-all rows for their batch
of 7, interpolated linearly in the batch size from one sample alone. A real run of the chosen setting is what
the results report; this only ranks settings.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_ensemble import voting  # noqa: E402


def load(path: Path, lo: int, hi: int) -> tuple[list[dict], dict[str, dict]]:
    """The vote-all records of items lo..hi and the single (greedy) records by item."""
    allv, single = [], {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if not lo <= int(r["item"]) <= hi:
            continue
        if r["config"] == "vote-all":
            allv.append(r)
        elif r["config"].startswith("single"):
            single[r["item"]] = r
    return sorted(allv, key=lambda r: int(r["item"])), single


def step_times(records: list[dict], greedy_rate: float) -> tuple[float, float]:
    """(seconds per step for one sequence, for a batch of 7) from the vote-all rows."""
    one = 1.0 / greedy_rate
    per = []
    for r in records:
        b = r["branches"]
        first_s = b[0]["tokens"] * one
        steps = max(x["tokens"] for x in b[1:]) or 1
        per.append(max(r["seconds"] - first_s, 0.0) / steps)
    return one, float(np.median(per))


def replay(r: dict, gate: float | None, window: int, max_samples: int, stopping: str, weighting: str,
           temperature: float, one: float, seven: float) -> tuple[bool, int, int, float]:
    """(right, samples, generated tokens, estimated seconds) of one item under one setting."""
    b = r["branches"]
    first = b[0]
    seconds = first["tokens"] * one
    if gate is not None and first["answer"] is not None and first["confidence"] >= gate:
        return bool(first["correct"]), 1, first["tokens"], seconds
    pool = [first]
    rest = b[1:max_samples]
    for start in range(0, len(rest), window):
        win = rest[start:start + window]
        pool += win
        k = len(win)
        per_step = one + (seven - one) * (k - 1) / 6
        seconds += max(x["tokens"] for x in win) * per_step
        if voting.should_stop(stopping, [x["answer"] for x in pool], [x["answer"] for x in win], 0.95):
            break
    confs = [x["confidence"] for x in pool]
    if weighting == "confidence":
        w = voting.confidence_weights(confs, temperature)
    elif weighting == "filter":
        w = voting.keep_most_confident(confs, 90.0).astype(float)
    else:
        w = np.ones(len(pool))
    pick = voting.weighted_vote([x["answer"] for x in pool], w.tolist(), confs)
    right = bool(pool[pick]["correct"]) if pick is not None else False
    return right, len(pool), sum(x["tokens"] for x in pool), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", type=Path)
    ap.add_argument("--items", default="0-100000", help="LO-HI item range (inclusive) to replay")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    lo, hi = (int(x) for x in args.items.split("-"))
    records, single = load(args.records, lo, hi)
    if not records:
        sys.exit(f"no vote-all records for items {args.items} in {args.records}")
    rates = [s["tokens"] / s["seconds"] for s in single.values() if s["seconds"] > 0]
    greedy_rate = float(np.median(rates)) if rates else 40.0
    one, seven = step_times(records, greedy_rate)
    n = len(records)
    greedy_right = sum(bool(r["branches"][0]["correct"]) for r in records)
    greedy_s = float(np.mean([r["branches"][0]["tokens"] * one for r in records]))
    confs = sorted(r["branches"][0]["confidence"] for r in records)
    gates = [None] + sorted({round(float(np.percentile(confs, q)), 2) for q in (10, 25, 40, 50, 60, 75, 90)})
    rows = []
    for gate, window, stopping, (weighting, t) in itertools.product(
            gates, (2, 4, 7), ("unanimous", "beta", "none"),
            (("majority", 1.0), ("confidence", 0.5), ("confidence", 1.0), ("confidence", 2.0), ("filter", 1.0))):
        res = [replay(r, gate, window, 8, stopping, weighting, t, one, seven) for r in records]
        right = sum(x[0] for x in res)
        rows.append({"gate": gate, "window": window, "stopping": stopping, "weighting": weighting, "T": t,
                     "right": right, "samples": np.mean([x[1] for x in res]),
                     "tokens": np.mean([x[2] for x in res]), "seconds": np.mean([x[3] for x in res])})
    rows.sort(key=lambda x: (-x["right"], x["seconds"]))
    out = [f"# vote replay: {args.records} items {lo}-{hi} ({n} items)", "",
           f"Greedy (the first answers): {greedy_right}/{n} right, {greedy_s:.1f} s per answer (estimate). "
           f"Step time (estimate from the vote-all rows): {one * 1000:.0f} ms alone, {seven * 1000:.0f} ms for a "
           f"batch of 7. Gates tried: percentiles 10-90 of the first answers' confidences.", "",
           "| gate | window | stopping | weighting | right | samples | tokens | est. s/answer | × greedy s |",
           "|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for x in rows[:40]:
        wt = x["weighting"] + (f" T={x['T']}" if x["weighting"] == "confidence" else "")
        out.append(f"| {x['gate'] if x['gate'] is not None else 'never'} | {x['window']} | {x['stopping']} | {wt} | "
                   f"{x['right']} | {x['samples']:.2f} | {x['tokens']:.0f} | {x['seconds']:.1f} | "
                   f"{x['seconds'] / greedy_s:.2f} |")
    # the cheapest setting at each accuracy: the accuracy-against-seconds frontier
    out += ["", "Frontier (no cheaper setting is as accurate):", "",
            "| right | est. s/answer | setting |", "|---:|---:|---|"]
    best = defaultdict(lambda: None)
    for x in sorted(rows, key=lambda x: x["seconds"]):
        if all(x["right"] > y["right"] for y in best.values() if y is not None):
            best[x["right"]] = x
            out.append(f"| {x['right']} | {x['seconds']:.1f} | gate {x['gate']}, window {x['window']}, "
                       f"{x['stopping']}, {x['weighting']} T={x['T']} |")
    text = "\n".join(out) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
