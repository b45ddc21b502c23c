"""Branching benchmark: aggregate tokens/s of `parallel` and `eager` (their branches decoded together, one
llama_decode per step) against the same answers decoded one after another.

    python benchmarks/branching.py --model qwen2.5-coder-0.5b-instruct --branches 8 --max-tokens 128 \
        --out benchmarks/results/branching

For each prompt: `parallel` (M independent samples in one batch), then the same M samples one at a time
(`single`, same temperature, seeds 0..M-1), then `eager` (threshold lowered so that it branches) and its branches
replayed one at a time (each branch's tokens decoded alone as one sequence, step by step: what it would cost
without the shared batch and the shared prefix). Writes JSONL records and a Markdown summary. Timings on a
shared machine are noisy: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path

import numpy as np

from edge_ensemble.decisions import Sampling
from edge_ensemble.member import Member
from edge_ensemble.policies.eager import EagerOptions, EagerPolicy
from edge_ensemble.runtime import LoadOptions, Model, usable_cores
from edge_ensemble.sources import parse_spec, resolve

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Think step by step.",
    "Write a short story (about 100 words) about a lighthouse keeper.",
    "Explain what a hash table is and why lookups are fast on average.",
]


def batched(model: Model, prompt: list[int], config: EagerOptions, temperature: float, seed: int,
            max_tokens: int) -> tuple[float, int, list[list[int]]]:
    """One EAGER run (parallel or eager): seconds, tokens generated, each branch's tokens."""
    model.reset()
    member = Member(model, name="m")
    lane = member.open_lane(prompt)
    t0 = time.perf_counter()
    branches = EagerPolicy(lane, config, Sampling(temperature=temperature, seed=seed), np.random.default_rng(seed)).run_branches(max_tokens)
    seconds = time.perf_counter() - t0
    lane.close()
    return seconds, sum(len(b.tokens) for b in branches), [b.tokens for b in branches]


def one_by_one(model: Model, prompt: list[int], answers: list[list[int]]) -> float:
    """The same answers, each decoded alone: prefill its prompt, then one token per llama_decode."""
    t0 = time.perf_counter()
    for tokens in answers:
        model.reset()
        model.decode(prompt)
        for tok in tokens:
            model.decode([tok])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--branches", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--threshold", type=float, default=1.0, help="eager's entropy threshold (low, so it branches)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/branching")
    args = ap.parse_args()

    path = resolve(parse_spec(args.model), download=False, progress=False)
    model = Model(path, LoadOptions(n_ctx=8192, n_seq_max=args.branches, n_threads=args.threads))
    records = []
    for i, text in enumerate(PROMPTS):
        prompt = model.prompt_tokens(model.render_chat([{"role": "user", "content": text}]))
        for name, cfg in (("parallel", EagerOptions(max_branches=args.branches, initial_branches=args.branches,
                                                   threshold=None)),
                          ("eager", EagerOptions(max_branches=args.branches, threshold=args.threshold))):
            seconds, tokens, answers = batched(model, prompt, cfg, args.temperature, i, args.max_tokens)
            alone = one_by_one(model, prompt, answers)
            records.append({"prompt": i, "config": name, "branches": len(answers), "tokens": tokens,
                            "batched_seconds": round(seconds, 3), "one_by_one_seconds": round(alone, 3),
                            "batched_tps": round(tokens / seconds, 2), "one_by_one_tps": round(tokens / alone, 2)})
            print(json.dumps(records[-1]), flush=True)
    model.close()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    lines = [f"# Branching: batched vs one after another ({dt.date.today()}, {platform.machine()}, "
             f"{args.threads or usable_cores()} threads)", "",
             f"`python benchmarks/branching.py --model {args.model} --branches {args.branches} "
             f"--max-tokens {args.max_tokens} --temperature {args.temperature} --threshold {args.threshold}`", "",
             "| config | branches (mean) | tokens | batched tok/s | one by one tok/s | speed-up |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in ("parallel", "eager"):
        rs = [r for r in records if r["config"] == name]
        tok = sum(r["tokens"] for r in rs)
        b = tok / sum(r["batched_seconds"] for r in rs)
        a = tok / sum(r["one_by_one_seconds"] for r in rs)
        lines.append(f"| {name} | {sum(r['branches'] for r in rs) / len(rs):.1f} | {tok} | {b:.1f} | {a:.1f} | {b / a:.2f}× |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
