"""The provenance extension of the server (``"edge_ensemble": {"provenance": true}``, the web page's view) and the
page's files: tiny generated models on a real loopback server, raw HTTP.

What a client without the extension sees is checked byte for byte in test_server_bytes.py; here, that turning it
on adds the ``edge_ensemble`` objects and changes nothing else.
"""

from __future__ import annotations

import json
import socket
from typing import Any, Iterator

import pytest

pytest.importorskip("uvicorn")

from edge_ensemble.api import Ensemble, EnsembleConfig  # noqa: E402
from edge_ensemble.engine import Event  # noqa: E402
from edge_ensemble.policies import Piece, TokenLogprob  # noqa: E402
from edge_ensemble.server import ServerOptions, create_app  # noqa: E402
from edge_ensemble.server.provenance import Provenance  # noqa: E402
from test_server import HELLO, KEY, MODEL, Running, _all_sequences_free, _error, _wait_for  # noqa: E402

EVERY_TOKEN = "every-token"  # (a built-in policy's name, as a request names it)


@pytest.fixture(scope="module")
def pair(tiny_bpe, tiny_bpe_b, llama_quiet) -> Iterator[Ensemble]:
    with Ensemble([tiny_bpe, tiny_bpe_b], config=EnsembleConfig(n_ctx=1024, n_threads=1, check_memory=False)) as ens:
        yield ens


@pytest.fixture(scope="module")
def server(pair) -> Iterator[Running]:
    running = Running(create_app(pair, ServerOptions(model_id=MODEL, max_tokens=24)))
    yield running
    running.stop()


def chunks(running: Running, body: dict[str, Any], path: str = "/v1/chat/completions") -> list[dict[str, Any]]:
    status, _, raw = running.request("POST", path, json.dumps({"model": MODEL, "stream": True, **body}), raw=True)
    assert status == 200, raw
    events = [e[len("data: "):] for e in raw.decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def without_extension(chunk: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in chunk.items() if k not in ("edge_ensemble", "id", "created")}


def test_every_chunk_names_who_wrote_its_tokens_and_the_rest_is_unchanged(server, pair):
    names = [m.name for m in pair.members]
    body = {"messages": HELLO, "max_tokens": 20, "edge_ensemble": {"policy": EVERY_TOKEN}}
    off = chunks(server, body)
    on = chunks(server, {**body, "edge_ensemble": {"policy": EVERY_TOKEN, "provenance": True}})
    assert [without_extension(c) for c in on] == [without_extension(c) for c in off]
    overrides = 0
    for chunk in on[1:]:  # (the first: the role; the last: the finish, the figures and an ensembled end)
        tokens = chunk["edge_ensemble"]["tokens"]
        assert "".join(t["text"] for t in tokens) == (chunk["choices"][0]["delta"].get("content") or "")
        for t in tokens:
            assert t["member"] in names and t["kind"] == "ensemble"
            if "override" in t:
                overrides += 1
                assert t["override"]["drafted"] != t["text"] or t["override"]["ended"]
    final = on[-1]["edge_ensemble"]
    assert overrides == final["stats"]["overridden_tokens"] > 0
    assert "".join(s["text"] for s in final["provenance"]) == "".join(
        c["choices"][0]["delta"].get("content") or "" for c in on)
    assert "branches" not in final  # not a branching policy
    assert set(off[-1]["edge_ensemble"]) < set(final)


def test_a_scoring_policy_sends_candidates_that_stay_out_of_openai_logprobs(server):
    on = chunks(server, {"messages": HELLO, "max_tokens": 12, "edge_ensemble": {"provenance": True}})
    tokens = [t for c in on[1:-1] for t in c["edge_ensemble"]["tokens"]]
    assert tokens and all(c["choices"][0]["logprobs"] is None for c in on)  # not asked: not shown
    for t in tokens:
        if t.get("end"):  # the ensemble's choice to end: no text, nothing scored
            assert t["text"] == "" and t["kind"] == "ensemble"
            continue
        assert len(t["top"]) == 5 and t["logprob"] <= 0
        assert t["top"][0][1] >= t["logprob"]  # the likeliest candidate first
    # asked by the client too: OpenAI's fields hold exactly what they hold without the extension
    asked = {"messages": HELLO, "max_tokens": 12, "logprobs": True, "top_logprobs": 2}
    off = chunks(server, asked)
    on = chunks(server, {**asked, "edge_ensemble": {"provenance": True}})
    assert [without_extension(c) for c in on] == [without_extension(c) for c in off]
    assert all(len(t["top"]) == 2 for c in on[1:-1] for t in c["edge_ensemble"]["tokens"] if not t.get("end"))


def test_held_back_text_keeps_its_writers(server, pair):
    # a stop string holds text back until it cannot be the stop's start: a chunk's tokens are still its text
    full = pair.generate(messages=HELLO, max_tokens=20, policy=EVERY_TOKEN).text
    stop = full[8:11]
    on = chunks(server, {"messages": HELLO, "max_tokens": 20, "stop": [stop, "zzzz"],
                         "edge_ensemble": {"policy": EVERY_TOKEN, "provenance": True}})
    text = ""
    for chunk in on[1:-1]:
        assert "".join(t["text"] for t in chunk["edge_ensemble"]["tokens"]) == chunk["choices"][0]["delta"]["content"]
        text += chunk["choices"][0]["delta"]["content"]
    assert text == full[: full.index(stop)]


def test_completions_and_whole_answers_carry_it_too(server):
    on = chunks(server, {"prompt": "Once upon a time", "max_tokens": 10, "edge_ensemble": {"provenance": True}},
                "/v1/completions")
    assert all("".join(t["text"] for t in c["edge_ensemble"]["tokens"]) == c["choices"][0]["text"] for c in on[:-1])
    status, _, data = server.request("POST", "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": HELLO, "max_tokens": 10, "edge_ensemble": {"provenance": True}}))
    assert status == 200 and data["choices"][0]["logprobs"] is None
    spans = data["edge_ensemble"]["provenance"]
    assert "".join(s["text"] for s in spans) == data["choices"][0]["message"]["content"]


def test_a_wrong_value_is_a_400(server):
    status, _, data = server.request("POST", "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": HELLO, "edge_ensemble": {"provenance": "yes"}}))
    assert status == 400 and _error(data)["param"] == "edge_ensemble.provenance"


def test_a_branching_answer_ends_with_every_branch(tiny_bpe, llama_quiet):
    config = EnsembleConfig(n_ctx=512, n_threads=1, check_memory=False, policy="eager", max_branches=3)
    with Ensemble([tiny_bpe], config=config) as ens:
        running = Running(create_app(ens, ServerOptions(model_id=MODEL, max_tokens=8)))
        try:
            on = chunks(running, {"messages": HELLO, "temperature": 0.9, "seed": 3, "edge_ensemble": {
                "provenance": True, "initial_branches": 3, "threshold": "off"}})
        finally:
            running.stop()
    final = on[-1]["edge_ensemble"]
    branches = final["branches"]
    assert len(branches) == final["stats"]["branches"] == 3
    assert [b["chosen"] for b in branches].count(True) == 1
    chosen = next(b for b in branches if b["chosen"])
    assert chosen["text"] == "".join(c["choices"][0]["delta"].get("content") or "" for c in on)
    assert {"index", "text", "answer", "votes", "mean_logprob", "origin", "parent"} <= set(chosen)


def test_a_disconnect_mid_answer_frees_its_sequences(server, pair):
    # the page's request (provenance on) and a client that leaves after the first tokens
    before = server.health()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    body = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 100000, "stream": True,
                       "edge_ensemble": {"provenance": True, "time_limit": 120}}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while got.count(b"\"tokens\"") < 2:  # some tokens have been written
        got += sock.recv(65536)
    assert got.startswith(b"HTTP/1.1 200") and server.health()["running"] == 1
    sock.close()
    _wait_for(lambda: server.health()["running"] == 0)
    assert server.health()["cancelled"] == before["cancelled"] + 1
    assert _all_sequences_free(pair)
    # the next request is served as if nothing happened
    on = chunks(server, {"messages": HELLO, "max_tokens": 6, "edge_ensemble": {"provenance": True}})
    assert on[-1]["choices"][0]["finish_reason"] in ("stop", "length") and _all_sequences_free(pair)


def test_the_page_is_served_without_the_key_and_its_calls_need_it(pair):
    running = Running(create_app(pair, ServerOptions(model_id=MODEL, api_key=KEY)))
    try:
        status, headers, html = running.request("GET", "/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        for src in (b'src="/static/page.js"', b'href="/static/page.css"'):
            assert src in html
        assert b"http://" not in html and b"https://" not in html  # nothing from elsewhere: it works offline
        for path, media in (("/static/page.js", "text/javascript"), ("/static/page.css", "text/css")):
            status, headers, data = running.request("GET", path)
            assert status == 200 and headers["content-type"].startswith(media) and data
            assert b"http://" not in data and b"https://" not in data
        assert running.request("GET", "/static/secret.py")[0] == 404
        assert running.request("GET", "/v1/edge_ensemble")[0] == 401
        status, _, info = running.request("GET", "/v1/edge_ensemble", headers={"Authorization": f"Bearer {KEY}"})
        assert status == 200 and [m["name"] for m in info["members"]] == [m.name for m in pair.members]
        names = [p["name"] for p in info["policies"]]
        assert info["policy"] in names and EVERY_TOKEN in names
        assert all(not p["branches"] for p in info["policies"])  # eager needs a server loaded for its branches
    finally:
        running.stop()


def test_tokens_are_matched_to_the_printed_characters():
    # "é" is two bytes split over two tokens of different members; "!" comes in the next event
    a, b = Piece(b"ab\xc3", "draft"), Piece(b"\xa9!", "ensemble", "v", drafted=b"x",
                                               logprob=TokenLogprob(b"\xa9!", -0.5, ((b"\xa9!", -0.5),)))
    prov = Provenance("d")
    first = prov.tokens(Event("ab", "draft", pieces=[a, b]))
    assert first == [{"text": "ab", "member": "d", "kind": "draft"}]
    second = prov.tokens(Event("é!", "ensemble", "v"))
    assert second[0] == {"text": "é", "member": "d", "kind": "draft"}  # the character is the token that starts it
    assert second[1]["text"] == "!" and second[1]["member"] == "v" and second[1]["override"]["drafted"] == "x"
    assert prov.tokens(Event("tail", "draft")) == [{"text": "tail", "member": "d", "kind": "draft"}]
    # "€" in three one-byte tokens: the two inside it are tokens with empty text (the override is not lost)
    pieces = [Piece(b"\xe2", "draft"), Piece(b"\x82", "ensemble", "v", drafted=b"y"), Piece(b"\xac", "draft")]
    got = Provenance("d").tokens(Event("€", "draft", pieces=pieces))
    assert [t["text"] for t in got] == ["€", "", ""] and got[1]["override"]["drafted"] == "y"
    # the ensemble's choice to end: an empty token with the override
    ended = Provenance("d").tokens(Event("", "done", pieces=[Piece(b"", "ensemble", "v", end=True, drafted=b"z")]))
    assert ended == [{"text": "", "member": "v", "kind": "ensemble", "end": True,
                      "override": {"drafted": "z", "ended": False}}]
