#!/bin/sh
# The evaluation runs behind the README's results section (resumable: rerun to continue).
set -eu
cd "$(dirname "$0")/.."
EE=${EE:-edge-ensemble}
$EE eval gsm8k -p tiny --limit 100 --max-tokens 256 --out results/tiny
$EE eval arc-challenge -p tiny --limit 200 --max-tokens 160 --out results/tiny
$EE eval gsm8k -p coder --limit 100 --max-tokens 256 --out results/coder
$EE eval arc-challenge -p coder --limit 200 --max-tokens 160 --out results/coder
