#!/bin/sh
# The evaluation runs behind the README's results section (resumable: rerun to continue).
#
# The coder preset's Qwen2.5-Coder-0.5B is the same GGUF as the tiny preset's drafter, and a single model
# with greedy decoding gives the same answers whatever preset it is listed in (checked on GSM8K items 0-2:
# identical text). So its "alone" records are copied from results/tiny instead of being generated twice.
set -eu
cd "$(dirname "$0")/.."
EE=${EE:-edge-ensemble}
PY=${PY:-python}
SHARED=single:Qwen2.5-Coder-0.5B-Instruct

share() {  # copy the shared member's records of task $1 from results/tiny to results/coder
    $PY - "$1" "$SHARED" <<'PYEOF'
import json, sys
from pathlib import Path
task, config = sys.argv[1], sys.argv[2]
src, dst = Path("results/tiny") / f"{task}.jsonl", Path("results/coder") / f"{task}.jsonl"
dst.parent.mkdir(parents=True, exist_ok=True)
have = {(r["item"], r["config"]) for r in map(json.loads, dst.read_text().splitlines())} if dst.exists() else set()
new = [line for line in src.read_text().splitlines()
       if (r := json.loads(line))["config"] == config and (r["item"], config) not in have]
with dst.open("a") as out:
    out.writelines(line + "\n" for line in new)
print(f"{dst}: {len(new)} records of {config} copied from {src}")
PYEOF
}

$EE eval gsm8k -p tiny --limit 100 --max-tokens 256 --out results/tiny
$EE eval arc-challenge -p tiny --limit 200 --max-tokens 32 --out results/tiny
share arc-challenge
$EE eval arc-challenge -p coder --limit 200 --max-tokens 32 --out results/coder \
    --configs single:Qwen2.5-Coder-1.5B-Instruct,every-token,safe,safe-gated
share gsm8k
$EE eval gsm8k -p coder --limit 100 --max-tokens 256 --out results/coder \
    --configs single:Qwen2.5-Coder-1.5B-Instruct,every-token,safe,safe-gated
