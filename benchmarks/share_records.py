"""Copy one configuration's evaluation records from one results directory to another.

    python benchmarks/share_records.py --task arc-challenge --config single:Qwen2.5-Coder-0.5B-Instruct \
        --limit 200 results/tiny results/coder

For a member two presets share (same GGUF, same settings): its answers alone do not depend on which other
models were loaded, so there is no need to generate them twice. Refuses records made another way (harness,
prompt version or token budget) and copies only the items of the slice the destination lacks.

    python benchmarks/share_records.py --task gsm8k --config safe-gated --as "safe w=1 gate=0.5" \
        results/coder-512 results/calibrate/coder

``--as`` files them under another configuration name, for the same settings spelled another way (eval's
safe-gated is calibrate's "safe w=1 gate=0.5" on equal weights): you vouch for the equivalence; each record
keeps its first name as ``shared_from``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_ensemble.errors import EdgeEnsembleError
from edge_ensemble.eval.runner import results_path, share_records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="results directory to copy from")
    parser.add_argument("dest", type=Path, help="results directory to copy into")
    parser.add_argument("--task", required=True)
    parser.add_argument("--config", required=True, help="e.g. single:Qwen2.5-Coder-0.5B-Instruct")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--as", dest="as_config", metavar="NAME", help="write them under this configuration name")
    args = parser.parse_args(argv)
    try:
        src, dst = results_path(args.source, args.task), results_path(args.dest, args.task)
        n = share_records(src, dst, args.task, args.config, start=args.start, limit=args.limit,
                          as_config=args.as_config)
    except EdgeEnsembleError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(f"{dst}: {n} records of {args.config} copied from {src}"
          + (f" as {args.as_config}" if args.as_config else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
