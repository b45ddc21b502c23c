"""Ship the `vote` policy into the presets whose best member a measured vote beats (issue 34), from the records.

    python benchmarks/vote_presets.py [--presets tiny trio] [--no-write]

The rule (issue 34): on GSM8K items 0-199 the vote must answer more items right than its member's greedy answers
with an exact McNemar p below 0.05, and on ARC-Challenge items 0-299 it must not answer more than 3 items fewer.
The records are eval's (`single:<member>` and `vote`, one build, one answer at a time):
results/vote-gsm8k-0.5b/gsm8k.jsonl and results/vote-arc-challenge-0.5b/arc-challenge.jsonl. The vote's settings are
the policy's shipped defaults (fitted on GSM8K items 200-212, not on the items above). When the rule holds, each
preset's `[presets.<name>.calibrated]` table in models/presets.toml becomes that setting with the evidence (items
right, 95 % interval, paired counts and p, seconds and generated tokens per answer, on both slices); when it does
not, nothing is written and the reason is printed. Runs no model.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from edge_ensemble.eval import scoring  # noqa: E402
from edge_ensemble.eval.calibrate import write_calibration  # noqa: E402
from edge_ensemble.eval.calibrate_vote import VOTE_POLICY  # noqa: E402
from edge_ensemble.eval.runner import read_records  # noqa: E402
from edge_ensemble.eval.tasks import get_task  # noqa: E402
from edge_ensemble.policies import registry  # noqa: E402

MEMBER = "Qwen2.5-Coder-0.5B-Instruct"  # the tiny and trio presets' first and best member
SLICES = (("gsm8k", ROOT / "results/vote-gsm8k-0.5b/gsm8k.jsonl", range(0, 200)),
          ("arc-challenge", ROOT / "results/vote-arc-challenge-0.5b/arc-challenge.jsonl", range(0, 300)))
P_LEVEL = 0.05
ARC_ALLOWANCE = 3
SHIPPED = ("vote_gate", "window", "max_samples", "stopping", "weighting", "sample_temperature", "sample_from")


def paired(path: Path, task: str, items: range, config: str) -> dict[str, Any]:
    """The member alone and ``config`` on ``items``: rows for the evidence, and the paired counts."""
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for r in read_records(path):
        if r.get("task") == task:
            first.setdefault((r["config"], r["item"]), r)
    ids = [item.id for item in get_task(task).items(items.start, len(items))]  # (ARC's ids are not numbers)
    missing = [i for i in ids if (f"single:{MEMBER}", i) not in first or (config, i) not in first]
    if missing:
        raise SystemExit(f"{path}: {len(missing)} of {task} items {items.start}-{items.stop - 1} lack a record of "
                         f"single:{MEMBER} or {config} (first: {missing[0]}); finish the eval first")
    alone = [first[(f"single:{MEMBER}", i)] for i in ids]
    voted = [first[(config, i)] for i in ids]
    won = sum(v["correct"] and not a["correct"] for a, v in zip(alone, voted))
    lost = sum(a["correct"] and not v["correct"] for a, v in zip(alone, voted))

    def row(name: str, rs: list[dict[str, Any]]) -> dict[str, Any]:
        right = sum(bool(r["correct"]) for r in rs)
        lo, hi = scoring.wilson_interval(right, len(rs))
        return {"setting": name, "task": task, "items": f"{items.start}-{items.stop - 1}", "correct": right,
                "n": len(rs), "accuracy": round(right / len(rs), 4), "ci95": [round(lo, 4), round(hi, 4)],
                "seconds_per_answer": round(sum(r["seconds"] for r in rs) / len(rs), 2),
                "generated_tokens": round(sum(r.get("generated_tokens") or r["tokens"] for r in rs) / len(rs), 1)}

    vote_row = {**row(config, voted), "only_setting": won, "only_drafter": lost,
                "mcnemar_p": round(scoring.mcnemar_exact(won, lost), 4)}
    return {"alone": row(f"single:{MEMBER}", alone), "vote": vote_row, "won": won, "lost": lost,
            "settings": voted[0].get("settings") or {}}


class PresetTable:
    """What write_calibration writes: the vote's settings and the evidence."""

    def __init__(self, values: dict[str, Any], evidence: list[dict[str, Any]], dev_set: str, items: int) -> None:
        self.key = ("presets", "")
        self._table = {**values, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "dev_set": dev_set, "items": items,
                       "records": "results/vote-gsm8k-0.5b, results/vote-arc-challenge-0.5b",
                       "rule": f"vote when it beats the first member's greedy answers on GSM8K 0-199 with McNemar p < "
                               f"{P_LEVEL} and loses at most {ARC_ALLOWANCE} items on ARC-Challenge 0-299; settings "
                               "fitted on GSM8K 200-212 (benchmarks/vote_presets.py)",
                       "evidence": evidence}

    def table(self) -> dict[str, Any]:
        return self._table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "trio"])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    gsm, arc = (paired(path, task, items, VOTE_POLICY) for task, path, items in SLICES)
    print(f"GSM8K 0-199: greedy {gsm['alone']['correct']}, vote {gsm['vote']['correct']} (won {gsm['won']}, lost "
          f"{gsm['lost']}, p = {gsm['vote']['mcnemar_p']}); {gsm['vote']['seconds_per_answer']} s/answer against "
          f"{gsm['alone']['seconds_per_answer']}")
    print(f"ARC-Challenge 0-299: greedy {arc['alone']['correct']}, vote {arc['vote']['correct']} (won {arc['won']}, "
          f"lost {arc['lost']}); {arc['vote']['seconds_per_answer']} s/answer against {arc['alone']['seconds_per_answer']}")
    wins = gsm["won"] > gsm["lost"] and gsm["vote"]["mcnemar_p"] < P_LEVEL
    holds = arc["vote"]["correct"] >= arc["alone"]["correct"] - ARC_ALLOWANCE
    if not (wins and holds):
        print("not shipped: " + ("the GSM8K gain is not significant" if not wins else
                                 f"ARC-Challenge loses more than {ARC_ALLOWANCE} items"))
        return
    defaults = registry.make_options(VOTE_POLICY, {})
    if any(gsm["settings"].get(k, getattr(defaults, k)) != getattr(defaults, k) for k in SHIPPED):
        raise SystemExit("the records' vote settings are not the policy's defaults; ship what was measured")
    values = {"policy": VOTE_POLICY, **{k: ("never" if getattr(defaults, k) is None else getattr(defaults, k))
                                         for k in SHIPPED}}
    evidence = [gsm["alone"], gsm["vote"], arc["alone"], arc["vote"]]
    for name in args.presets:
        table = PresetTable(values, evidence, "gsm8k items 0-199 + arc-challenge items 0-299", 500)
        if args.no_write:
            print(json.dumps(table.table(), indent=1))
        else:
            write_calibration(table, ROOT / "models" / "presets.toml", table=("presets", name, "calibrated"))
            print(f"wrote [presets.{name}.calibrated] into models/presets.toml")


if __name__ == "__main__":
    main()
