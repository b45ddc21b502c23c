"""Cost of keeping a member's tokenization of the growing text up to date (TokenTrack.extend), by text length.

    python benchmarks/alignment_cost.py > benchmarks/results/alignment-cost.md

Whole-text re-tokenization would grow linearly with the text; the tail window keeps it flat.
"""

from __future__ import annotations

import random
import time

from edge_ensemble.alignment import TokenTrack
from edge_ensemble.runtime import LoadOptions, Model
from edge_ensemble.sources import resolve_model

WORDS = ["the", "answer", "is", "42", "because", "日本", "🚀", "x**2", "\n", "  ", "def", "f(x):", "1,234.5"]


def main() -> None:
    print("| tokenizer | µs per extend at ~1 KB | at ~8 KB | at ~16 KB | whole-text tokenize at ~16 KB |")
    print("|---|---|---|---|---|")
    for key in ("qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct", "gemma-3-270m"):
        model = Model(resolve_model(key, progress=False), LoadOptions(vocab_only=True))
        track = TokenTrack(lambda b, m=model: m.tokenize(b, add_bos=False, special=False), model.token_bytes)
        rng = random.Random(0)
        marks, cost = (1000, 8000, 16000), {}
        while len(track.text) < 16500:
            chunk = (" " + rng.choice(WORDS)).encode()
            t0 = time.perf_counter()
            for _ in range(1):
                track.extend(chunk)
            dt = time.perf_counter() - t0
            for m in marks:
                if m <= len(track.text) < m + 400:
                    cost.setdefault(m, []).append(dt)
        t0 = time.perf_counter()
        model.tokenize(track.text, add_bos=False, special=False)
        whole = time.perf_counter() - t0
        cells = " | ".join(f"{1e6 * sorted(cost[m])[len(cost[m]) // 2]:.0f}" for m in marks)
        print(f"| {key} | {cells} | {1e6 * whole:.0f} |")
        model.close()


if __name__ == "__main__":
    main()
