"""A bounded load test of ``edge-ensemble serve``: C concurrent clients x R streamed requests each, against a real
server in a subprocess on a loopback port, answers serialized (``--parallel 1``), interleaved (``--parallel C
--no-batch``: one policy step each in turn, each its own llama_decode) and batched (``--parallel C``: the open
answers' decodes in one llama_decode per round).

    taskset -c 1 python benchmarks/serve_load.py [--model smollm2-135m-instruct] [--threads 1] [--clients 1,2,4,8]
                                                 [--requests 5] [--max-tokens 64] [--rounds 2]
                                                 [--out benchmarks/results/serve-load.md]

For each client count and mode (modes inner, so that a drift of the machine's speed hits them alike) one server
starts (``--parallel 1``, or ``--parallel`` = the client count) and
serves ``--rounds`` rounds of the same load; the figures are the last round's, the resident memory (VmRSS of
the server process, from /proc/<pid>/status) is read after the first and after the last round. Every request is a
greedy chat completion with its own prompt, streamed (``stream_options.include_usage``): latency is from sending
the request to ``data: [DONE]``, time to first token to the first content chunk, tokens are the usage's
completion tokens. The clients run in this process (threads), on the same cores as the server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from edge_ensemble.runtime import usable_cores
from edge_ensemble.sources import resolve_model

TOPICS = ("the sea", "a lighthouse", "a small robot", "the moon", "a busy market", "an old tree", "a train journey",
          "a lost key", "winter", "a painter", "a river", "a city at night", "a garden", "a storm", "a library",
          "a mountain")


@dataclass
class Outcome:
    """One request as a client saw it."""

    latency: float = 0.0
    first_token: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class Round:
    """One round of the load: every client's requests."""

    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    rss_mb: float = 0.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_server(model: Path, parallel: int, batch: bool, args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = [sys.executable, "-m", "edge_ensemble.cli", "serve", "-m", str(model), "--threads", str(args.threads),
           "--policy", "single", "--n-ctx", str(args.n_ctx), "--parallel", str(parallel), "--port", str(port),
           "--max-queue", str(max(args.clients)), "--served-model-name", "bench", "--batch" if batch else "--no-batch"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the server did not start: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
            time.sleep(0.2)


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())


def ask(port: int, prompt: str, max_tokens: int) -> Outcome:
    """One streamed chat completion."""
    out = Outcome()
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            out.error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
            return out
        done = False
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                out.error = chunk["error"]["message"]
                break
            if chunk.get("usage"):
                out.tokens = chunk["usage"]["completion_tokens"]
            if out.first_token is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                out.first_token = time.perf_counter() - t0
        if not done and out.error is None:
            out.error = "the stream ended without [DONE]"
    except OSError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    out.latency = time.perf_counter() - t0
    return out


def run_round(port: int, clients: int, requests: int, max_tokens: int, offset: int) -> Round:
    result = Round()
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            topic = TOPICS[(offset + c * requests + r) % len(TOPICS)]
            o = ask(port, f"Write a short story about {topic}. Request {c}.{r}.", max_tokens)
            with lock:
                result.outcomes.append(o)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - t0
    return result


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a catalog name or a .gguf path (one member)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-ctx", type=int, default=512, help="per answer")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=5, help="per client per round")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default="serialized,interleaved,batched")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve-load.md")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    model = resolve_model(args.model) if not args.model.endswith(".gguf") else Path(args.model)

    rows = []
    for clients in args.clients:
        for mode in args.modes.split(","):
            parallel = 1 if mode == "serialized" else clients
            proc, port = start_server(model, parallel, mode == "batched", args)
            try:
                rounds = []
                for i in range(args.rounds):
                    rnd = run_round(port, clients, args.requests, args.max_tokens, offset=i)
                    rnd.rss_mb = rss_mb(proc.pid)
                    rounds.append(rnd)
                batched = health(port).get("batched")  # answers per batched decode, over the server's life
                per_round = (batched["answers_served"] / batched["llama_decodes"]
                             if batched and batched["llama_decodes"] else None)
            finally:
                proc.terminate()
                proc.wait(30)
            last = rounds[-1]
            ok = [o for o in last.outcomes if o.error is None]
            errors = sum(o.error is not None for r in rounds for o in r.outcomes)
            tokens = sum(o.tokens for o in ok)
            lat = [o.latency for o in ok]
            ttft = [o.first_token for o in ok if o.first_token is not None]
            row = dict(mode=mode, clients=clients, parallel=parallel, requests=len(last.outcomes), errors=errors,
                       tokens=tokens, seconds=last.seconds, tps=tokens / last.seconds,
                       p50=percentile(lat, 0.5), p95=percentile(lat, 0.95), ttft50=percentile(ttft, 0.5),
                       ttft95=percentile(ttft, 0.95), rss_first=rounds[0].rss_mb, rss_last=rounds[-1].rss_mb,
                       per_round=per_round)
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            for r in rounds:
                for o in r.outcomes:
                    if o.error:
                        print("error:", o.error, file=sys.stderr)

    lines = [
        f"# serve load ({date.today().isoformat()})", "",
        f"`{'taskset -c 1 ' if usable_cores() == 1 else ''}python {' '.join(sys.argv)}`", "",
        f"Model: {model.name} alone (one member, --policy single),"
        f" --threads {args.threads}, --n-ctx {args.n_ctx} per answer, greedy, max_tokens {args.max_tokens},"
        f" {args.requests} streamed chat requests per client per round, {args.rounds} rounds per server; figures of"
        f" the last round. {usable_cores()} usable core(s), {platform.machine()}, Python {platform.python_version()}.",
        "", "| mode | clients | --parallel | requests | errors | tokens | wall s | aggregate tok/s | p50 latency s |"
        " p95 latency s | p50 first token s | p95 first token s | VmRSS after first round MiB | after last MiB |"
        " answers per llama_decode |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['clients']} | {r['parallel']} | {r['requests']} | {r['errors']} |"
                     f" {r['tokens']} | {r['seconds']:.1f} | {r['tps']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} |"
                     f" {r['ttft50']:.2f} | {r['ttft95']:.2f} | {r['rss_first']:.0f} | {r['rss_last']:.0f} |"
                     f" {'–' if r['per_round'] is None else format(r['per_round'], '.2f')} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
