"""Members served by llama.cpp's ``llama-server`` on this or another machine: :class:`RemoteBackend`.

A member spec ``server:http://host:port=MODEL`` names a running llama-server and the model it is declared to
serve (``MODEL`` is a catalog name, a GGUF path or an ``hf:`` spec; without ``=MODEL`` the server's own
``model_path`` is used when that file is readable here). The declared GGUF is opened **vocab-only** on this
machine (milliseconds, no weights in memory): it gives the tokenizer, the chat template and a tokenizer
fingerprint byte-identical to a local member's — llama-server has no endpoint that returns one token id's raw
bytes or the tokenizer metadata the fingerprint hashes, so a piece table fetched over HTTP would be lossy.
At start the server's model is checked against the declaration (vocabulary size, weight bytes, a probe
tokenized on both sides); a mismatch is one clear line.

Each sequence is a server slot (``id_slot``); the client keeps a mirror of the tokens the slot holds, and
every request sends token ids with ``cache_prompt: true`` so the server re-evaluates only what is new.
``step`` and every checked position are one ``/completion`` request with ``n_predict: 1`` and ``n_probs``;
:meth:`RemoteBackend.draft` asks for several greedy tokens, with their top-n, in one request. Distributions are
:class:`~edge_ensemble.dist.TopDist` (the server's pre-sampling softmax, temperature 0 on its side).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backends import ModelVocabulary, per_request
from .dist import Dist, TopDist
from .errors import BusyError, ContextOverflowError, EdgeEnsembleError, UsageError
from .gguf import check_gguf
from .runtime import LoadOptions, Model, common_prefix_len
from .sources.server import (SERVER_PREFIX, ServerSpec, declared_model, is_server_spec,  # (re-exported)
                             parse_server_spec)

DEFAULT_TIMEOUT = 60.0  # seconds one request may take (a long prompt's prefill on a slow box included)
RETRIES = 3  # further attempts after a connection that failed before an answer arrived
BACKOFF = 0.1  # seconds before the first retry; each next one waits 3x longer
_PROBE = "Hello world, 12 + 30 = 42. <|im_start|> ünïcödé"


class RemoteError(EdgeEnsembleError):
    """A llama-server member failed: unreachable, too slow, gone mid-answer, a bad answer, or another model."""


def server_timeout() -> float:
    """Per-request timeout in seconds: ``$EDGE_ENSEMBLE_SERVER_TIMEOUT`` or 60."""
    raw = os.environ.get("EDGE_ENSEMBLE_SERVER_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (0 < value < math.inf):
        raise UsageError(f"EDGE_ENSEMBLE_SERVER_TIMEOUT must be a number of seconds > 0; got {raw!r}")
    return value


class _Client:
    """One keep-alive HTTP connection to a server, with timeouts and retries for requests safe to repeat."""

    def __init__(self, spec: ServerSpec, timeout: float, latency: float = 0.0) -> None:
        self.spec = spec
        self.timeout = timeout
        self.latency = latency  # seconds slept per request: simulated network delay (benchmarks)
        self.requests = 0
        self.seconds = 0.0
        self._conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def call(self, method: str, path: str, body: dict | None = None, *, retry: bool = True,
             what: str = "") -> Any:
        """The decoded JSON answer of one request. Connection failures before an answer arrived are retried
        with backoff when ``retry`` (every request we send is safe to repeat: reads, tokenization, and greedy
        completions whose only side effect is the slot's cache); a timeout is never retried (the server may
        still be working on it). Anything else is a :class:`RemoteError`."""
        url = self.spec.url
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        attempts = 1 + (RETRIES if retry else 0)
        for attempt in range(attempts):
            t0 = time.perf_counter()
            if self.latency:
                time.sleep(self.latency)
            reused = self._conn is not None
            try:
                if self._conn is None:
                    self._conn = http.client.HTTPConnection(self.spec.host, self.spec.port, timeout=self.timeout)
                self._conn.request(method, path, body=payload, headers=headers)
                resp = self._conn.getresponse()
                raw = resp.read()
            except (socket.timeout, TimeoutError):
                self.close()
                raise RemoteError(f"llama-server {url} did not answer {path} within {self.timeout:g} s{what};"
                                  " raise EDGE_ENSEMBLE_SERVER_TIMEOUT or use a faster server") from None
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                self.close()
                if attempt + 1 < attempts:
                    if not (reused and attempt == 0):  # a kept-alive connection the server closed: at once
                        time.sleep(BACKOFF * 3 ** attempt)
                    continue
                reason = _reason(exc)
                raise RemoteError(f"llama-server {url} is unreachable ({reason}){what}; start it"
                                  f" (llama-server -m MODEL --port {self.spec.port}) or fix the address") from None
            finally:
                self.requests += 1
                self.seconds += time.perf_counter() - t0
            if resp.status == 503 and retry and attempt + 1 < attempts:  # still loading its model
                time.sleep(BACKOFF * 3 ** attempt)
                continue
            return self._decode(resp.status, raw, path, what)
        raise AssertionError("unreachable")

    def _decode(self, status: int, raw: bytes, path: str, what: str) -> Any:
        url = self.spec.url
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            head = raw[:60].decode("utf-8", "replace").replace("\n", " ")
            raise RemoteError(f"llama-server {url} sent a malformed answer to {path} (HTTP {status}, not JSON:"
                              f" {head!r}){what}; is it a llama-server?") from None
        if status != 200:
            err = data.get("error") if isinstance(data, dict) else None
            msg = err.get("message") if isinstance(err, dict) else err
            msg = " ".join(str(msg or raw[:120].decode("utf-8", "replace")).split())
            raise RemoteError(f"llama-server {url} refused {path} (HTTP {status}: {msg}){what}")
        return data


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError, http.client.IncompleteRead)):
        return "the connection closed before the answer was complete"
    return " ".join(str(exc).split()) or type(exc).__name__


def _field(data: Any, *keys: str | int) -> Any:
    """``data[k1][k2]...``, or None where the answer lacks it."""
    for key in keys:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def server_model_path(spec: ServerSpec, timeout: float | None = None) -> str:
    """The ``model_path`` a server reports (for a ``server:URL`` spec that declares no model)."""
    client = _Client(spec, timeout or server_timeout())
    try:
        path = _field(client.call("GET", "/props", what=" at start"), "model_path")
    finally:
        client.close()
    if not isinstance(path, str) or not path:
        raise RemoteError(f"llama-server {spec.url} does not report its model path; declare the model:"
                          f" server:{spec.url}=MODEL")
    if not os.path.isfile(path):
        raise RemoteError(f"llama-server {spec.url} serves {path}, which is not readable here; declare the model"
                          f" (a catalog name or a local copy of the GGUF): server:{spec.url}=MODEL")
    return path


class RemoteBackend(ModelVocabulary):
    """A :class:`~edge_ensemble.backends.Backend` whose model runs in a llama-server.

    ``vocab_path`` is a local copy of the served GGUF, opened vocab-only (tokenizer, template, fingerprint).
    ``n_probs``: how many top tokens each distribution carries (the union size; tokens outside have
    probability 0 here). ``latency``: seconds added to every request, to simulate a network (benchmarks).
    Vocabulary methods come from the vocab-only copy (:class:`~edge_ensemble.backends.ModelVocabulary`)."""

    def __init__(self, spec: ServerSpec | str, vocab_path: str | os.PathLike[str], *, n_probs: int = 10,
                 timeout: float | None = None, latency: float = 0.0, declared: str | None = None) -> None:
        self.spec = parse_server_spec(spec) if isinstance(spec, str) else spec
        self.n_probs = n_probs
        self.model = Model(vocab_path, LoadOptions(vocab_only=True))
        try:
            self._client = _Client(self.spec, timeout or server_timeout(), latency)
            self.name = self.model.name
            self.n_vocab = self.model.n_vocab
            self.token_bytes = self.model.token_bytes
            self.eog_ids = self.model.eog_ids
            self._check_server(declared or str(vocab_path))
        except BaseException:
            self.close()
            raise
        self._mirror: list[list[int]] = [[] for _ in range(self.n_slots)]  # tokens each slot holds
        # Slots whose server cache must not be reused: all of them at first (what another coordinator left there
        # would be evaluated in a different batch split, and llama.cpp's numerics follow the split), and after reset.
        self._cold: set[int] = set(range(self.n_slots))
        self._free = list(range(self.n_slots))
        self._started = False  # after the first generation request, failures are "mid-answer"

    # -- start-up check ------------------------------------------------------------------------------------

    def _check_server(self, declared: str) -> None:
        """Read the server's slots and context; refuse a server whose model is not the declared one."""
        url = self.spec.url
        props = self._client.call("GET", "/props", what=" at start")
        models = self._client.call("GET", "/v1/models", what=" at start")
        n_slots, n_ctx = _field(props, "total_slots"), _field(props, "default_generation_settings", "n_ctx")
        meta = _field(models, "data", 0, "meta")
        if not isinstance(n_slots, int) or not isinstance(n_ctx, int) or not isinstance(meta, dict):
            raise RemoteError(f"llama-server {url} answered /props or /v1/models without total_slots, n_ctx or"
                              " the model's meta; is it a llama-server of llama.cpp b4000 or later?")
        self.n_slots, self.n_ctx = max(1, n_slots), n_ctx
        served = Path(str(_field(props, "model_path") or "?")).name
        weights = _weight_bytes(self.model.path)
        probe = self.model.tokenize(_PROBE, add_bos=False, special=True)
        remote_probe = _field(self._client.call("POST", "/tokenize", {"content": _PROBE, "add_special": False,
                                                                      "parse_special": True}, what=" at start"),
                              "tokens")
        mismatch = []
        if meta.get("n_vocab") != self.n_vocab:
            mismatch.append(f"{meta.get('n_vocab')} tokens, not {self.n_vocab}")
        if meta.get("size") != weights:
            mismatch.append(f"{_mb(meta.get('size'))} of weights, not {_mb(weights)}")
        if not mismatch and remote_probe != probe:
            mismatch.append("it tokenizes text differently")
        if mismatch:
            raise RemoteError(f"llama-server {url} serves {served}, not the declared {declared} ({'; '.join(mismatch)});"
                              " point the member at the server of that model, or declare the model it serves")

    # -- sequences = server slots --------------------------------------------------------------------------

    def open_seq(self) -> int:
        if not self._free:
            raise BusyError(f"{self.name}: all {self.n_slots} slots of llama-server {self.spec.url} are in use"
                            " (start it with more -np)")
        seq = min(self._free)
        self._free.remove(seq)
        return seq

    def fork_seq(self, src: int) -> int:
        """A new slot that will hold ``src``'s tokens (the server prefills it on first use)."""
        seq = self.open_seq()
        self._mirror[seq] = list(self._mirror[src])
        self._cold.add(seq)
        return seq

    def close_seq(self, seq: int, *, keep_cache: bool = True) -> None:
        if not keep_cache:
            self._mirror[seq] = []
            self._cold.add(seq)
        if seq not in self._free:
            self._free.append(seq)

    def cached(self, seq: int) -> list[int]:
        return self._mirror[seq]

    def room(self, seq: int) -> int:
        return self.n_ctx - len(self._mirror[seq])

    def reset(self) -> None:
        """Forget every slot's cache: the next request of each pays for its whole prompt."""
        self._mirror = [[] for _ in range(self.n_slots)]
        self._cold = set(range(self.n_slots))

    def close(self) -> None:
        """Close the connection and the vocab-only model. Safe to call twice."""
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()
        self.model.close()

    # -- requests ------------------------------------------------------------------------------------------

    @property
    def latency(self) -> float:
        """Seconds slept before every request (simulated network delay; 0 = none)."""
        return self._client.latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        self._client.latency = seconds

    @property
    def requests(self) -> int:
        """Requests sent so far (every attempt counts)."""
        return self._client.requests

    @property
    def request_seconds(self) -> float:
        """Wall time spent in requests so far."""
        return self._client.seconds

    def _complete(self, seq: int, prompt: Sequence[int], n_predict: int, temperature: float,
                  n_probs: int | None = None) -> list[tuple[int, Dist]]:
        """One greedy ``/completion`` on slot ``seq``: per generated token, its id and the distribution it was
        drawn from. The mirror then holds ``prompt`` plus all generated tokens but the last."""
        if len(prompt) + n_predict > self.n_ctx:  # the engine ends the answer with finish_reason "length"
            raise ContextOverflowError(f"{self.name}: {len(prompt) + n_predict} tokens do not fit the {self.n_ctx}-token"
                              f" slot context of llama-server {self.spec.url}; start it with a larger -c")
        n_probs = self.n_probs if n_probs is None else n_probs
        body = {"prompt": list(prompt), "n_predict": n_predict, "n_probs": n_probs, "temperature": 0.0,
                "cache_prompt": seq not in self._cold, "id_slot": seq, "post_sampling_probs": False,
                "stream": False, "return_tokens": True}
        what = " mid-answer" if self._started else ""
        self._started = True
        data = self._client.call("POST", "/completion", body, what=what)
        self._cold.discard(seq)
        probs = _field(data, "completion_probabilities")
        tokens = _field(data, "tokens")
        if n_probs == 0:  # a prefill: only the slot's cache matters
            out = []
        elif not isinstance(probs, list) or not 1 <= len(probs) <= n_predict:
            raise RemoteError(f"llama-server {self.spec.url} sent a malformed answer to /completion (expected"
                              f" {n_predict} completion_probabilities, got {_describe(probs)}){what}")
        else:
            out = [self._dist(entry, temperature, what) for entry in probs]
            if len(out) < n_predict and not self.is_eog(out[-1][0]):  # only an end token stops a draft early
                raise RemoteError(f"llama-server {self.spec.url} stopped after {len(out)} of {n_predict} tokens"
                                  f" without an end token{what}; is a stop string or a time limit set on it?")
        generated = [t for t, _ in out] if out else (tokens if isinstance(tokens, list) else [])
        self._mirror[seq] = list(prompt) + [int(t) for t in generated[:-1]]
        return out

    def _dist(self, entry: Any, temperature: float, what: str) -> tuple[int, Dist]:
        try:
            tok = int(entry["id"])
            top = entry["top_logprobs"]
            ids = np.array([int(t["id"]) for t in top], dtype=np.int64)
            # A probability that underflowed to 0 has logprob -inf, which JSON writes as null.
            probs = np.exp(np.array([-np.inf if t["logprob"] is None else float(t["logprob"]) for t in top],
                                    dtype=np.float64))
            return tok, TopDist(ids, probs, self.n_vocab, temperature)
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteError(f"llama-server {self.spec.url} sent a malformed answer to /completion (a token"
                              f" entry without id or top_logprobs: {_reason(exc)}){what}") from None

    # -- decoding ------------------------------------------------------------------------------------------

    def feed(self, seq: int, target: Sequence[int], rows: Sequence[int], temperature: float) -> tuple[dict[int, Dist], int]:
        """One request per row (the server gives no probabilities for prompt tokens), ascending so each one
        re-evaluates only what the previous left uncached; with no rows, one request that prefills."""
        target = list(target)
        common = common_prefix_len(self._mirror[seq], target)
        start = min([common, *rows]) if rows else common
        if start == len(target) and not rows:
            return {}, 0
        out: dict[int, Dist] = {}
        for r in sorted(set(rows)):
            out[r] = self._complete(seq, target[: r + 1], 1, temperature)[0][1]
        if not rows:
            self._complete(seq, target, 1, temperature, n_probs=0)
        return out, len(target) - start if not rows else max(rows) + 1 - start

    def feed_many(self, requests: Sequence[tuple[int, Sequence[int], Sequence[int]]],
                  temperature: float | Sequence[float]) -> list[tuple[dict[int, Dist], int] | None]:
        temps = per_request(temperature, len(requests))
        return [None if len(target) >= self.n_ctx else self.feed(seq, target, rows, t)
                for (seq, target, rows), t in zip(requests, temps)]

    def step(self, seq: int, token: int, temperature: float) -> Dist:
        return self._complete(seq, self._mirror[seq] + [token], 1, temperature)[0][1]

    def draft(self, seq: int, target: Sequence[int], n: int, temperature: float) -> list[tuple[int, Dist]]:
        """Make ``seq`` hold ``target``, then let the server continue greedily for ``n`` tokens in ONE request:
        each generated token with the distribution it was drawn from (the first is the distribution after
        ``target``; fewer than ``n`` when it ends). A caller keeps a distribution only while its own picks equal
        the server's tokens. Afterwards ``seq`` holds ``target`` and every generated token but the last."""
        return self._complete(seq, target, n, temperature)


def _weight_bytes(path: Path) -> int:
    """Bytes of a GGUF's tensors, as llama-server reports its model's ``size``."""
    return sum(t.nbytes for t in check_gguf(path))


def _mb(n: Any) -> str:
    return f"{n / 1e6:.1f} MB" if isinstance(n, (int, float)) else repr(n)


def _describe(value: Any) -> str:
    return f"{len(value)}" if isinstance(value, list) else type(value).__name__
