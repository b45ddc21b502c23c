"""Aggregate decoding speed of B sequences decoded together (one llama_decode per step) versus one after
another, B = 1..16, and what the hidden-state output costs per token.

    python benchmarks/batched.py [--models qwen2.5-coder-0.5b-instruct smollm2-135m-instruct] [--tokens 32]
                                 [--repeats 3] [--b 1 2 4 8 16] [--gpu-layers -1] [--out benchmarks/results/batched.md]

Each sequence has its own prompt (8-40 tokens, prefilled before timing) and decodes greedily; "together" runs one
multi-sequence batch per step, "one after another" runs each sequence's steps alone. Timings are wall clock on
whatever cores the process may use; compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np

from edge_ensemble.runtime import LoadOptions, Model, SeqRequest, usable_cores
from edge_ensemble.sources import resolve_model

B_VALUES = (1, 2, 4, 8, 12, 16)


def prompts(model: Model, b: int) -> list[list[int]]:
    rng = np.random.default_rng(b)
    words = "the of and a to in is you that it he was for on are as with his they at be this have from".split()
    return [model.tokenize(" ".join(rng.choice(words, size=int(rng.integers(8, 40)))), add_bos=True) for _ in range(b)]


def together(model: Model, ps: list[list[int]], steps: int) -> float:
    model.reset()
    res = model.decode_many([SeqRequest(i, p) for i, p in enumerate(ps)])
    last = {i: int(np.argmax(res.row(i))) for i in range(len(ps))}
    t0 = time.perf_counter()
    for _ in range(steps):
        res = model.decode_many([SeqRequest(i, [last[i]]) for i in range(len(ps))])
        last = {i: int(np.argmax(res.row(i))) for i in range(len(ps))}
    return time.perf_counter() - t0


def one_after_another(model: Model, ps: list[list[int]], steps: int) -> float:
    total = 0.0
    for p in ps:
        model.reset()
        tok = int(np.argmax(model.decode(p)[0]))
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = int(np.argmax(model.decode([tok])[0]))
        total += time.perf_counter() - t0
    return total


def hidden_cost(path: Path, steps: int, gpu_layers: int = 0) -> list[tuple[float, float]]:
    """(seconds per single-token step, seconds for a 256-token prefill) without and with hidden states.
    With embeddings on, llama.cpp outputs every row of a batch, so a prefill pays the output projection at
    every position."""
    out = []
    for hidden in (False, True):
        model = Model(path, LoadOptions(n_ctx=2048, n_gpu_layers=gpu_layers, hidden_states=hidden))
        step = one_after_another(model, prompts(model, 1), steps) / steps
        model.reset()
        t0 = time.perf_counter()
        model.decode(list(range(1000, 1256)), want="last")
        out.append((step, time.perf_counter() - t0))
        model.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"])
    ap.add_argument("--tokens", type=int, default=32, help="tokens decoded per sequence")
    ap.add_argument("--repeats", type=int, default=3, help="alternating repetitions; the best of each is kept")
    ap.add_argument("--b", type=int, nargs="+", default=list(B_VALUES), help="numbers of sequences decoded together")
    ap.add_argument("--gpu-layers", type=int, default=0, help="layers offloaded to the GPU (-1: all) on a GPU build")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    lines = [f"# Batched decoding: B sequences together vs one after another ({date.today()}, "
             f"{platform.machine()}, {usable_cores()} cores, GPU layers {args.gpu_layers}, {args.tokens} tokens per "
             f"sequence, best of {args.repeats} "
             "alternating runs)", ""]
    for key in args.models:
        path = resolve_model(key, progress=False)
        model = Model(path, LoadOptions(n_ctx=2048, n_gpu_layers=args.gpu_layers, n_seq_max=max(args.b)))
        lines += [f"## {key}", "", "| B | together tok/s | one after another tok/s | speed-up |", "|---:|---:|---:|---:|"]
        for b in args.b:
            ps = prompts(model, b)
            # This VM's speed drifts by 20-50% over minutes: alternate the two ways and keep each one's best.
            t_tog = t_seq = float("inf")
            for _ in range(args.repeats):
                t_tog = min(t_tog, together(model, ps, args.tokens))
                t_seq = min(t_seq, one_after_another(model, ps, args.tokens))
            n = b * args.tokens
            lines.append(f"| {b} | {n / t_tog:.1f} | {n / t_seq:.1f} | {t_seq / t_tog:.2f}× |")
            print(lines[-1], flush=True)
        model.close()
        (off, pre_off), (on, pre_on) = hidden_cost(path, args.tokens, args.gpu_layers)
        lines += ["", f"Hidden-state output (pooling none): a one-token step takes {off * 1000:.1f} ms without, "
                      f"{on * 1000:.1f} ms with ({(on / off - 1) * 100:+.1f}%); a 256-token prefill {pre_off:.2f} s "
                      f"without, {pre_on:.2f} s with ({(pre_on / pre_off - 1) * 100:+.1f}%: every row is output).", ""]
        print(lines[-2], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
