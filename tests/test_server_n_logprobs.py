"""The server's ``n`` (several choices, each its own seed) and ``logprobs`` / ``top_logprobs``, through the official
``openai`` client against a real uvicorn on a loopback port; log-probabilities checked against llama-cpp-python's
for the same model and prompt."""

from __future__ import annotations

import json
from typing import Any, Iterator

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from edge_ensemble.api import Ensemble, EnsembleConfig  # noqa: E402
from edge_ensemble.engine import close_lanes, open_lanes  # noqa: E402
from edge_ensemble.policies.base import token_logprob  # noqa: E402
from edge_ensemble.policies import BASELINE_POLICY, DEFAULT_POLICY, registry  # noqa: E402
from edge_ensemble.server import ServerOptions, create_app  # noqa: E402

from test_server import Running  # noqa: E402

MODEL = "tiny"
HELLO = [{"role": "user", "content": "Tell me a story about the sea."}]
LANES = 4


@pytest.fixture(scope="module")
def pair(tiny_bpe, tiny_bpe_b, llama_quiet) -> Iterator[Ensemble]:
    """Two members, the default (ensembling) policy, four lanes decoded together."""
    with Ensemble([tiny_bpe, tiny_bpe_b], config=EnsembleConfig(n_ctx=512, n_threads=1, parallel=LANES,
                                                                 check_memory=False)) as ens:
        yield ens


@pytest.fixture(scope="module")
def server(pair) -> Iterator[Running]:
    running = Running(create_app(pair, ServerOptions(model_id=MODEL, max_tokens=24, max_n=6, max_queue=2)))
    yield running
    running.stop()


# -- n ----------------------------------------------------------------------------------------------------------


def test_n_sampled_choices_equal_single_requests_with_the_reported_seeds(server):
    client = server.client()
    for kind in ("chat", "completion"):
        ask = (lambda **kw: client.chat.completions.create(model=MODEL, messages=HELLO, **kw)) if kind == "chat" else (
            lambda **kw: client.completions.create(model=MODEL, prompt="Once upon a time", **kw))
        text = (lambda c: c.message.content) if kind == "chat" else (lambda c: c.text)
        resp = ask(n=4, temperature=1.0, max_tokens=16)  # no seed: the server draws four and reports them
        assert [c.index for c in resp.choices] == [0, 1, 2, 3]
        ext = resp.model_extra["edge_ensemble"]
        seeds = ext["seeds"]
        assert len(seeds) == 4 and len(set(seeds)) == 4
        assert [c["seed"] for c in ext["choices"]] == seeds
        texts = [text(c) for c in resp.choices]
        assert len(set(texts)) > 1, texts  # four samples, not one copied
        for seed, want in zip(seeds, texts):
            single = ask(temperature=1.0, max_tokens=16, seed=seed)
            assert text(single.choices[0]) == want, (kind, seed)
            assert single.model_extra["edge_ensemble"]["seeds"] == [seed]
        assert resp.usage.completion_tokens == sum(c["stats"]["tokens"] for c in ext["choices"])
        assert resp.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counted once
    # a seed given: choice i has seed + i
    resp = client.chat.completions.create(model=MODEL, messages=HELLO, n=3, temperature=1.0, max_tokens=8, seed=41)
    assert resp.model_extra["edge_ensemble"]["seeds"] == [41, 42, 43]


def test_n_greedy_choices_are_identical(server, pair):
    resp = server.client().chat.completions.create(model=MODEL, messages=HELLO, n=LANES, max_tokens=20)
    texts = [c.message.content for c in resp.choices]
    assert texts == [pair.generate(messages=HELLO, max_tokens=20).text] * LANES
    assert server.health()["running"] == 0


def test_n_streamed_choices_carry_their_index(server):
    client = server.client()
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, n=3, temperature=1.0, max_tokens=12,
                                                 seed=7, stream=True))
    texts = ["", "", ""]
    finals: dict[int, Any] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finals[choice.index] = chunk.model_extra["edge_ensemble"]
    assert sorted(finals) == [0, 1, 2] and [finals[i]["seed"] for i in range(3)] == [7, 8, 9]
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, n=3, temperature=1.0, max_tokens=12, seed=7)
    assert texts == [c.message.content for c in whole.choices]
    streamed = list(client.completions.create(model=MODEL, prompt="Once upon a time", n=2, max_tokens=8, stream=True,
                                              stream_options={"include_usage": True}))
    assert {c.index for chunk in streamed for c in chunk.choices} == {0, 1}
    assert streamed[-1].usage is not None and streamed[-1].usage.completion_tokens > 0


def test_n_limits(server, tiny_bpe):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="--max-n") as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, n=7)
    assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, n=0)
    assert e.value.param == "n"
    # more choices than the lanes and the queue together can ever hold: refused, not queued forever
    with Ensemble([tiny_bpe], config=EnsembleConfig(n_ctx=256, n_threads=1, parallel=2, check_memory=False)) as ens:
        # (interleaved, not batched: the choices are advanced round-robin by one worker thread)
        running = Running(create_app(ens, ServerOptions(model_id=MODEL, max_n=8, max_queue=1, batch=False)))
        try:
            with pytest.raises(openai.BadRequestError, match="--parallel") as e:
                running.client().chat.completions.create(model=MODEL, messages=HELLO, n=4, max_tokens=2)
            assert e.value.param == "n"
            # beyond the lanes, within the queue: the last choice waits for a lane, then answers as the others
            resp = running.client().chat.completions.create(model=MODEL, messages=HELLO, n=3, max_tokens=6)
            assert len(resp.choices) == 3 and len({c.message.content for c in resp.choices}) == 1
            assert resp.model_extra["edge_ensemble"]["choices"][2]["queue_seconds"] > 0
            sampled = running.client().completions.create(model=MODEL, prompt="Once upon a time", n=3, seed=5,
                                                          temperature=1.0, max_tokens=10)
            for i, choice in enumerate(sampled.choices):
                assert running.client().completions.create(model=MODEL, prompt="Once upon a time", seed=5 + i,
                                                           temperature=1.0, max_tokens=10).choices[0].text == choice.text
        finally:
            running.stop()


# -- logprobs -----------------------------------------------------------------------------------------------------


NO_LOGPROBS = "every-token"  # every token ensembled from the union: no one model wrote it


def test_logprobs_are_refused_for_a_policy_that_cannot_give_them(server):
    assert not registry.get(NO_LOGPROBS).logprobs
    client = server.client()
    without = {"edge_ensemble": {"policy": NO_LOGPROBS}}
    with pytest.raises(openai.BadRequestError, match=f"policy {NO_LOGPROBS} does not report") as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, logprobs=True, top_logprobs=2, extra_body=without)
    assert e.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", logprobs=1, extra_body=without)
    assert e.value.param == "logprobs"
    for body, param in [({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"logprobs": 2}, "logprobs")]:
        status, _, data = server.request("POST", "/v1/chat/completions", json.dumps(
            {"model": MODEL, "messages": HELLO, **body}), {"Content-Type": "application/json"})
        assert status == 400 and data["error"]["param"] == param, data
    # the baseline, asked for per request, gives them (logprobs: false asks for nothing)
    resp = client.chat.completions.create(model=MODEL, messages=HELLO, logprobs=True, top_logprobs=2, max_tokens=5,
                                          extra_body={"edge_ensemble": {"policy": BASELINE_POLICY}})
    content = resp.choices[0].logprobs.content
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 for t in content)
    assert client.chat.completions.create(model=MODEL, messages=HELLO, logprobs=False, max_tokens=2).choices[0].logprobs is None


def test_the_default_policy_reports_each_token_as_the_model_that_wrote_it(pair, tiny_bpe, llama_quiet):
    """SAFE: a drafted token is the drafter's, with the drafter's log-probability; an ensembled one the winning
    member's. Alone (no verifier) every token is drafted: SAFE's records are the baseline's."""
    assert registry.get(DEFAULT_POLICY).logprobs
    result = pair.generate(messages=HELLO, max_tokens=40, logprobs=3, policy=DEFAULT_POLICY, gate=None)
    assert result.stats.ensembled_tokens > 0  # every chunk verified: some positions were ensembled
    assert len(result.logprobs) == result.stats.tokens - (result.finish_reason == "stop")
    assert b"".join(r.token for r in result.logprobs).decode() == result.text
    for r in result.logprobs:
        assert len(r.top) == 3 and r.logprob <= r.top[0][1] + 1e-9 and r.top[0][1] >= r.top[-1][1]
    # Each record is its writer's own distribution there, recomputed on a fresh lane of that member: the drafter's
    # for a drafted token, the winner's at an ensembled position (both members win some here).
    events = list(pair.stream(messages=HELLO, max_tokens=30, logprobs=3, policy=DEFAULT_POLICY, gate=None))
    written = [(e.winner or pair.members[0].name, r) for e in events for r in e.logprobs or []]
    assert {w for w, _ in written} == {m.name for m in pair.members}
    lanes = open_lanes(pair._members, HELLO)
    try:
        ids: list[int] = []  # the drafter's tokens so far (both members share its tokenizer)
        for writer, record in written:
            lane = next(lane for lane in lanes if lane.name == writer)
            target = lane.prompt + ids
            dist = lane.feed(target, rows=[len(target) - 1])[len(target) - 1]
            want = token_logprob(lane, dist, lane.member._exact[record.token], 3)
            assert [t for t, _ in want.top] == [t for t, _ in record.top] and abs(want.logprob - record.logprob) < 1e-4
            ids.append(pair._members[0]._exact[record.token])
    finally:
        close_lanes(lanes)
    with Ensemble([tiny_bpe], config=EnsembleConfig(n_ctx=512, n_threads=1, check_memory=False)) as alone:
        safe = alone.generate(messages=HELLO, max_tokens=20, logprobs=4, policy=DEFAULT_POLICY)
        single = alone.generate(messages=HELLO, max_tokens=20, logprobs=4, policy=BASELINE_POLICY)
    assert safe.text == single.text and len(safe.logprobs) == len(single.logprobs) == 20
    for a, b in zip(safe.logprobs, single.logprobs):  # (the second answer re-feeds the cached prompt's last token)
        assert a.token == b.token and [t for t, _ in a.top] == [t for t, _ in b.top]
        assert abs(a.logprob - b.logprob) < 1e-4 and all(abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a.top, b.top))


def test_streamed_logprobs_equal_the_whole_answer(server):
    client = server.client()
    args: dict[str, Any] = {"model": MODEL, "max_tokens": 16, "stop": ["e"],  # a stop string cuts the last token
                            "extra_body": {"edge_ensemble": {"policy": BASELINE_POLICY}}}
    whole = client.chat.completions.create(messages=HELLO, logprobs=True, top_logprobs=3, **args)
    tokens = [t.token for t in whole.choices[0].logprobs.content]
    streamed = [t.token for chunk in client.chat.completions.create(messages=HELLO, logprobs=True, top_logprobs=3,
                                                                    stream=True, **args)
                for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    assert streamed == tokens and "".join(tokens).startswith(whole.choices[0].message.content)
    done = client.completions.create(prompt="Once upon a time", logprobs=2, **args)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.text_offset[0] == len("Once upon a time")
    assert all(tok in top for tok, top in zip(lp.tokens, lp.top_logprobs))


@pytest.mark.real
def test_logprobs_match_llama_cpp_python(real_models, llama_quiet):
    """Greedy, single: the same tokens and top-5 alternatives as llama-cpp-python's, log-probabilities within
    0.05 (both prefill the prompt in one batch and decode one token per llama_decode)."""
    import llama_cpp

    path = real_models("smollm2-135m-instruct")
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    prompt = "The capital of France is"
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, n_threads_batch=1, logits_all=True,
                          verbose=False)
    chat_want = llm.create_chat_completion(messages=messages, max_tokens=24, temperature=0, logprobs=True,
                                           top_logprobs=5)["choices"][0]
    text_want = llm.create_completion(prompt, max_tokens=16, temperature=0, logprobs=5)["choices"][0]
    del llm
    with Ensemble([path], config=EnsembleConfig(n_ctx=512, n_threads=1, policy=BASELINE_POLICY,
                                                check_memory=False)) as ens:
        running = Running(create_app(ens, ServerOptions(model_id="smollm2")))
        try:
            client = running.client()
            chat = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0,
                                                  logprobs=True, top_logprobs=5).choices[0]
            text = client.completions.create(model="smollm2", prompt=prompt, max_tokens=16, temperature=0,
                                             logprobs=5).choices[0]
        finally:
            running.stop()
    assert chat.message.content == chat_want["message"]["content"]
    gap = 0.0
    mine = chat.logprobs.content
    theirs = chat_want["logprobs"]["content"]
    assert len(mine) == len(theirs) == 24
    for m, t in zip(mine, theirs):
        assert bytes(m.bytes).decode("utf-8", "ignore") == t["token"]
        gap = max(gap, abs(m.logprob - t["logprob"]))
        alternatives = {bytes(a.bytes).decode("utf-8", "ignore"): a.logprob for a in m.top_logprobs}
        want = {a["token"]: a["logprob"] for a in t["top_logprobs"]}
        assert len(m.top_logprobs) == 5 and alternatives.keys() == want.keys(), (alternatives, want)
        gap = max(gap, *(abs(alternatives[k] - want[k]) for k in want))
    assert text.text == text_want["text"]
    ours, want_lp = text.logprobs, text_want["logprobs"]
    assert ours.tokens == want_lp["tokens"] and ours.text_offset == want_lp["text_offset"]
    for lp, top, wlp, wtop in zip(ours.token_logprobs, ours.top_logprobs, want_lp["token_logprobs"],
                                  want_lp["top_logprobs"]):
        assert top.keys() == wtop.keys()
        gap = max(gap, abs(lp - wlp), *(abs(top[k] - wtop[k]) for k in wtop))
    print(f"largest log-probability gap vs llama-cpp-python: {gap:.2e}")
    assert gap < 0.05


def test_serve_has_a_max_n_flag():
    from click.testing import CliRunner

    from edge_ensemble.cli import cli
    from edge_ensemble.server import MAX_N, SERVER_LIMITS

    assert MAX_N in SERVER_LIMITS
    out = CliRunner().invoke(cli, ["serve", "--help"], terminal_width=200).output
    assert "--max-n" in out and f"default: {MAX_N.default}]" in out.split("--max-n", 1)[1].split("\n  -", 1)[0]
