"""Regenerate the evaluation table (Markdown) and the accuracy-vs-speed plot (PNG) from raw JSONL records.

    python benchmarks/make_eval_report.py                      # results/*.jsonl → results/eval_report.{md,png}
    python benchmarks/make_eval_report.py --results runs/0612 --no-plot
    python benchmarks/make_eval_report.py --results results/coder --readme docs/results.md   # also the notebook's table
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_ensemble.errors import EdgeEnsembleError
from edge_ensemble.eval.report import glance_markdown, load_records, update_document, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"), help="directory of <task>.jsonl files")
    parser.add_argument("--md", type=Path, help="Markdown output (default: RESULTS/eval_report.md)")
    parser.add_argument("--png", type=Path, help="plot output (default: RESULTS/eval_report.png)")
    parser.add_argument("--no-plot", action="store_true", help="write only the Markdown table")
    parser.add_argument("--readme", type=Path, action="append", help="also rewrite this document's at-a-glance table, "
                        "between <!-- results:NAME --> and <!-- /results:NAME --> (NAME: --block); repeat it for "
                        "several documents (the README and docs/results.md both quote coder-512's)")
    parser.add_argument("--block", help="marker name for --readme (default: the results directory's name)")
    args = parser.parse_args(argv)

    try:
        paths = sorted(args.results.glob("*.jsonl"))
        if not paths:
            raise EdgeEnsembleError(f"no *.jsonl files in {args.results}; run `edge-ensemble eval` first")
        md = args.md or args.results / "eval_report.md"
        png = None if args.no_plot else (args.png or args.results / "eval_report.png")
        summaries = write_report(load_records(paths), md, png, sources=", ".join(p.name for p in paths))
        print(md.read_text(encoding="utf-8"), end="")
        print(f"wrote {md}" + (f" and {png}" if png else ""), file=sys.stderr)
        block = args.block or args.results.resolve().name
        for document in args.readme or ():
            changed = update_document(document, block, glance_markdown(summaries))
            print(f"{'updated' if changed else 'unchanged'}: {document} ({block} table)", file=sys.stderr)
    except EdgeEnsembleError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
