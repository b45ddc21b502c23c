"""Where to set EAGER's entropy threshold for a given model: the top-20 entropies (nats, before temperature, the
authors' convention) of the tokens a model samples on GSM8K items outside every evaluation and training slice.

    python benchmarks/entropy_probe.py --model qwen2.5-coder-0.5b-instruct --start 800 --limit 10 \
        --out benchmarks/results/entropy-probe-0.5b.md

The authors' default (2.5 nats) was set on larger models' vLLM log-probabilities; over the top 20 the entropy is at
most ln 20 = 3.0, so a threshold must be read off the model's own distribution. Reports percentiles and, per
candidate threshold, how many tokens per answer pass it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import numpy as np

from edge_ensemble.branching import topn_entropy
from edge_ensemble.decisions import softmax
from edge_ensemble.eval.tasks import get_task
from edge_ensemble.runtime import LoadOptions, Model
from edge_ensemble.sources import parse_spec, resolve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--start", type=int, default=800)
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    path = resolve(parse_spec(args.model), download=False)
    opts = LoadOptions(n_ctx=2048, **({"n_threads": args.threads} if args.threads else {}))
    rng = np.random.default_rng(0)
    task = get_task("gsm8k")
    per_answer: list[np.ndarray] = []
    t0 = time.perf_counter()
    with Model(path, opts) as model:
        for item in task.items(args.start, args.limit):
            model.reset()
            prompt = model.prompt_tokens(model.render_chat(task.build_messages(item)))
            logits = model.decode(prompt)[-1]
            hs = []
            for _ in range(args.max_tokens):
                p = softmax(logits)
                hs.append(topn_entropy(p))
                q = softmax(logits / np.float32(args.temperature))
                tok = int(rng.choice(q.size, p=q / q.sum()))
                if model.is_eog(tok):
                    break
                logits = model.decode([tok])[-1]
            per_answer.append(np.array(hs))
    allh = np.concatenate(per_answer)
    lines = [f"# Top-20 entropy of sampled tokens: {path.name}", "",
             f"GSM8K test items {args.start}–{args.start + args.limit - 1} (outside every evaluation and training "
             f"slice), T = {args.temperature}, up to {args.max_tokens} tokens, {len(allh)} tokens in "
             f"{len(per_answer)} answers, {time.perf_counter() - t0:.0f} s, {dt.date.today()}. Entropy in nats, "
             f"before temperature, over the top 20 renormalised (max ln 20 = {np.log(20):.2f}).", "",
             "| percentile | 50 | 90 | 95 | 99 | 99.5 | max |", "|---|---:|---:|---:|---:|---:|---:|",
             "| entropy | " + " | ".join(f"{np.percentile(allh, q):.2f}" for q in (50, 90, 95, 99, 99.5))
             + f" | {allh.max():.2f} |", "",
             "| threshold | share of tokens above | tokens above per answer (mean) | answers with none |",
             "|---:|---:|---:|---:|"]
    for th in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5):
        above = [int((h > th).sum()) for h in per_answer]
        lines.append(f"| {th:.2f} | {(allh > th).mean():.1%} | {np.mean(above):.1f} | "
                     f"{sum(a == 0 for a in above)}/{len(above)} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
