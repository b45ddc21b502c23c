"""The `tiny` pair with members on llama-servers: all-local vs verifier-remote vs drafter-remote, on loopback,
with and without simulated network latency.

    python benchmarks/remote.py [--tokens 64] [--latency-ms 0 0.1 1 10] [--out benchmarks/results/remote.md]

Starts one llama-server per model on 127.0.0.1 (one thread each, the binary of scripts/build-llama-server), then
generates the same answers greedily in each configuration. Latency is injected in the client: a sleep before
every request to a server (so it is paid per round trip, as a network would charge it; the loopback round trip
itself is measured on top). Every process shares this machine's cores, where separate machines would not: the
figures show what the protocol costs, not what separate hardware would gain.
"""

from __future__ import annotations

import argparse
import platform
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from llama_server import Server, llama_server_binary  # noqa: E402

from edge_ensemble.api import Ensemble  # noqa: E402
from edge_ensemble.runtime import usable_cores  # noqa: E402
from edge_ensemble.sources import resolve_model  # noqa: E402

DRAFTER, VERIFIER = "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"
PROMPTS = ["Why is the sky blue? Answer in two sentences.", "Write a Python function that reverses a string.",
           "Name three primary colors and one use of each."]


def run(members: list[str], tokens: int, latency: float) -> dict:
    """Generate every prompt once (after a one-token answer that prefills it); totals and per-request costs."""
    with Ensemble(members, n_ctx=1024, n_threads=1) as ens:
        remotes = [m.backend for m in ens._members if hasattr(m.backend, "draft")]
        for b in remotes:
            b.latency = latency
        out = {"tokens": 0, "seconds": 0.0, "verify_calls": 0, "verify_seconds": 0.0, "texts": [],
               "requests": 0, "request_seconds": 0.0}
        for p in PROMPTS:
            # The prompt is prefilled by a one-token answer first (every member, local or remote, then reuses
            # it), so the counts below are the generation's alone: drafting and verification requests.
            ens.generate(p, max_tokens=1)
            before = [(b.requests, b.request_seconds) for b in remotes]
            r = ens.generate(p, max_tokens=tokens)
            s = r.stats
            out["tokens"] += s.tokens
            out["seconds"] += s.generation_seconds
            out["verify_calls"] += s.verification_calls
            out["verify_seconds"] += s.member_decode_seconds[s.members[1]]
            out["texts"].append(r.text)
            out["requests"] += sum(b.requests - n for b, (n, _) in zip(remotes, before))
            out["request_seconds"] += sum(b.request_seconds - t for b, (_, t) in zip(remotes, before))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="max tokens per answer")
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 0.1, 1.0, 10.0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    binary = llama_server_binary()
    if binary is None:
        sys.exit("no llama-server: run scripts/build-llama-server first")
    d_path, v_path = (resolve_model(k, progress=False) for k in (DRAFTER, VERIFIER))
    rows = []
    with Server(binary, d_path, slots=1, n_ctx=1024) as d_srv, Server(binary, v_path, slots=1, n_ctx=1024) as v_srv:
        configs = {"all local": [str(d_path), str(v_path)],
                   "verifier remote": [str(d_path), v_srv.spec(VERIFIER)],
                   "drafter remote": [d_srv.spec(DRAFTER), str(v_path)]}
        reference = run(configs["all local"], args.tokens, 0.0)
        rows.append(("all local", 0.0, reference))
        for name in ("verifier remote", "drafter remote"):
            for ms in args.latency_ms:
                rows.append((name, ms, run(configs[name], args.tokens, ms / 1000)))
    lines = [f"# The tiny pair with members on llama-servers ({date.today()}, {platform.machine()}, "
             f"{usable_cores()} usable cores, up to {args.tokens} tokens x {len(PROMPTS)} prompts, greedy)", "",
             "Loopback; latency injected in the client as a sleep before every request. Every process (this one and"
             " both servers, one thread each) shares the same cores. Prompts are prefilled before timing. ms / request:"
             " wall time of a request to a server (drafting or verification) as the client sees it;"
             " ms / verification: the verifier's time per verification call (remote: its requests).", "",
             "| members | added latency | tok/s | requests / token | ms / request | verifications | ms / verification | text = all local |",
             "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for name, ms, r in rows:
        tps = r["tokens"] / r["seconds"] if r["seconds"] else 0.0
        per_req = 1000 * r["request_seconds"] / r["requests"] if r.get("requests") else 0.0
        per_ver = 1000 * r["verify_seconds"] / r["verify_calls"] if r["verify_calls"] else 0.0
        same = "yes" if r["texts"] == reference["texts"] else "no"
        lines.append(f"| {name} | {ms:g} ms | {tps:.1f} | {r.get('requests', 0) / max(r['tokens'], 1):.2f} | "
                     f"{per_req:.1f} | {r['verify_calls']} | {per_ver:.1f} | {same} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
