"""Members served by a real llama-server on loopback (built by scripts/build-llama-server; scripts/test builds
it), and every way such a member can fail.

Exactness: a remote member serving the same GGUF as a local one writes the same greedy text. The fault tests
run against a real server with a tiny generated model; malformed JSON and a stalling server come from a small
fault-injecting proxy in front of the real server (tests/llama_server.py), because a real llama-server cannot
be made to send either.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import assert_same_up_to_late_near_ties

from edge_ensemble.api import Ensemble
from edge_ensemble.errors import UsageError
from edge_ensemble.remote import RemoteBackend, RemoteError, parse_server_spec
from fake_backend import FakeBackend
from llama_server import FaultProxy, Server, free_port, llama_server_binary

SMOL, QWEN = "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"
PROMPTS = ["Why is the sky blue? Answer in two sentences.", "Write a Python function that reverses a string."]
TOKENS = 48
OPTS = dict(n_ctx=1024, n_threads=1)


@pytest.fixture(scope="module")
def binary() -> Path:
    path = llama_server_binary()
    if path is None:
        pytest.fail("no llama-server binary: run scripts/build-llama-server (scripts/test does)", pytrace=False)
    return path


@pytest.fixture(scope="module")
def smol_server(binary: Path, real_models: Callable[[str], Path]) -> Iterator[Server]:
    with Server(binary, real_models(SMOL), n_ctx=1024) as server:
        yield server


@pytest.fixture(scope="module")
def qwen_server(binary: Path, real_models: Callable[[str], Path]) -> Iterator[Server]:
    with Server(binary, real_models(QWEN), n_ctx=1024) as server:
        yield server


@pytest.fixture
def tiny_server(binary: Path, tiny_bpe: Path) -> Iterator[Server]:
    """A fresh server per test (some tests kill it), serving a tiny random model: it starts in a second."""
    with Server(binary, tiny_bpe, n_ctx=512) as server:
        yield server


def texts(members: list[str], policy: str = "safe", **kw: object) -> list[str]:
    with Ensemble(members, policy=policy, **OPTS, **kw) as ens:  # type: ignore[arg-type]
        return [ens.generate(p, max_tokens=TOKENS).text for p in PROMPTS]


@pytest.fixture(scope="module")
def local_single(real_models: Callable[[str], Path]) -> list[str]:
    return texts([str(real_models(SMOL))], policy="single")


@pytest.fixture(scope="module")
def local_tiny_pair(real_models: Callable[[str], Path]) -> list[str]:
    return texts([str(real_models(QWEN)), str(real_models(SMOL))])


# -- the spec ------------------------------------------------------------------------------------------------


def test_server_spec_syntax() -> None:
    s = parse_server_spec("server:http://10.0.0.2:8080=smollm2-135m-instruct")
    assert (s.url, s.host, s.port, s.model) == ("http://10.0.0.2:8080", "10.0.0.2", 8080, "smollm2-135m-instruct")
    assert parse_server_spec("server:http://box:9000/").model is None
    assert parse_server_spec("server:http://box=/m/a.gguf").port == 80
    for bad in ("server:box:8080", "server:https://box:1", "server:http://box:1/v1", "server:http://box:x",
                "server:http://box:1=", "server:http://[::1"):
        with pytest.raises(UsageError, match="server:http://HOST:PORT"):
            parse_server_spec(bad)


class DraftingFake(FakeBackend):
    """A scripted backend that also drafts in one call, as a server does: it continues greedily from its own
    picks; ``swerve`` = texts after which it picks its second choice (an exact tie broken the other way)."""

    def __init__(self, *args: object, swerve: tuple[bytes, ...] = (), **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.swerve, self.drafts = swerve, 0

    def draft(self, seq: int, target: list[int], n: int, temperature: float) -> list:
        self.drafts += 1
        held, out = list(target), []
        for _ in range(n):
            dist = self.dist_after(held, temperature)
            text = b"".join(self.token_bytes[t] for t in held[1:])
            tok = int(dist.top(2)[0][-1]) if text in self.swerve else dist.argmax
            out.append((tok, dist))
            if self.is_eog(tok):
                break
            held.append(tok)
        self._seqs[seq] = held[: len(target) + len(out) - 1]
        return out


@pytest.mark.parametrize("swerve", [(), (b"AB",)])
def test_drafting_in_one_call_changes_no_greedy_result(swerve: tuple[bytes, ...]) -> None:
    from edge_ensemble.decisions import EOG
    from edge_ensemble.engine import GenerationOptions, generate_events
    from edge_ensemble.member import Member

    pieces = [b"A", b"B", b"C", b" "]
    script = {b"": {b"A": 0.9, b"B": 0.1}, b"A": {b"B": 0.9}, b"AB": {b"C": 0.5, b" ": 0.45},
              b"ABC": {b"A": 0.4, b"B": 0.35}, b"ABCA": {b"B": 0.9}, b"ABCAB": {EOG: 0.9}}
    verifier = {**script, b"ABC": {b"B": 0.8}, b"ABCB": {EOG: 0.9}}
    results = []
    for backend in (FakeBackend, DraftingFake):
        kw = {"swerve": swerve} if backend is DraftingFake else {}
        d = backend(pieces, script, name="d", kind="top", **kw)
        v = FakeBackend(pieces, verifier, name="v", kind="top")
        for gate in (0.5, None):
            cfg = dict(gate=gate, draft_len=4)
            events = list(generate_events([Member(d), Member(v)], [{"role": "user", "content": "q"}],
                                          policy_options=cfg, options=GenerationOptions(max_tokens=20)))
            r = events[-1].result
            results.append((gate, r.text, [(s.kind, s.text) for s in r.provenance]))
        if backend is DraftingFake:
            assert d.drafts and d.steps == 0
    assert results[:2] == results[2:]


# -- exactness -----------------------------------------------------------------------------------------------


def test_remote_member_shares_the_local_tokenizer(smol_server: Server, real_models: Callable[[str], Path]) -> None:
    from edge_ensemble.runtime import LoadOptions, Model

    backend = RemoteBackend(parse_server_spec(smol_server.spec()), real_models(SMOL))
    local = Model(real_models(SMOL), LoadOptions(vocab_only=True))
    try:
        assert backend.tokenizer_fingerprint == local.tokenizer_fingerprint
        assert backend.n_ctx == 1024 and backend.n_slots == 2
    finally:
        backend.close()
        local.close()


def test_remote_single_is_local_single(smol_server: Server, local_single: list[str], real_models) -> None:
    assert texts([smol_server.spec(SMOL)], policy="single") == local_single


def two_local_copies(path: Path) -> list[str]:
    """SAFE with ``path`` drafting and a second, separately loaded copy of it verifying (the API would share
    one backend between them): what a remote copy must reproduce."""
    from edge_ensemble.backends import LocalBackend
    from edge_ensemble.engine import GenerationOptions, generate_events
    from edge_ensemble.member import Member
    from edge_ensemble.runtime import LoadOptions, Model

    models = [Model(path, LoadOptions(n_ctx=1024, n_threads=1)) for _ in range(2)]
    try:
        members = [Member(LocalBackend(models[0])), Member(LocalBackend(models[1]), name="copy")]
        out = []
        for p in PROMPTS:
            events = generate_events(members, [{"role": "user", "content": p}],
                                     options=GenerationOptions(max_tokens=TOKENS))
            out.append([e for e in events if e.result is not None][0].result.text)
        return out
    finally:
        for m in models:
            m.close()


def test_self_ensemble_across_the_wire(smol_server: Server,
                                       real_models: Callable[[str], Path]) -> None:
    # A local SmolLM2 drafting and the same GGUF verifying from a server: the fingerprints match, so the
    # verifier follows the drafter's ids. This is NOT the local self-ensemble (the same path listed twice
    # shares one backend, whose verifier reads the drafter's own distributions): two copies compute each
    # position differently — the drafter one token per step, the verifier a catch-up batch — and llama.cpp's
    # batched kernels differ from its one-token ones by more than float noise (measured at one position of
    # PROMPTS[1]: " used" 0.424 / " a" 0.421 stepwise vs 0.497 / 0.349 batched, locally). So the comparable
    # reference is two separately loaded local copies; over the wire the text must be that text.
    with Ensemble([str(real_models(SMOL)), smol_server.spec()], **OPTS) as ens:
        results = [ens.generate(p, max_tokens=TOKENS) for p in PROMPTS]
    assert [r.text for r in results] == two_local_copies(real_models(SMOL))
    assert all(r.stats.shared_tokenizer[r.stats.members[1]] for r in results)
    assert sum(r.stats.verification_calls for r in results) > 0


def test_tiny_pair_with_its_verifier_remote(smol_server: Server, local_tiny_pair: list[str],
                                            real_models: Callable[[str], Path]) -> None:
    assert texts([str(real_models(QWEN)), smol_server.spec(SMOL)]) == local_tiny_pair


def test_answers_decoded_together_with_a_remote_verifier(smol_server: Server, local_tiny_pair: list[str],
                                                         real_models: Callable[[str], Path]) -> None:
    """Two threads in one ensemble's decode rounds (the server's --parallel): the local drafter's steps batched,
    the remote verifier's requests serialized on its own lock; each answer is what it is alone."""
    import threading

    out: dict[int, str] = {}
    with Ensemble([str(real_models(QWEN)), smol_server.spec(SMOL)], policy="safe", parallel=2, **OPTS) as ens:  # type: ignore[arg-type]
        with ens.decode_together() as rounds:
            def answer(i: int) -> None:
                with rounds.taking_part():
                    out[i] = ens.generate(PROMPTS[i], max_tokens=TOKENS).text

            threads = [threading.Thread(target=answer, args=(i,)) for i in range(len(PROMPTS))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
    # Two answers only: "half byte-identical" failed once in session 9's suite runs (0 of 2, both parting from their
    # alone twins at near-ties of the batched drafter, each still its own prompt's answer), so only the prefix
    # check (a leak garbles an answer from its start) is kept; test_batched checks the near-ties with logits.
    assert_same_up_to_late_near_ties([out.get(i) or "" for i in range(len(PROMPTS))], local_tiny_pair,
                                     min_identical=0)
    assert rounds.served > rounds.batches  # the drafter's decodes were shared


def test_tiny_pair_with_its_drafter_remote(qwen_server: Server, local_tiny_pair: list[str],
                                           real_models: Callable[[str], Path]) -> None:
    assert texts([qwen_server.spec(QWEN), str(real_models(SMOL))]) == local_tiny_pair


def test_one_request_drafts_equal_one_token_steps(qwen_server: Server, real_models, monkeypatch) -> None:
    from edge_ensemble.member import Lane

    members = [qwen_server.spec(QWEN), str(real_models(SMOL))]
    with Ensemble(members, **OPTS) as ens:
        fast = ens.generate(PROMPTS[1], max_tokens=TOKENS)
        requests_fast = ens._members[0].backend.requests
        monkeypatch.setattr(Lane, "drafts_in_one_call", property(lambda self: False))
        ens.reset_cache()
        slow = ens.generate(PROMPTS[1], max_tokens=TOKENS)
        requests_slow = ens._members[0].backend.requests - requests_fast
    assert fast.text == slow.text
    assert requests_fast < requests_slow


# -- failures: one clear line, never a hang ------------------------------------------------------------------


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and msg
    return msg


def test_server_down_at_start(tiny_bpe: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as err:
        Ensemble([f"server:http://127.0.0.1:{free_port()}={tiny_bpe}"], **OPTS)
    assert "unreachable (connection refused)" in one_line(err.value) and "start it" in str(err.value)
    assert time.monotonic() - t0 < 10


def test_server_with_another_model(tiny_server: Server, tiny_spm: Path) -> None:
    with pytest.raises(RemoteError) as err:
        Ensemble([tiny_server.spec(tiny_spm)], **OPTS)
    assert f"serves {tiny_server.model.name}, not the declared {tiny_spm}" in one_line(err.value)


def stream_until_error(spec: str, fault: Callable[[], None]) -> tuple[str, RemoteError, float]:
    """Stream a single-model answer from ``spec``; after the first text, ``fault()``; the text before the error."""
    parts: list[str] = []
    with Ensemble([spec], policy="single", **OPTS) as ens:
        with pytest.raises(RemoteError) as err:
            for event in ens.stream("Count to one hundred.", max_tokens=200):
                if event.text and not parts:
                    fault()
                    t0 = time.monotonic()
                parts.append(event.text)
    return "".join(parts), err.value, time.monotonic() - t0


def test_server_killed_mid_answer(tiny_server: Server) -> None:
    text, err, waited = stream_until_error(tiny_server.spec(), tiny_server.kill)
    assert text and "mid-answer" in one_line(err) and "unreachable" in str(err)
    assert waited < 10


def test_slow_server_past_the_timeout(tiny_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_ENSEMBLE_SERVER_TIMEOUT", "0.5")
    with FaultProxy(tiny_server.port, "slow", after=10**9, delay=3.0) as proxy:
        text, err, waited = stream_until_error(f"server:{proxy.url}={tiny_server.model}",
                                               lambda: setattr(proxy, "after", 0))
    assert text and "did not answer /completion within 0.5 s mid-answer" in one_line(err)
    assert waited < 3


def test_malformed_json_mid_answer(tiny_server: Server) -> None:
    with FaultProxy(tiny_server.port, "garble", after=10**9) as proxy:
        text, err, _ = stream_until_error(f"server:{proxy.url}={tiny_server.model}", lambda: setattr(proxy, "after", 0))
    assert text and "malformed answer to /completion" in one_line(err) and "mid-answer" in str(err)


def test_cli_keeps_the_partial_answer_and_exits_1(tiny_server: Server) -> None:
    # The proxy answers the start-up checks, the prompt and three tokens, then garbles.
    with FaultProxy(tiny_server.port, "garble", after=4) as proxy:
        run = subprocess.run([sys.executable, "-m", "edge_ensemble.cli", "run", "--policy", "single", "--threads", "1",
                              "--n-ctx", "512", "--max-tokens", "50", "-m", f"server:{proxy.url}={tiny_server.model}",
                              "Count to ten."], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stdout.strip()  # the text written before the fault
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "malformed answer" in errors[0], run.stderr


def test_a_preset_may_name_server_members(tmp_path: Path) -> None:
    from edge_ensemble.cli import _expand
    from edge_ensemble.sources import Catalog

    extra = tmp_path / "mine.toml"
    extra.write_text('[presets.split]\nmembers = ["qwen2.5-coder-0.5b-instruct",'
                     ' "server:http://box:8080=smollm2-135m-instruct"]\n')
    catalog = Catalog.load(extra)
    assert catalog.preset("split").members[1] == "server:http://box:8080=smollm2-135m-instruct"
    assert _expand(["split"], catalog) == ["qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct"]  # vocab files
    extra.write_text('[presets.bad]\nmembers = ["server:http://box:8080"]\n')
    with pytest.raises(Exception, match="unknown model"):
        Catalog.load(extra)


def test_sampling_with_a_remote_drafter_is_reproducible(tiny_server: Server, tiny_bpe_b: Path) -> None:
    # Sampling takes the one-token path (the server drafts only greedily); its top-n distributions are
    # sampled here, so a seed fixes the answer.
    with Ensemble([tiny_server.spec(), str(tiny_bpe_b)], **OPTS) as ens:
        a, b = (ens.generate("Hello", max_tokens=16, temperature=0.8, seed=7).text for _ in range(2))
        c = ens.generate("Hello", max_tokens=16, temperature=0.8, seed=8).text
    assert a == b and a and (c != a or len(a) < 4)


@pytest.mark.parametrize("policy", ["single", "safe"])
def test_a_full_server_context_ends_the_answer_with_length(tiny_server: Server, tiny_bpe_b: Path, policy: str) -> None:
    members = [tiny_server.spec()] + ([str(tiny_bpe_b)] if policy == "safe" else [])
    with Ensemble(members, policy=policy, **OPTS) as ens:
        r = ens.generate("Hello", max_tokens=1000)
    assert r.finish_reason == "length" and 400 < r.stats.tokens < 512


def test_a_vote_with_a_remote_member_samples_through_llama_server(binary: Path, tiny_bpe: Path) -> None:
    """A `server:` member samples one request per sample and step, each live sample in its own slot (llama-server's
    n_cmpl is not used): the vote runs and its first answer is the remote model's greedy one."""
    from edge_ensemble import Ensemble

    with Server(binary, tiny_bpe, n_ctx=512, slots=3) as server, \
            Ensemble([server.spec(tiny_bpe)], n_ctx=512, n_threads=1, policy="vote", window=2) as ens:
        got = ens.generate("Hello", max_tokens=8, vote_gate="never", max_samples=3, stopping="none", seed=1)
        greedy = ens.generate("Hello", max_tokens=8, policy="single")
    assert got.stats.samples == 3 and len(got.branches) == 3
    assert got.branches[0].text == greedy.text and got.branches[0].origin == "first"
    assert all(b.finish_reason in ("stop", "length") for b in got.branches)
