"""The OpenAI-compatible server: a real uvicorn on a loopback port, driven by the official ``openai`` client
and by raw HTTP; raw completions through the API.

Most tests serve tiny generated models (fast, meaningless text); one serves the real SmolLM2-135M to show a
coherent answer.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Any, Iterator

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from edge_ensemble.api import Ensemble, EnsembleConfig  # noqa: E402
from edge_ensemble.server import ServerOptions, create_app  # noqa: E402

MODEL = "tiny-pair"
KEY = "s3cret-key"
HELLO = [{"role": "user", "content": "Tell me a story about the sea."}]


class Running:
    """A uvicorn server in a thread, on an ephemeral loopback port."""

    def __init__(self, app: Any) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, key: str | None = None, **kw: Any) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "unused", max_retries=0, timeout=60, **kw)

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict[str, str] | None = None, *, raw: bool = False) -> tuple[int, dict[str, str], Any]:
        """One request; the body parsed when it is JSON (``raw``: the bytes as they came)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            body = resp.read()
            data = json.loads(body) if not raw and resp.getheader("content-type", "").startswith("application/json") else body
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()

    def health(self) -> dict[str, Any]:
        status, _, data = self.request("GET", "/health")
        assert status == 200
        return data

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def tiny_ensemble(tiny_bpe, tiny_bpe_b, llama_quiet) -> Iterator[Ensemble]:
    with Ensemble([tiny_bpe, tiny_bpe_b], config=EnsembleConfig(n_ctx=1024, n_threads=1, check_memory=False)) as ens:
        yield ens


@pytest.fixture(scope="module")
def server(tiny_ensemble) -> Iterator[Running]:
    running = Running(create_app(tiny_ensemble, ServerOptions(model_id=MODEL, max_tokens=32, max_body_bytes=4096,
                                                               max_prompt_chars=2000)))
    yield running
    running.stop()


def _error(data: dict[str, Any]) -> dict[str, Any]:
    assert set(data) == {"error"}, data
    assert set(data["error"]) == {"message", "type", "param", "code"}, data
    assert "Traceback" not in data["error"]["message"]
    return data["error"]


# -- raw completions through the API ------------------------------------------------------------------------


def test_raw_prompt_tokens_follow_each_members_bos(tiny_spm, tiny_bpe, llama_quiet):
    import llama_cpp

    text = "Once upon a time"
    for path in (tiny_spm, tiny_bpe):  # <s> added by the SentencePiece GGUF; the BPE one asks for no BOS
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, vocab_only=True, verbose=False)
        want = len(llm.tokenize(text.encode(), add_bos=True))
        del llm
        with Ensemble([path], config=EnsembleConfig(n_ctx=256, n_threads=1, check_memory=False)) as ens:
            assert list(ens.complete(text, max_tokens=1).stats.prompt_tokens.values()) == [want]


def test_raw_completion_equals_llama_cpp_create_completion(tiny_spm, llama_quiet):
    import llama_cpp

    prompt = "The quick brown fox"
    llm = llama_cpp.Llama(model_path=str(tiny_spm), n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
    want = llm.create_completion(prompt, max_tokens=24, temperature=0.0)["choices"][0]["text"]
    del llm
    for policy in ("single", "safe"):
        with Ensemble([tiny_spm], config=EnsembleConfig(n_ctx=256, n_threads=1, policy=policy,
                                                         check_memory=False)) as ens:
            result = ens.complete(prompt, max_tokens=24)
            streamed = "".join(e.text for e in ens.stream(raw=prompt, max_tokens=24))
        assert result.text == want, policy
        assert streamed == want


def test_raw_and_chat_prompts_differ_and_raw_refuses_a_system(tiny_ensemble):
    chat = tiny_ensemble.generate(messages=HELLO, max_tokens=8)
    raw = tiny_ensemble.complete(HELLO[0]["content"], max_tokens=8)
    assert chat.stats.prompt_tokens != raw.stats.prompt_tokens  # the template's markup is not there
    from edge_ensemble.errors import UsageError

    with pytest.raises(UsageError, match="raw"):
        tiny_ensemble.stream(raw="x", system="be nice")
    with pytest.raises(UsageError, match="empty"):
        tiny_ensemble.complete("")


# -- the openai client --------------------------------------------------------------------------------------


def test_models_and_health(server):
    client = server.client()
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = server.health()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_chat_non_streaming_equals_the_api(server, tiny_ensemble):
    client = server.client()
    resp = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20, temperature=0)
    want = tiny_ensemble.generate(messages=HELLO, max_tokens=20)
    assert resp.choices[0].message.content == want.text
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason == want.finish_reason
    assert resp.usage.completion_tokens == want.stats.tokens
    assert resp.usage.prompt_tokens == next(iter(want.stats.prompt_tokens.values()))
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    ext = resp.model_extra["edge_ensemble"]
    assert ext["stats"]["policy"] == "safe" and ext["stats"]["tokens"] == want.stats.tokens
    assert ext["timed_out"] is False


def test_chat_streaming_with_usage(server, tiny_ensemble):
    client = server.client()
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tiny_ensemble.generate(messages=HELLO, max_tokens=20).text
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["edge_ensemble"]["stats"]["tokens"] > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == finals[0].model_extra[
        "edge_ensemble"]["stats"]["tokens"]


def test_stream_ends_with_done(server):
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 5, "stream": True})
    status, headers, raw = server.request("POST", "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_completions_raw_streaming_and_not(server, tiny_ensemble):
    client = server.client()
    prompt = "Once upon a time"
    want = tiny_ensemble.complete(prompt, max_tokens=16)
    resp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16)
    assert resp.object == "text_completion"
    assert resp.choices[0].text == want.text
    assert resp.usage.completion_tokens == want.stats.tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, stream=True))
    assert streamed == want.text


def test_stop_strings(server, tiny_ensemble):
    client = server.client()
    full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24).choices[0].text
    assert len(full) > 6
    stop = full[3:6]
    cut = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=24, stop=stop, stream=True) if c.choices)
    assert stop not in streamed


def test_extension_object_sets_the_policy(server, tiny_ensemble):
    client = server.client()
    resp = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10,
                                          extra_body={"edge_ensemble": {"policy": "every-token", "gate": "off"}})
    stats = resp.model_extra["edge_ensemble"]["stats"]
    assert stats["policy"] == "every-token" and stats["ensembled_tokens"] == stats["tokens"]
    want = tiny_ensemble.generate(messages=HELLO, max_tokens=10, policy="every-token")
    assert resp.choices[0].message.content == want.text


def test_time_limit_ends_with_length(server):
    client = server.client()
    resp = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=400,
                                          extra_body={"edge_ensemble": {"time_limit": 0.001}})
    assert resp.choices[0].finish_reason == "length"
    assert resp.model_extra["edge_ensemble"]["timed_out"] is True


def test_client_errors_are_openai_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, n=ServerOptions().max_n + 1)
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError, match="tool calls"):
        client.chat.completions.create(model=MODEL, messages=HELLO, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model=MODEL, prompt="x", logprobs=2,  # a policy without them
                                  extra_body={"edge_ensemble": {"policy": "every-token"}})
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=9)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 3000}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:  # streaming: the error comes before the stream starts
        client.chat.completions.create(model=MODEL, messages=HELLO, stream=True,
                                       extra_body={"edge_ensemble": {"draft_len": 0}})
    assert e.value.param == "edge_ensemble.draft_len"
    # and the server goes on serving
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3).choices[0].message.content


def test_context_overflow_is_a_400(tiny_ensemble):
    running = Running(create_app(tiny_ensemble, ServerOptions(model_id=MODEL)))
    try:
        status, _, data = running.request("POST", "/v1/completions", json.dumps(
            {"model": MODEL, "prompt": "word " * 3000, "stream": True}))
        assert status == 400 and _error(data)["code"] == "context_length_exceeded"
    finally:
        running.stop()


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b"NaN", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": MODEL}), 400, "messages"),
    (json.dumps({"messages": HELLO}), 400, "model"),
    (json.dumps({"model": MODEL, "messages": "hi"}), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": 5}]}), 400, "messages[0].content"),
    (json.dumps({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}), 400, "messages[0].role"),
    (json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": "ten"}), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 0}), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "messages": HELLO, "stream": "yes"}), 400, "stream"),
    (json.dumps({"model": MODEL, "messages": HELLO, "temperature": True}), 400, "temperature"),
    (json.dumps({"model": MODEL, "messages": HELLO, "stop": [1]}), 400, "stop"),
    (json.dumps({"model": MODEL, "messages": HELLO, "frobnicate": 1}), 400, "frobnicate"),
    (json.dumps({"model": MODEL, "messages": HELLO, "edge_ensemble": {"nope": 1}}), 400, "edge_ensemble"),
    (json.dumps({"model": MODEL, "messages": HELLO, "edge_ensemble": {"policy": "magic"}}), 400,
     "edge_ensemble.policy"),
    (json.dumps({"model": MODEL, "messages": HELLO, "edge_ensemble": {"policy": "route", "head": "/etc/passwd"}}),
     400, "edge_ensemble.head"),  # a request may not make the server open a file
    (json.dumps({"model": MODEL, "messages": HELLO, "edge_ensemble": {"policy": "eager"}}), 400,
     "edge_ensemble.policy"),  # its contexts would need a sequence per branch: a server started with --policy eager
    (json.dumps({"model": MODEL, "messages": HELLO, "edge_ensemble": {"policy": "route"}}), 400,
     "edge_ensemble.policy"),
    (json.dumps({"model": MODEL, "messages": HELLO, "edge_ensemble": {"draft_len": 0}}), 400,
     "edge_ensemble.draft_len"),
    (json.dumps({"model": MODEL, "messages": HELLO, "edge_ensemble": {"union_k": 0}}), 400,
     "edge_ensemble.union_k"),
    (json.dumps({"model": "other", "messages": HELLO}), 404, "model"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}), 413, None),
])
def test_malformed_requests(server, body, status, param):
    got, headers, data = server.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    assert got == status, data
    assert headers["content-type"] == "application/json"
    assert _error(data)["param"] == param
    assert server.health()["status"] == "ok"


def test_completions_prompt_errors(server):
    for prompt, code in (([1, 2, 3], "unsupported_parameter"), (["a", "b"], "unsupported_parameter"),
                         ("", "invalid_value"), (None, "missing_required_parameter")):
        status, _, data = server.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": prompt}))
        assert status == 400 and _error(data)["code"] == code, (prompt, data)


def test_unknown_route_and_method(server):
    status, _, data = server.request("GET", "/v1/nothing")
    assert status == 404 and _error(data)["code"] == "not_found"
    status, _, data = server.request("GET", "/v1/chat/completions")
    assert status == 405 and _error(data)["code"] == "method_not_allowed"


def test_api_key(tiny_ensemble):
    running = Running(create_app(tiny_ensemble, ServerOptions(model_id=MODEL, api_key=KEY, max_tokens=4)))
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            running.client().chat.completions.create(model=MODEL, messages=HELLO)
        assert e.value.code == "invalid_api_key"
        status, headers, data = running.request("GET", "/v1/models")  # no header at all
        assert status == 401 and headers["www-authenticate"] == "Bearer" and _error(data)["code"] == "invalid_api_key"
        assert running.health()["status"] == "ok"  # /health needs no key
        resp = running.client(KEY).chat.completions.create(model=MODEL, messages=HELLO)
        assert resp.choices[0].message.content is not None
    finally:
        running.stop()


# -- the queue, disconnects ---------------------------------------------------------------------------------


def _post_in_thread(running: Running, body: dict[str, Any], out: list) -> threading.Thread:
    t = threading.Thread(target=lambda: out.append(running.request("POST", "/v1/chat/completions",
                                                                   json.dumps(body))), daemon=True)
    t.start()
    return t


def _wait_for(predicate, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_concurrent_greedy_answers_equal_the_api_one_after_another(server, tiny_ensemble):
    prompts = [f"Tell me about the number {i}." for i in range(4)]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        client = server.client()
        if i % 2:
            answers[i] = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=16).choices[0].text
        else:
            answers[i] = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompts[i]}], max_tokens=16, stream=True))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, prompt in enumerate(prompts):
        want = (tiny_ensemble.complete(prompt, max_tokens=16) if i % 2 else
                tiny_ensemble.generate(messages=[{"role": "user", "content": prompt}], max_tokens=16))
        assert answers[i] == want.text, i


def test_full_queue_answers_429_with_retry_after(tiny_ensemble):
    running = Running(create_app(tiny_ensemble, ServerOptions(model_id=MODEL, max_queue=1, max_tokens=4)))
    try:
        held = tiny_ensemble.stream(messages=HELLO, max_tokens=50)
        next(held)  # this thread holds the ensemble: the server's answers must wait for it
        first: list = []
        second: list = []
        t1 = _post_in_thread(running, {"model": MODEL, "messages": HELLO}, first)
        _wait_for(lambda: running.health()["running"])
        t2 = _post_in_thread(running, {"model": MODEL, "messages": HELLO}, second)
        _wait_for(lambda: running.health()["queued"] == 1)
        status, headers, data = running.request("POST", "/v1/chat/completions",
                                                json.dumps({"model": MODEL, "messages": HELLO}))
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert _error(data)["type"] == "rate_limit_error" and _error(data)["code"] == "queue_full"
        held.close()  # both waiting requests are then answered, in order
        t1.join(30), t2.join(30)
        assert first[0][0] == 200 and second[0][0] == 200
    finally:
        running.stop()


def test_disconnecting_clients_free_the_server(tiny_ensemble):
    running = Running(create_app(tiny_ensemble, ServerOptions(model_id=MODEL, max_tokens=4)))
    try:
        # A streaming client that reads one chunk and leaves.
        held = tiny_ensemble.stream(messages=HELLO, max_tokens=50)
        next(held)
        sock = socket.create_connection(("127.0.0.1", running.port))
        body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 100000, "stream": True}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        _wait_for(lambda: running.health()["running"])
        held.close()
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.close()
        _wait_for(lambda: not running.health()["running"])
        assert running.health()["cancelled"] == 1
        # A non-streaming client that leaves while it waits in the queue.
        held = tiny_ensemble.stream(messages=HELLO, max_tokens=50)
        next(held)
        sock = socket.create_connection(("127.0.0.1", running.port))
        body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 100000}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        _wait_for(lambda: running.health()["running"])
        sock.close()
        time.sleep(0.6)  # the server notices within its 0.25 s poll
        held.close()
        _wait_for(lambda: not running.health()["running"])
        assert running.health()["cancelled"] == 2
        # The next request is served normally.
        resp = running.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5)
        assert resp.choices[0].finish_reason in ("stop", "length")
        assert running.health()["served"] == 1
    finally:
        running.stop()


# -- parallel answers: lanes of one context, interleaved ------------------------------------------------------

PARALLEL = 3


@pytest.fixture(scope="module")
def parallel_ensemble(tiny_bpe, tiny_bpe_b, llama_quiet) -> Iterator[Ensemble]:
    with Ensemble([tiny_bpe, tiny_bpe_b], config=EnsembleConfig(n_ctx=512, n_threads=1, parallel=PARALLEL,
                                                                 check_memory=False)) as ens:
        yield ens


def _all_sequences_free(ensemble: Ensemble) -> bool:
    return all(sorted(m.backend._free) == list(range(m.model.options.n_seq_max)) for m in ensemble._members)


def test_one_thread_streams_up_to_parallel_answers_each_as_alone(parallel_ensemble, tiny_ensemble):
    from edge_ensemble.errors import BusyError

    assert parallel_ensemble._members[0].model.options.n_seq_max == PARALLEL
    prompts = [f"Tell me about the number {i}." for i in range(PARALLEL)]
    streams = [parallel_ensemble.stream(p, max_tokens=16) for p in prompts]
    texts = ["" for _ in prompts]
    live = set(range(PARALLEL))
    while live:  # round-robin, one event each, all in this thread
        for i in sorted(live):
            event = next(streams[i], None)
            if event is None:
                live.discard(i)
            else:
                texts[i] += event.text
    for prompt, text in zip(prompts, texts):
        assert text == tiny_ensemble.generate(prompt, max_tokens=16).text
    assert _all_sequences_free(parallel_ensemble)
    held = [parallel_ensemble.stream(p, max_tokens=16) for p in prompts]
    for s in held:
        next(s)
    with pytest.raises(BusyError, match=f"already streaming {PARALLEL} answers"):
        next(parallel_ensemble.stream("one more", max_tokens=4))
    late: list[str] = []  # another thread waits until every stream of this one is closed
    waiter = threading.Thread(target=lambda: late.append(parallel_ensemble.generate(prompts[0], max_tokens=16).text))
    waiter.start()
    held[0].close(), held[1].close()
    time.sleep(0.3)
    assert waiter.is_alive() and not late
    held[2].close()
    waiter.join(30)
    assert late == [texts[0]]
    assert _all_sequences_free(parallel_ensemble)


@pytest.fixture(scope="module", params=[True, False], ids=["batched", "interleaved"])
def parallel_server(request, parallel_ensemble) -> Iterator[Running]:
    """The parallel answers decoded together (one llama_decode per round), or interleaved one step each."""
    running = Running(create_app(parallel_ensemble, ServerOptions(model_id=MODEL, max_tokens=32, batch=request.param)))
    running.batch = request.param
    yield running
    running.stop()


def test_parallel_greedy_answers_equal_each_request_alone(parallel_server, tiny_ensemble):
    n = PARALLEL + 1  # one more than the lanes: it waits in the queue, then takes a freed lane
    prompts = [f"Tell me about the number {i}." for i in range(n)]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        client = parallel_server.client()
        if i % 3 == 1:
            answers[i] = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=24).choices[0].text
        elif i % 3 == 2:
            answers[i] = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompts[i]}],
                                                        max_tokens=24).choices[0].message.content
        else:
            answers[i] = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompts[i]}], max_tokens=24, stream=True))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, prompt in enumerate(prompts):
        want = (tiny_ensemble.complete(prompt, max_tokens=24) if i % 3 == 1 else
                tiny_ensemble.generate(messages=[{"role": "user", "content": prompt}], max_tokens=24))
        assert answers[i] == want.text, i
    health = parallel_server.health()
    assert health["parallel"] == PARALLEL and health["running"] == 0
    if parallel_server.batch:
        # The answers' decodes really were batched: some llama_decode served more than one answer. How many share
        # a decode depends on when the clients' requests arrive (CI saw 1.49 per decode), so the exact ratio is
        # asserted where it is deterministic, in test_rounds.py.
        assert health["batched"]["answers_served"] > health["batched"]["llama_decodes"], health
    else:
        assert "batched" not in health


def test_two_streams_are_interleaved(parallel_server, parallel_ensemble):
    times: dict[int, list[float]] = {0: [], 1: []}
    held = parallel_ensemble.stream(messages=HELLO, max_tokens=50)
    next(held)  # hold the ensemble from this thread until both requests have arrived

    def ask(i: int) -> None:
        for chunk in parallel_server.client().chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Story number {i}."}], max_tokens=64, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                times[i].append(time.monotonic())

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    threads[0].start()
    _wait_for(lambda: parallel_server.health()["running"] == 1)
    threads[1].start()
    # Both requests are in (interleaved: the second queued behind the worker, which waits for the ensemble;
    # batched: both admitted, their threads waiting).
    _wait_for(lambda: (lambda h: h["running"] + h["queued"] == 2)(parallel_server.health()))
    held.close()
    for t in threads:
        t.join(60)
    assert len(times[0]) > 4 and len(times[1]) > 4
    # Both have produced output before either finished.
    assert times[0][0] < times[1][-1] and times[1][0] < times[0][-1], times


def test_a_disconnect_mid_stream_frees_its_lane(parallel_server, parallel_ensemble, tiny_ensemble):
    before = parallel_server.health()
    sock = socket.create_connection(("127.0.0.1", parallel_server.port))
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 100000, "stream": True}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    assert parallel_server.health()["running"] == 1
    sock.close()
    _wait_for(lambda: parallel_server.health()["running"] == 0)
    assert parallel_server.health()["cancelled"] == before["cancelled"] + 1
    assert _all_sequences_free(parallel_ensemble)
    resp = parallel_server.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=20)
    assert resp.choices[0].message.content == tiny_ensemble.generate(messages=HELLO, max_tokens=20).text
    assert _all_sequences_free(parallel_ensemble)


# -- a real model ---------------------------------------------------------------------------------------------


@pytest.mark.real
def test_real_model_answers_coherently(real_models, llama_quiet):
    path = real_models("smollm2-135m-instruct")
    with Ensemble([path], config=EnsembleConfig(n_ctx=512, n_threads=1, check_memory=False)) as ens:
        running = Running(create_app(ens, ServerOptions(model_id="smollm2")))
        try:
            client = running.client()
            resp = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "Name the capital city of France in one word."}],
                max_tokens=24, temperature=0)
            assert "Paris" in resp.choices[0].message.content
            text = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                                             temperature=0).choices[0].text
            assert "Paris" in text
        finally:
            running.stop()


# -- the command line ---------------------------------------------------------------------------------------


def test_run_raw_prints_the_completion(tiny_bpe, tiny_bpe_b, tiny_ensemble):
    from click.testing import CliRunner

    from edge_ensemble.cli import cli

    args = ["run", "--raw", "-m", str(tiny_bpe), "-m", str(tiny_bpe_b), "--n-ctx", "1024", "--threads", "1",
            "--max-tokens", "12", "Once upon a time"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(tiny_ensemble.complete("Once upon a time", max_tokens=12).text)
    refused = CliRunner().invoke(cli, [*args[:-1], "-s", "be brief", "Once"])
    assert refused.exit_code == 2 and "--raw takes no system prompt" in refused.output


def test_serve_refuses_a_busy_port_before_loading(tiny_bpe):
    from click.testing import CliRunner

    from edge_ensemble.cli import cli

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = CliRunner().invoke(cli, ["serve", "-m", str(tiny_bpe), "--port", str(busy.getsockname()[1])])
    assert result.exit_code == 2
    assert result.output.startswith("error: cannot listen on 127.0.0.1:") and result.output.count("\n") == 1


def test_binding_beyond_loopback_without_a_key_warns():
    from edge_ensemble.errors import EdgeEnsembleWarning
    from edge_ensemble.server import check_bind

    with pytest.warns(EdgeEnsembleWarning, match="without --api-key"):
        check_bind("0.0.0.0", None)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_bind("0.0.0.0", "key")
        check_bind("127.0.0.1", None)


def test_edge_ensemble_serve_command(tiny_bpe, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as probe:  # a free port (released just before the server takes it)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "EDGE_ENSEMBLE_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "edge_ensemble.cli", "serve", "-m", str(tiny_bpe), "--threads", "1",
                             "--n-ctx", "512", "--port", str(port), "--max-tokens", "6"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        running = Running.__new__(Running)  # only its HTTP helpers: the server is the subprocess
        running.port, running.url = port, f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if running.health()["status"] == "ok":
                    break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
                time.sleep(0.1)
        assert [m.id for m in running.client(KEY).models.list()] == ["tiny-bpe"]  # the member's name
        resp = running.client(KEY).completions.create(model="tiny-bpe", prompt="Once upon")
        assert resp.usage.completion_tokens <= 6
        with pytest.raises(openai.AuthenticationError):
            running.client("wrong").models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err  # interrupted, as the CLI reports Ctrl-C; the shutdown itself was clean
    assert "Application shutdown complete" in err
    assert f"serving 'tiny-bpe' on http://127.0.0.1:{port}/v1" in err and "Traceback" not in err


def test_an_eager_server_answers_eager_requests_up_to_its_own_max_branches(tiny_bpe, llama_quiet):
    config = EnsembleConfig(n_ctx=512, n_threads=1, check_memory=False, policy="eager", max_branches=2)
    with Ensemble([tiny_bpe], config=config) as ens:
        running = Running(create_app(ens, ServerOptions(model_id=MODEL, max_tokens=8)))
        try:
            body = {"model": MODEL, "messages": HELLO, "edge_ensemble": {"max_branches": 2, "threshold": 0.0}}
            status, _, data = running.request("POST", "/v1/chat/completions", json.dumps(body))
            assert status == 200 and data["edge_ensemble"]["stats"]["policy"] == "eager", data
            body["edge_ensemble"]["max_branches"] = 3
            status, _, data = running.request("POST", "/v1/chat/completions", json.dumps(body))
            assert status == 400 and _error(data)["param"] == "edge_ensemble.max_branches", data
            assert "--max-branches 2" in _error(data)["message"]
        finally:
            running.stop()
