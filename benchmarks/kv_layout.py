"""What a batched decoding step costs on this CPU, by KV-cache layout and attention kernel: B sequences forked from
one prompt (a vote's window, `parallel`'s answers), decoded one token each per `llama_decode`.

    python benchmarks/kv_layout.py [--model qwen2.5-coder-0.5b-instruct] [--b 1 4 7] [--steps 300] [--threads 2]
                                   [--out benchmarks/results/kv-layout.md]

Layouts: unified (one KV stream for every sequence, as edge-ensemble's contexts use since forks share the prompt's
cells: each step's attention spans every sequence's cells, masked) and split (llama.cpp's `kv_unified = false`:
one stream per sequence, so each attends to its own cells only; the prompt is copied into each stream). Flash
attention on and off. Reported: the mean seconds per step early (steps 1-50) and late (the last 50), when each
sequence holds prompt + ~steps tokens. Timings are wall clock; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import sys
import time
from datetime import date
from pathlib import Path

import llama_cpp as L
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edge_ensemble.sources import resolve_model  # noqa: E402

PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
          "clips did Natalia sell altogether in April and May? Think step by step, then give the answer. ") * 2


def run(model: object, vocab: object, b: int, unified: bool, flash: bool, steps: int, threads: int,
        prompt: list[int]) -> tuple[float, float]:
    cp = L.llama_context_default_params()
    cp.n_ctx = 8192
    cp.n_batch = cp.n_ubatch = 512
    cp.n_seq_max = 8
    cp.kv_unified = unified
    cp.flash_attn_type = 1 if flash else 0
    cp.n_threads = cp.n_threads_batch = threads
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    mem = L.llama_get_memory(ctx)
    batch = L.llama_batch_init(512, 0, 8)
    n_vocab = L.llama_vocab_n_tokens(vocab)

    def decode(rows: list[tuple[int, int, int]]) -> None:  # (token, pos, seq); logits at every row
        batch.n_tokens = len(rows)
        for i, (tok, pos, seq) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = tok, pos, 1, seq, 1
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def logits(i: int) -> np.ndarray:
        ptr = L.llama_get_logits_ith(ctx, i)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))

    decode([(t, p, 0) for p, t in enumerate(prompt)][:-1])
    for s in range(1, b):
        if unified:
            L.llama_memory_seq_cp(mem, 0, s, -1, -1)
        else:  # another stream: decode the prompt into it (untimed)
            decode([(t, p, s) for p, t in enumerate(prompt)][:-1])
    rng = np.random.default_rng(0)
    last = [prompt[-1]] * b
    times = []
    for step in range(steps):
        pos = len(prompt) - 1 + step
        t0 = time.perf_counter()
        decode([(last[s], pos, s) for s in range(b)])
        times.append(time.perf_counter() - t0)
        for s in range(b):  # a sample per sequence (T = 1 over the top 40), so the sequences differ
            row = logits(s)
            top = np.argpartition(row, -40)[-40:]
            p = np.exp(row[top] - row[top].max())
            last[s] = int(top[rng.choice(40, p=p / p.sum())])
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    return float(np.mean(times[1:51])), float(np.mean(times[-50:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--b", type=int, nargs="+", default=[1, 4, 7])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    L.llama_backend_init()
    path = resolve_model(args.model, progress=False)
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    vocab = L.llama_model_get_vocab(model)
    buf = (L.llama_token * 1024)()
    n = L.llama_tokenize(vocab, PROMPT.encode(), len(PROMPT.encode()), buf, 1024, True, True)
    prompt = list(buf[:n])
    rows = []
    for b in args.b:
        for unified in ((True,) if b == 1 else (True, False)):
            for flash in (False, True):
                early, late = run(model, vocab, b, unified, flash, args.steps, args.threads, prompt)
                rows.append((b, "unified" if unified else "split", "on" if flash else "off", early, late))
                print(f"B={b} {rows[-1][1]:8} flash {rows[-1][2]:3}: {1000 * early:6.1f} ms/step early, "
                      f"{1000 * late:6.1f} ms/step late", flush=True)
    one = {fl: late for b, lay, fl, _, late in rows if b == 1}
    lines = [f"# Batched decoding steps by KV layout ({args.model}, {date.today()}, {platform.machine()}, "
             f"{args.threads} threads, prompt {len(prompt)} tokens, {args.steps} steps)", "",
             f"`python benchmarks/kv_layout.py --model {args.model} --b {' '.join(map(str, args.b))} "
             f"--steps {args.steps} --threads {args.threads}`", "",
             "| B | KV layout | flash attention | ms/step, steps 1-50 | ms/step, last 50 | last 50 / B=1 (same flash) |",
             "|---:|---|---|---:|---:|---:|"]
    for b, lay, fl, early, late in rows:
        lines.append(f"| {b} | {lay} | {fl} | {1000 * early:.1f} | {1000 * late:.1f} | {late / one[fl]:.2f} |" if fl in one else
                     f"| {b} | {lay} | {fl} | {1000 * early:.1f} | {1000 * late:.1f} | – |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    L.llama_model_free(model)


if __name__ == "__main__":
    main()
