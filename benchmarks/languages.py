"""How an ensemble behaves across languages: E/T, positions left to the drafter as unreliable, and whether an
answer degenerates into a loop, for English and non-English prompts, against the drafter alone.

    python benchmarks/languages.py --preset tiny [--max-tokens 64] [--out benchmarks/results/languages-tiny.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_ensemble.api import Ensemble, EnsembleConfig
from edge_ensemble.eval.languages import ENGLISH, NON_ENGLISH, longest_run
from edge_ensemble.sources import Catalog

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    members = list(Catalog.load().preset(args.preset).members)
    rows = []
    with Ensemble(members, config=EnsembleConfig(n_ctx=1024, policy="safe")) as ens:
        for lang, prompts in (("en", ENGLISH), ("other", NON_ENGLISH)):
            for name, prompt in prompts.items():
                ens.reset_cache()
                alone = ens.generate(prompt, max_tokens=args.max_tokens, policy="single")
                ens.reset_cache()
                r = ens.generate(prompt, max_tokens=args.max_tokens)
                s = r.stats
                rows.append((lang, name, s.tokens, s.ensembled_fraction, s.overridden_tokens, s.unreliable_positions,
                             longest_run(alone.text), longest_run(r.text)))
                print(rows[-1], repr(r.text[:60]), file=sys.stderr)
    lines = [f"# Languages: `{args.preset}` ({', '.join(members)}), gated SAFE, {args.max_tokens} tokens, greedy", "",
             "| set | prompt | tokens | E/T | overridden | unreliable positions | longest repeat alone | longest repeat ensemble |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {l} | {n} | {t} | {e:.3f} | {o} | {u} | {a} | {b} |" for l, n, t, e, o, u, a, b in rows]
    for lang in ("en", "other"):
        sub = [r for r in rows if r[0] == lang]
        tok = sum(r[2] for r in sub)
        ens_tok = sum(r[3] * r[2] for r in sub)
        lines.append(f"| **{lang}** | all | {tok} | {ens_tok / tok:.3f} | {sum(r[4] for r in sub)} | "
                     f"{sum(r[5] for r in sub)} | {max(r[6] for r in sub)} | {max(r[7] for r in sub)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
