"""Without the page's extension (``edge_ensemble.provenance``) the server answers byte for byte as it did before the
extension existed: raw response bodies of a few requests of the official ``openai`` client's kinds, compared with
bodies recorded from main (commit 91261af) before the extension was written, in tests/data/server-bytes.json.

Only what changes from run to run (or machine to machine) is normalized first: the response id, the ``created``
time, the timing figures (seconds, tokens per second, peak memory) and the log-probabilities' values. Everything else (keys, their order, separators, every chunk)
must be identical. The real SmolLM2-135M answers greedily with a fixed seed, so the texts are the same on every
machine (a random tiny model's near-ties could flip on another CPU).

Recording again (only when a change of the OFF responses is intended): ``python tests/test_server_bytes.py``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from edge_ensemble.api import Ensemble, EnsembleConfig  # noqa: E402
from edge_ensemble.server import ServerOptions, create_app  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "server-bytes.json"
MODEL = "smollm2"
ASK = [{"role": "user", "content": "Name the capital city of France in one word."}]
# (name, path, body): what the official client sends for each of its calls (extension off)
EXCHANGES: list[tuple[str, str, dict[str, Any]]] = [
    ("chat", "/v1/chat/completions", {"model": MODEL, "messages": ASK, "max_tokens": 8, "temperature": 0, "seed": 1}),
    ("chat-stream", "/v1/chat/completions", {"model": MODEL, "messages": ASK, "max_tokens": 8, "temperature": 0,
                                             "seed": 1, "stream": True, "stream_options": {"include_usage": True}}),
    ("chat-stream-logprobs", "/v1/chat/completions", {"model": MODEL, "messages": ASK, "max_tokens": 4, "seed": 1,
                                                      "temperature": 0, "stream": True, "logprobs": True,
                                                      "top_logprobs": 1}),
    ("completion", "/v1/completions", {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6,
                                       "temperature": 0, "seed": 1}),
    ("completion-stream", "/v1/completions", {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6,
                                              "temperature": 0, "seed": 1, "stream": True}),
    ("chat-policy", "/v1/chat/completions", {"model": MODEL, "messages": ASK, "max_tokens": 6, "temperature": 0,
                                             "seed": 1, "stream": True, "edge_ensemble": {"policy": "single"}}),
]
_TIMINGS = ("prompt_seconds", "generation_seconds", "tokens_per_second", "peak_memory_mb", "queue_seconds",
            "catch_up_seconds")


def normalize(raw: bytes) -> str:
    """``raw`` with what differs between two runs of the same request replaced by fixed values."""
    text = raw.decode()
    text = re.sub(r'"id":"(chatcmpl|cmpl)-[0-9a-f]{32}"', r'"id":"\1-ID"', text)
    text = re.sub(r'"created":\d+', '"created":0', text)
    text = re.sub(r'"(%s)":-?[0-9.e+-]+' % "|".join(_TIMINGS), r'"\1":0', text)
    # log-probabilities: their last digits depend on the CPU's float kernels (the tokens and their order do not)
    text = re.sub(r'"logprob":-?[0-9.e+-]+', '"logprob":0', text)
    return re.sub(r'"member_decode_seconds":\{[^}]*\}', '"member_decode_seconds":{}', text)


def exchange(running: Any) -> dict[str, str]:
    """Every exchange's normalized response body (status first)."""
    out = {}
    for name, path, body in EXCHANGES:
        status, _, raw = running.request("POST", path, json.dumps(body), {"Content-Type": "application/json"},
                                         raw=True)
        out[name] = f"{status}\n{normalize(raw)}"
    return out


def serve(path: Path):
    from test_server import Running

    ens = Ensemble([path], config=EnsembleConfig(n_ctx=512, n_threads=1, check_memory=False))
    return ens, Running(create_app(ens, ServerOptions(model_id=MODEL)))


@pytest.mark.real
def test_responses_without_the_extension_are_byte_for_byte_those_of_before(real_models, llama_quiet):
    ens, running = serve(real_models("smollm2-135m-instruct"))
    try:
        got = exchange(running)
    finally:
        running.stop()
        ens.close()
    want = json.loads(GOLDEN.read_text())
    assert set(got) == set(want)
    for name in want:
        assert got[name] == want[name], name


if __name__ == "__main__":  # record the golden bodies (from the code checked out now)
    sys.path.insert(0, str(Path(__file__).parent))
    from edge_ensemble.sources import resolve_model

    ens, running = serve(Path(resolve_model("smollm2-135m-instruct", progress=False)))
    try:
        bodies = exchange(running)
    finally:
        running.stop()
        ens.close()
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(bodies, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {GOLDEN}: {', '.join(bodies)}")
