"""What ``eval --parallel N`` buys: the same items answered one at a time and N at a time (their decodes batched),
in one process, one after the other, with the aggregate speed and how many answers came out the same.

    taskset -c 0 python benchmarks/eval_parallel.py --threads 1 --parallel 8 --limit 8 --max-tokens 128 \
        --out benchmarks/results/eval-parallel.md

Wall time of each whole run (prompt prefill included, model load excluded). Answers decoded in a batch are the
same computation in another floating-point order, so greedy answers can part after a near-tie; the table says
how many are byte-identical and how many are scored the same.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

from edge_ensemble.api import EnsembleConfig
from edge_ensemble.eval.configs import build_configs
from edge_ensemble.eval.runner import read_records, run_eval


HEADER = "# eval --parallel: answers one at a time against N at a time, same items, same process\n"


def run(members: list[str], configs: list[str], parallel: int, args: argparse.Namespace, out: Path) -> tuple[float, list[dict]]:
    base = EnsembleConfig(n_ctx=2048, n_threads=args.threads, parallel=parallel).validate(len(members))
    engine_configs, ensembles = build_configs(members, configs, base)
    try:
        began = time.perf_counter()
        path = run_eval(args.task, engine_configs, out, start=args.start, limit=args.limit,
                        max_tokens=args.max_tokens, progress=False)
        return time.perf_counter() - began, read_records(path)
    finally:
        for e in ensembles:
            e.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", dest="members", action="append", default=None,
                    help="members, first drafts [default: qwen2.5-coder-0.5b-instruct]")
    ap.add_argument("--configs", default="single", help="comma-separated eval configurations")
    ap.add_argument("--task", default="gsm8k")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    members = args.members or ["qwen2.5-coder-0.5b-instruct"]
    configs = [c.strip() for c in args.configs.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        alone_s, alone = run(members, configs, 1, args, Path(tmp) / "alone")
        together_s, together = run(members, configs, args.parallel, args, Path(tmp) / "together")
    by_key = {(r["item"], r["config"]): r for r in alone}
    for name in configs:
        a = [r for r in alone if r["config"] == name or r["config"].startswith(name + ":")]
        t = [r for r in together if r["config"] == name or r["config"].startswith(name + ":")]
        same = sum(r["output"] == by_key[(r["item"], r["config"])]["output"] for r in t)
        scored = sum(r["correct"] == by_key[(r["item"], r["config"])]["correct"] for r in t)
        rows.append(f"| {name} | {len(t)} | {sum(r['correct'] for r in a)} / {sum(r['correct'] for r in t)} | "
                    f"{same} | {scored} |")
    tokens = sum(r["tokens"] for r in alone), sum(r["tokens"] for r in together)
    speed = tokens[0] / alone_s, tokens[1] / together_s
    text = (
        f"\n## {args.task} items {args.start}-{args.start + args.limit - 1}, {', '.join(members)}, "
        f"--max-tokens {args.max_tokens}, --threads {args.threads or 'all'} ({date.today()}, {platform.machine()})\n\n"
        f"`{' '.join(['python', 'benchmarks/eval_parallel.py', *_argv(args)])}`\n\n"
        f"| run | tokens | wall s | aggregate tok/s |\n|---|---:|---:|---:|\n"
        f"| one at a time | {tokens[0]} | {alone_s:.1f} | {speed[0]:.1f} |\n"
        f"| --parallel {args.parallel} | {tokens[1]} | {together_s:.1f} | {speed[1]:.1f} |\n\n"
        f"Speed-up {speed[1] / speed[0]:.2f}x.\n\n"
        "| config | answers | right (alone / together) | byte-identical | scored the same |\n|---|---:|---:|---:|---:|\n"
        + "\n".join(rows) + "\n"
    )
    print(text)
    if args.out:
        new = not args.out.exists()
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(HEADER if new else "")
            f.write(text)


def _argv(args: argparse.Namespace) -> list[str]:
    out = [f"-m {m}" for m in args.members or []]
    for flag in ("configs", "task", "start", "limit", "max_tokens", "parallel", "threads"):
        if getattr(args, flag) is not None:
            out.append(f"--{flag.replace('_', '-')} {getattr(args, flag)}")
    return out


if __name__ == "__main__":
    main()
