"""Speed benchmark: every policy on the same prompts, same models, same run.

    python benchmarks/speed.py --preset tiny --max-tokens 256 --out benchmarks/results/speed-tiny
    python benchmarks/speed.py --preset coder --head results/route/head-gsm8k100.npz --threads 1 --overlap \
        --out benchmarks/results/speed-coder-route     # + route, route gated, route with overlap (one thread each)
    python benchmarks/speed.py -m a.gguf -m b.gguf --gpu-layers -1 --also vote   # on a GPU build (scripts/gpu-check)

Measures, per policy: tokens/s (generated tokens / generation wall time, prompt excluded), E/T, draft
acceptance, verification calls, the share of wall time spent outside llama_decode (Python work), and peak
RSS. Writes the raw per-prompt records (JSONL) and a Markdown summary. Timings on a shared machine are
noisy: compare the ratios within one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import os
import platform
import pstats
import sys
import time
from dataclasses import replace
from pathlib import Path

from edge_ensemble.api import Ensemble, EnsembleConfig
from edge_ensemble.sources import Catalog

PROMPTS = [
    "Why is the sky blue? Explain it to a curious ten-year-old.",
    "Write a Python function that checks whether a string is a palindrome, with a short docstring.",
    "A train leaves at 3:40 pm and the trip takes 2 hours 35 minutes. When does it arrive? Show your steps.",
    "List five practical tips for keeping a small vegetable garden healthy.",
    "Summarise the causes of the French Revolution in one paragraph.",
    "Explain the difference between a list and a tuple in Python, with examples.",
    "Write a short story (about 150 words) about a lighthouse keeper who finds a message in a bottle.",
    "What are the pros and cons of electric cars compared with petrol cars?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? Think step by step.",
    "Explain what a hash table is and why lookups are fast on average.",
]

CONFIGS = [
    # (label, options over the base config)
    ("single (drafter alone)", {"policy": "single"}),
    ("every-token (UniTE)", {"policy": "every-token"}),
    ("safe (faithful)", {"policy": "safe", "gate": None}),
    ("safe + gate 0.5 (default)", {"policy": "safe", "gate": 0.5}),
]
# With --head: over a second ensemble of the same members whose router gives hidden states (which costs the
# router's steps something, so the configurations above do not pay for it).
ROUTE_CONFIGS = [
    ("route (beta fitted)", {"policy": "route"}),
    ("route, gated 0.5", {"policy": "route", "route_gate": 0.5}),
]
OVERLAP_CONFIG = ("route, overlap", {"policy": "route", "overlap": True})  # --overlap: two models at once


def run(args: argparse.Namespace) -> None:
    catalog = Catalog.load()
    members = args.member or list(catalog.preset(args.preset).members)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = EnsembleConfig(n_ctx=2048, n_threads=args.threads, n_gpu_layers=args.gpu_layers, check_memory=True)
    ens = Ensemble(members, config=base, progress=True)
    runs = [(label, ens, replace(base, **o).validate(len(members))) for label, o in CONFIGS]
    # --also: each policy on an ensemble of its own, created for it (a policy may need more per-member sequences
    # than the ensemble above was loaded with); the same members, loaded again.
    extra = [Ensemble(members, config=replace(base, policy=name), progress=True) for name in args.also]
    for name, target in zip(args.also, extra):
        runs.append((name, target, replace(base, policy=name).validate(len(members))))
    routed = None
    if args.head:
        routed = Ensemble(members, config=replace(base, policy="route", head=args.head), progress=True)
        for label, o in ROUTE_CONFIGS + ([OVERLAP_CONFIG] if args.overlap else []):
            runs.append((label, routed, replace(base, head=args.head, **o).validate(len(members))))
    names = [m.name for m in ens.members]
    records = []
    prompts = PROMPTS[: args.prompts]
    profiler = cProfile.Profile() if args.profile else None
    # Warm-up: first decode pays page-ins of the mmapped weights.
    ens.generate(prompts[0], max_tokens=8, policy="every-token")
    for target in [*extra, *([routed] if routed is not None else [])]:
        target.generate(prompts[0], max_tokens=8)
    for i, prompt in enumerate(prompts):
        for label, target, config in runs:
            target.config = config
            before = {m.name: m.model.llama_decode_seconds for m in target._members}
            if profiler and config.policy == "safe" and config.gate is not None:
                profiler.enable()
            t0 = time.perf_counter()
            result = target.generate(prompt, max_tokens=args.max_tokens)
            wall = time.perf_counter() - t0
            if profiler:
                profiler.disable()
            in_llama = sum(m.model.llama_decode_seconds - before[m.name] for m in target._members)
            s = result.stats
            rec = {
                "prompt": i, "config": label, "policy": config.policy, "gate": config.gate, "tokens": s.tokens,
                "generation_seconds": s.generation_seconds, "prompt_seconds": s.prompt_seconds,
                "tokens_per_second": s.tokens_per_second, "ensembled_fraction": s.ensembled_fraction,
                "overridden_tokens": s.figure("overridden_tokens", 0),
                "draft_acceptance_rate": s.figure("draft_acceptance_rate"),
                "verification_calls": s.figure("verification_calls", 0), "member_decode_seconds": s.member_decode_seconds,
                "member_decoded_tokens": s.member_decoded_tokens, "wall_seconds": wall,
                "llama_decode_seconds": in_llama, "python_share": 1 - in_llama / wall if wall else 0.0,
                "peak_memory_mb": s.peak_memory_mb, "finish_reason": result.finish_reason, "text": result.text,
            }
            if s.figure("routed_tokens"):
                rec.update(routed_tokens=s.routed_tokens, route_decisions=s.route_decisions,
                           catch_up_tokens=s.catch_up_tokens)
            records.append(rec)
            print(f"[{i}] {label:28s} {s.tokens:4d} tok {s.tokens_per_second:6.1f} tok/s  E/T {s.ensembled_fraction:.3f}"
                  f"  python {rec['python_share']:.1%}", file=sys.stderr, flush=True)
    for target in [ens, *extra, *([routed] if routed is not None else [])]:
        target.close()
    with open(out.with_suffix(".jsonl"), "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    md = summary(records, names, args, [label for label, _, _ in runs])
    if profiler:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(15)
        md += "\n## Profile of gated SAFE (cProfile, top 15 by own time)\n\n```\n" + buf.getvalue().strip() + "\n```\n"
    out.with_suffix(".md").write_text(md)
    print(md)


def summary(records: list[dict], names: list[str], args: argparse.Namespace, labels: list[str]) -> str:
    rows = []
    by = {}
    for r in records:
        by.setdefault(r["config"], []).append(r)
    ref = None
    for label in labels:
        rs = by[label]
        tokens = sum(r["tokens"] for r in rs)
        secs = sum(r["generation_seconds"] for r in rs)
        tps = tokens / secs
        if ref is None:
            ref = tps
        et = sum(r["ensembled_fraction"] * r["tokens"] for r in rs) / max(1, tokens)
        acc = [r["draft_acceptance_rate"] for r in rs if r["draft_acceptance_rate"] is not None]
        py = sum(r["wall_seconds"] - r["llama_decode_seconds"] for r in rs) / sum(r["wall_seconds"] for r in rs)
        vcalls = sum(r["verification_calls"] for r in rs)
        rows.append(f"| {label} | {tokens} | {tps:.1f} | {tps / ref:.2f}× | {et:.3f} | "
                    f"{(sum(acc) / len(acc)) if acc else float('nan'):.2f} | {vcalls} | {py:.1%} |")
    peak = max(r["peak_memory_mb"] for r in records)
    by_label = {label: sum(r["tokens"] for r in by[label]) / sum(r["generation_seconds"] for r in by[label]) for label in labels}
    gated = by_label["safe + gate 0.5 (default)"]
    lines = [
        f"# Speed: {' + '.join(names)}",
        "",
        f"Date: {dt.date.today().isoformat()}. Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.system()}; threads per model: {args.threads}; GPU layers: {args.gpu_layers}. Greedy, max {args.max_tokens} new tokens, "
        f"{len(by[CONFIGS[0][0]])} prompts, every policy on every prompt in the same run.",
        "",
        f"Command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`",
        "",
        "| policy | tokens | tok/s | vs drafter alone | E/T | draft acceptance | verifier calls | time outside llama_decode |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Gated SAFE / drafter alone: **{gated / by_label['single (drafter alone)']:.2f}×**; "
        f"gated SAFE / every-token: **{gated / by_label['every-token (UniTE)']:.2f}×**; "
        f"faithful SAFE / drafter alone: {by_label['safe (faithful)'] / by_label['single (drafter alone)']:.2f}×. "
        f"Peak RSS of the process: {peak:.0f} MB.",
        "",
    ]
    routes = [label for label in labels if by[label][0]["policy"] == "route"]
    if routes:
        alone = by_label["single (drafter alone)"]
        lines += ["Route, time per token against the drafter alone (the issue's goal: at most 1.15×): "
                  + "; ".join(f"{label} **{alone / by_label[label]:.2f}×** (router consulted at "
                              f"{sum(r['route_decisions'] for r in by[label]) / max(1, sum(r['tokens'] for r in by[label])):.0%}"
                              " of tokens)" for label in routes) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("-m", "--member", action="append", help="explicit members (first drafts) instead of a preset")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--gpu-layers", type=int, default=0, help="layers offloaded to the GPU (-1: all) on a GPU build")
    p.add_argument("--also", action="append", default=[], metavar="POLICY",
                   help="also run this registered policy with its defaults (repeatable)")
    p.add_argument("--profile", action="store_true", help="cProfile the gated SAFE runs")
    p.add_argument("--head", help="a route head for these members: adds the route configurations")
    p.add_argument("--overlap", action="store_true", help="with --head, also route with --overlap (give --threads 1 "
                   "on two cores: two models then decode at once)")
    p.add_argument("--out", default=None, help="output path without suffix [default: benchmarks/results/speed-<preset>]")
    args = p.parse_args()
    args.out = args.out or f"benchmarks/results/speed-{args.preset}"
    run(args)


if __name__ == "__main__":
    main()
