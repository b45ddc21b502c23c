#!/bin/sh
# The evaluation runs behind docs/results.md (resumable: rerun to continue).
set -eu
cd "$(dirname "$0")/.."
EE=${EE:-edge-ensemble}
PY=${PY:-python3}

$EE eval gsm8k -p tiny --limit 100 --max-tokens 256 --out results/tiny
$EE eval arc-challenge -p tiny --limit 200 --max-tokens 32 --out results/tiny

# The coder preset's Qwen2.5-Coder-0.5B is the tiny preset's drafter (same GGUF, same settings): its ARC
# answers alone are copied from results/tiny rather than generated again. Not for GSM8K: the tiny GSM8K
# records were made by harness 1 (prompts could come from another configuration's cache), which the copy refuses.
$EE eval arc-challenge -p coder --limit 200 --max-tokens 32 --out results/coder \
    --configs single:Qwen2.5-Coder-1.5B-Instruct,every-token,safe,safe-gated
$PY benchmarks/share_records.py --task arc-challenge --config single:Qwen2.5-Coder-0.5B-Instruct --limit 200 \
    results/tiny results/coder
$EE eval gsm8k -p coder --limit 100 --max-tokens 256 --out results/coder

# Tables, plots and the at-a-glance tables of docs/results.md (and the README's coder-512 one), from the raw records.
for preset in tiny coder; do
    $PY benchmarks/make_eval_report.py --results results/$preset --md results/$preset/summary.md \
        --png results/$preset/summary.png --readme docs/results.md > /dev/null
done

# A 20-item HumanEval smoke run (docs/results.md: "HumanEval, coder pair"); it writes its own summary.
$EE eval humaneval -p coder --limit 20 --max-tokens 384 --out results/coder-humaneval-smoke

# GSM8K at 512 tokens (issue 12). EAGER on the 0.5B: greedy, parallel M = 8, eager M = 8, then eager-adapt
# (a second pass over the same 100 items; it needs every eager record first). Run on one core with one thread;
# the figures in docs/results.md were made this way, some item ranges in a second one-core process (--out elsewhere, then
# share_records.py per configuration into this directory).
$EE eval gsm8k -m qwen2.5-coder-0.5b-instruct --configs single,parallel,eager,eager-adapt --threshold 1.75 \
    --start 0 --limit 100 --max-tokens 512 --threads 1 --out results/eager-gsm8k-0.5b-512 --no-plot
# The coder pair at 512 tokens: the 0.5B alone is the run above's (same GGUF, same settings), copied.
$PY benchmarks/share_records.py --task gsm8k --config single:Qwen2.5-Coder-0.5B-Instruct --limit 100 \
    results/eager-gsm8k-0.5b-512 results/coder-512
# (Run as two one-core processes: `taskset -c 0 ... --shard 0/2` into results/coder-512 and `taskset -c 1 ...
# --shard 1/2` into a copy, results/coder-512-1, whose 1.5B and gated-SAFE records were then copied back with
# share_records.py.)
$EE eval gsm8k -p coder --configs single,safe-gated --limit 100 --max-tokens 512 --threads 1 --out results/coder-512 \
    --no-plot
$PY benchmarks/make_eval_report.py --results results/coder-512 --md results/coder-512/summary.md \
    --png results/coder-512/summary.png --readme docs/results.md --readme README.md > /dev/null
