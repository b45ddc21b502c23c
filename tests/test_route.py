"""FusionRoute (policy `route`, `route train`): the head's fit and file, routing on tiny and real models, the
lazy catch-up of lagging experts, the training set build, and bad head files at the command line."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_ensemble import route_train
from edge_ensemble.api import Ensemble, EnsembleConfig
from edge_ensemble.cli import cli
from edge_ensemble.engine import GenerationOptions, generate_events
from edge_ensemble.errors import HeadFileError, UsageError
from edge_ensemble.member import Member
from edge_ensemble.route_train import TrainItem, build_features, fit_from_features, load_models, train_router
from edge_ensemble.routing import RouterHead, file_sha256, fit_beta, fit_head, load_head
from edge_ensemble.runtime import LoadOptions, Model, SeqRequest

from doubles import recording_lanes

STORY = [{"role": "user", "content": "Tell me a long story."}]
DATE = "2026-01-01T00:00:00+00:00"


def make_head(experts: list[Path], router: Path, W: np.ndarray, b: np.ndarray, beta: float = 0.0,
              hidden_size: int | None = None) -> RouterHead:
    return RouterHead(W=np.asarray(W, np.float32), b=np.asarray(b, np.float32), beta=beta,
                      router_sha256=file_sha256(router), expert_sha256=tuple(file_sha256(p) for p in experts),
                      expert_names=tuple(p.stem for p in experts), router_name=router.stem,
                      hidden_size=hidden_size if hidden_size is not None else np.asarray(W).shape[1])


def n_embd(path: Path) -> int:
    with Model(path, LoadOptions(n_ctx=64)) as m:
        return m.n_embd


def route(members: list[Member], head_file: Path, messages=STORY, max_tokens: int = 64, beta: float | None = None,
          overlap: bool = False, gate: float | None = None):
    events = list(generate_events(members, messages, policy="route",
                                  policy_options=dict(head=str(head_file), beta=beta, overlap=overlap,
                                                             route_gate=gate),
                                  options=GenerationOptions(max_tokens=max_tokens)))
    return events[-1].result


def greedy_tokens(path: Path, messages, max_tokens: int) -> tuple[list[int], str]:
    with Model(path, LoadOptions(n_ctx=2048)) as m, recording_lanes() as lanes:
        member = Member(m)
        result = list(generate_events([member], messages, policy="single",
                                      options=GenerationOptions(max_tokens=max_tokens)))[-1].result
        lane = lanes.last(member)
        return list(m.tokens(lane.seq)[len(lane.prompt):]), result.text


# -- the head, without models ----------------------------------------------------------------------------------


def separable(seed: int, n: int = 3000, d: int = 24, k: int = 3):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 4
    y = rng.integers(0, k, n)
    X = centers[y] + rng.normal(size=(n, d))
    # linearly separable for sure: drop the points a known linear rule gets wrong
    keep = np.argmax(X @ centers.T - 0.5 * (centers ** 2).sum(axis=1), axis=1) == y
    return X[keep].astype(np.float32) * 3 + 7, y[keep]  # shifted and scaled: standardisation must cope


def test_fit_reaches_99_percent_on_linearly_separable_data():
    X, y = separable(0)
    n = int(0.8 * len(y))
    fit = fit_head(X[:n], y[:n], X[n:], y[n:], 3)
    accuracy = np.mean(np.argmax(X[n:] @ fit.W.T + fit.b, axis=1) == y[n:])
    assert accuracy >= 0.99 and fit.heldout_accuracy >= 0.99 and fit.train_accuracy >= 0.99
    assert fit.W.shape == (3, X.shape[1]) and fit.W.dtype == np.float32


def test_fit_and_file_are_the_same_bytes_for_the_same_data(tmp_path):
    X, y = separable(1)
    files = []
    for i in range(2):
        fit = fit_head(X[:1000], y[:1000], X[1000:], y[1000:], 3)
        head = RouterHead(fit.W, fit.b, 0.3, "a" * 64, ("b" * 64, "c" * 64, "d" * 64), ("x", "y", "z"),
                          hidden_size=X.shape[1], date=DATE, training_data="synthetic", seed=0)
        head.save(tmp_path / f"h{i}.npz")
        files.append((tmp_path / f"h{i}.npz").read_bytes())
    assert files[0] == files[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h0.npz", "h1.npz"]  # no temp file left behind
    back = load_head(tmp_path / "h0.npz")
    assert np.array_equal(back.W, head.W) and back.beta == 0.3 and back.date == DATE and back.expert_names == ("x", "y", "z")


def test_beta_fit_takes_the_best_and_the_smallest_on_a_tie():
    grid = (0.0, 0.5, 1.0)
    correct = np.zeros((4, 2, 3), dtype=bool)
    correct[:, 1, 1] = True  # expert 1 is right with beta 0.5 only
    correct[:2, 0, :] = True  # expert 0 is right at the first two positions whatever beta
    assert fit_beta(correct, np.array([1, 1, 1, 1]), grid)[0] == 0.5
    assert fit_beta(correct, np.array([0, 0, 0, 0]), grid) == (0.0, [0.5, 0.5, 0.5])


def test_load_head_refuses_bad_files_in_one_line(tmp_path):
    good = RouterHead(np.zeros((2, 8), np.float32), np.zeros(2, np.float32), 0.0, "r" * 64, ("e" * 64, "f" * 64),
                      ("e", "f"), router_name="r", hidden_size=8)
    good.save(tmp_path / "good.npz")
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.npz").write_bytes(b"not a head at all")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    bad_shape = RouterHead(np.zeros((2, 8), np.float32), np.zeros(2, np.float32), 0.0, "r" * 64, ("e" * 64, "f" * 64),
                           ("e", "f"), hidden_size=9)
    bad_shape.save(tmp_path / "inconsistent.npz")
    with np.load(tmp_path / "good.npz") as saved:
        meta = json.loads(str(saved["meta"][()]))
        np.savez(tmp_path / "huge.npz", W=saved["W"], b=saved["b"],
                 meta=np.array(json.dumps({**meta, "hidden_size": 1}).replace('"hidden_size": 1', '"hidden_size": 1e400')))
    cases = {"missing.npz": "not found", "truncated.npz": "corrupt or truncated", "garbage.npz": "not an .npz",
             "other.npz": "not a route head", "inconsistent.npz": "inconsistent", "huge.npz": "incomplete metadata"}
    for name, words in cases.items():
        with pytest.raises(HeadFileError) as err:
            load_head(tmp_path / name)
        assert words in str(err.value) and "\n" not in str(err.value) and "route train" in str(err.value), name
    with pytest.raises(HeadFileError, match=r"trained for router r \(sha256 rrrrrrrrrrrr…\).*route train"):
        load_head(tmp_path / "good.npz", router_sha="x" * 64, expert_shas=["e" * 64, "f" * 64])
    with pytest.raises(HeadFileError, match=r"trained for expert f .*route train"):
        load_head(tmp_path / "good.npz", router_sha="r" * 64, expert_shas=["e" * 64])
    with pytest.raises(HeadFileError, match=r"hidden states of size 8.*has 16.*route train"):
        load_head(tmp_path / "good.npz", hidden_size=16)
    assert load_head(tmp_path / "good.npz", router_sha="r" * 64, expert_shas=["e" * 64, "f" * 64], hidden_size=8)


# -- routing on tiny models ------------------------------------------------------------------------------------


@pytest.fixture
def tiny_pair(tiny_bpe, tiny_bpe_b):
    """Two tiny models with one tokenizer: the first is the router (hidden states on)."""
    a = Model(tiny_bpe, LoadOptions(n_ctx=2048, hidden_states=True))
    b = Model(tiny_bpe_b, LoadOptions(n_ctx=2048))
    yield [Member(a, name="a"), Member(b, name="b")]
    a.close()
    b.close()


def switching_head(tiny_bpe, tiny_bpe_b, tmp_path, beta: float = 0.0) -> Path:
    d = n_embd(tiny_bpe)
    W = np.random.default_rng(0).normal(size=(2, d))
    path = tmp_path / "switching.npz"
    make_head([tiny_bpe, tiny_bpe_b], tiny_bpe, W, np.zeros(2), beta).save(path)
    return path


def test_hidden_state_taken_while_routing_equals_a_direct_decode(tiny_pair, tiny_bpe, tiny_bpe_b, tmp_path, monkeypatch,
                                                                 lanes):
    seen: list[np.ndarray] = []
    real_select = RouterHead.select
    monkeypatch.setattr(RouterHead, "select", lambda self, h: (seen.append(np.array(h)), real_select(self, h))[1])
    result = route(tiny_pair, switching_head(tiny_bpe, tiny_bpe_b, tmp_path), max_tokens=60)
    lane = lanes.last(tiny_pair[0])
    tokens = list(tiny_pair[0].model.tokens(lane.seq)[len(lane.prompt):])
    assert len(seen) == result.stats.tokens and len(tokens) >= len(seen) - 1
    with Model(tiny_bpe, LoadOptions(n_ctx=2048, hidden_states=True)) as fresh:
        for k in (0, 1, 7, 30, len(seen) - 1):
            fresh.reset()
            direct = fresh.decode_many([SeqRequest(0, lane.prompt + tokens[:k], "last")]).hidden[0][-1]
            np.testing.assert_allclose(seen[k], direct, rtol=1e-4, atol=1e-4)


# The median of the tiny models' top-1 probabilities along a story: a gate there routes some tokens, not all.
TINY_GATE = 0.4


def test_gated_the_head_decides_on_the_router_state_of_the_whole_text(tiny_pair, tiny_bpe, tiny_bpe_b, tmp_path,
                                                                       monkeypatch, lanes):
    """Gated, the router lags between decisions: each decision must still read the hidden state after every
    token so far (its bulk catch-up), never a stale one."""
    from edge_ensemble.policies.route import RoutePolicy

    running: list[RoutePolicy] = []
    real_step = RoutePolicy.step
    monkeypatch.setattr(RoutePolicy, "step", lambda self, budget: (running.append(self), real_step(self, budget))[1])
    seen: list[tuple[int, np.ndarray]] = []
    real_select = RouterHead.select
    monkeypatch.setattr(RouterHead, "select",
                        lambda self, h: (seen.append((len(running[-1].tokens), np.array(h))), real_select(self, h))[1])
    result = route(tiny_pair, switching_head(tiny_bpe, tiny_bpe_b, tmp_path), max_tokens=80, gate=TINY_GATE)
    assert 5 <= len(seen) < result.stats.tokens and len(seen) == result.stats.route_decisions
    holder = max(tiny_pair, key=lambda m: len(m.model.tokens(lanes.last(m).seq)))
    tokens = list(holder.model.tokens(lanes.last(holder).seq)[len(lanes.last(holder).prompt):])
    prompt = lanes.last(tiny_pair[0]).prompt
    with Model(tiny_bpe, LoadOptions(n_ctx=2048, hidden_states=True)) as fresh:
        for k, hidden in seen:
            fresh.reset()
            direct = fresh.decode_many([SeqRequest(0, prompt + tokens[:k], "last")]).hidden[0][-1]
            np.testing.assert_allclose(hidden, direct, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("router_is_expert0,overlap,gate", [(True, False, None), (False, False, None),
                                                            (False, True, None), (True, False, TINY_GATE),
                                                            (False, False, TINY_GATE)])
def test_a_head_that_always_picks_expert_0_writes_its_greedy_answer(tiny_bpe, tiny_bpe_b, tmp_path, router_is_expert0,
                                                                    overlap, gate, lanes):
    expert0, other = (tiny_bpe, tiny_bpe_b) if router_is_expert0 else (tiny_bpe_b, tiny_bpe)
    d = n_embd(tiny_bpe)
    head = tmp_path / "always0.npz"
    make_head([expert0, other], tiny_bpe, np.zeros((2, d)), np.array([1.0, 0.0]), beta=0.7).save(head)
    a = Model(tiny_bpe, LoadOptions(n_ctx=2048, hidden_states=True))
    b = Model(tiny_bpe_b, LoadOptions(n_ctx=2048))
    members = [Member(a, name="a"), Member(b, name="b")]
    decisions: list[bool] = []
    for prompt in ("Tell me a long story.", "def fib(n):", "東京は日本の首都で、", "A sunny day 🌞🏖️ at the beach"):
        ask = [{"role": "user", "content": prompt}]
        result = route(members, head, ask, max_tokens=48, beta=0.0, overlap=overlap, gate=gate)
        want_tokens, want_text = greedy_tokens(expert0, ask, 48)
        lane = lanes.last(next(m for m in members if m.model.path == expert0))
        got = list(lane.cached[len(lane.prompt):])
        assert got[: len(want_tokens)] == want_tokens[: len(got)] and abs(len(got) - len(want_tokens)) <= 1
        assert result.text == want_text
        assert set(result.stats.routed_tokens.values()) >= {0} and sum(result.stats.routed_tokens.values()) >= result.stats.tokens
        assert {s.winner for s in result.provenance} <= {"a" if router_is_expert0 else "b"}
        if gate is not None:  # the gate took effect: some tokens went to the expert alone, some to the head
            decisions.append(result.stats.route_decisions < sum(result.stats.routed_tokens.values()))
            decisions.append(result.stats.route_decisions > 1)
    a.close()
    b.close()
    assert gate is None or any(decisions[0::2]) and any(decisions[1::2])


@pytest.mark.parametrize("overlap,gate", [(False, None), (True, None), (False, TINY_GATE)])
def test_after_500_tokens_of_switching_every_cache_equals_a_fresh_decode(tiny_pair, tiny_bpe, tiny_bpe_b, tmp_path,
                                                                         overlap, gate, lanes):
    result = route(tiny_pair, switching_head(tiny_bpe, tiny_bpe_b, tmp_path, beta=0.5), max_tokens=500,
                   overlap=overlap, gate=gate)
    assert result.stats.tokens == 500, result.finish_reason
    switches = len(result.provenance) - 1
    if gate is None:
        assert result.stats.route_decisions == 500
        assert switches >= 100 and min(result.stats.routed_tokens.values()) >= 100
    else:  # the router consulted at the unsure tokens only, still switching often
        assert 50 <= result.stats.route_decisions <= 450, result.stats.route_decisions
        assert switches >= 20 and min(result.stats.routed_tokens.values()) >= 20
    if overlap:  # the one other expert follows every token: it never lags
        assert result.stats.catch_up_tokens == 0
        assert lanes.last(tiny_pair[1]).decoded_tokens >= 500
    else:
        assert result.stats.catch_up_tokens > 0 and result.stats.catch_up_seconds > 0
    # Ungated the router reads every token; gated it lags, and the expert that wrote last holds the whole text.
    holder = max(tiny_pair, key=lambda m: len(m.model.tokens(lanes.last(m).seq)))
    text_tokens = list(holder.model.tokens(lanes.last(holder).seq)[len(lanes.last(holder).prompt):])
    assert holder.model.detokenize(text_tokens) == result.text.encode()
    for m in tiny_pair:
        lane = lanes.last(m)
        cached = list(m.model.tokens(lane.seq))
        full = lane.prompt + text_tokens
        assert cached == full[: len(cached)]  # a lagging expert holds a prefix of the text
        # caught up (or its last token re-decoded), its cache gives what a fresh decode of the text gives
        keep = min(len(cached), len(full) - 1)
        m.model.trim(keep, lane.seq)
        cached_logits = np.array(m.model.decode(full[keep:], want="last", seq=lane.seq)[-1])
        with Model(m.model.path, LoadOptions(n_ctx=2048)) as fresh:
            reference = np.array(fresh.decode(full, want="last")[-1])
        np.testing.assert_allclose(cached_logits, reference, atol=1e-3)
        assert int(np.argmax(cached_logits)) == int(np.argmax(reference))


def test_routing_across_tokenizers_is_refused_in_one_line(tiny_bpe, tiny_spm_chat, tmp_path):
    a = Model(tiny_bpe, LoadOptions(n_ctx=512, hidden_states=True))
    b = Model(tiny_spm_chat, LoadOptions(n_ctx=512))
    head = tmp_path / "h.npz"
    make_head([tiny_bpe, tiny_spm_chat], tiny_bpe, np.zeros((2, a.n_embd)), np.zeros(2)).save(head)
    with pytest.raises(UsageError, match="share one tokenizer.*not supported"):
        route([Member(a, name="a"), Member(b, name="b")], head)
    a.close()
    b.close()


def test_route_needs_the_router_loaded_with_hidden_states(tiny_bpe, tiny_bpe_b, tmp_path):
    a, b = Model(tiny_bpe, LoadOptions(n_ctx=512)), Model(tiny_bpe_b, LoadOptions(n_ctx=512))
    with pytest.raises(UsageError, match="hidden states: create the Ensemble with policy='route'"):
        route([Member(a, name="a"), Member(b, name="b")], switching_head(tiny_bpe, tiny_bpe_b, tmp_path))
    a.close()
    b.close()


def test_route_gate_and_overlap_exclude_each_other(tiny_pair, tiny_bpe, tiny_bpe_b, tmp_path):
    with pytest.raises(UsageError, match="--route-gate and --overlap do not go together"):
        route(tiny_pair, switching_head(tiny_bpe, tiny_bpe_b, tmp_path), overlap=True, gate=0.5)


def test_eval_route_configurations_are_built_from_one_head(tiny_bpe, tiny_bpe_b, tmp_path):
    from edge_ensemble.eval.configs import build_configs

    head = switching_head(tiny_bpe, tiny_bpe_b, tmp_path, beta=0.5)
    configs, ensembles = build_configs([str(tiny_bpe), str(tiny_bpe_b)], ["route", "route-b0", "route-gated"],
                                       EnsembleConfig(n_ctx=512), head=str(head))
    try:
        by_name = {c.name: c.config for c in configs}
        assert [(by_name[n].beta, by_name[n].route_gate) for n in ("route", "route-b0", "route-gated")] == [
            (None, None), (0.0, None), (None, 0.5)]
        assert len({id(c.ensemble) for c in configs}) == 1  # one route-loaded ensemble serves all three
    finally:
        for e in ensembles:
            e.close()


def test_the_api_loads_the_router_with_hidden_states_and_routes(tiny_bpe, tiny_bpe_b, tmp_path):
    head = switching_head(tiny_bpe, tiny_bpe_b, tmp_path)
    with Ensemble([str(tiny_bpe_b), str(tiny_bpe)], policy="route", head=str(head), n_ctx=512) as ens:
        result = ens.generate("Hello", max_tokens=30)
        # the head names the roles: the router is the second member here
        assert [m.model.options.hidden_states for m in ens._members] == [False, True]
    assert sum(result.stats.routed_tokens.values()) >= result.stats.tokens
    assert {s.winner for s in result.provenance} <= {tiny_bpe.stem, tiny_bpe_b.stem}


# -- bad head files at the command line ------------------------------------------------------------------------


def test_bad_head_files_fail_in_one_line_before_any_model_loads(tiny_bpe, tiny_bpe_b, tiny_spm, tmp_path, monkeypatch):
    d = n_embd(tiny_bpe)
    good = tmp_path / "good.npz"
    make_head([tiny_bpe, tiny_bpe_b], tiny_bpe, np.zeros((2, d)), np.zeros(2)).save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) - 40])
    corrupt = bytearray(data)
    corrupt[len(corrupt) // 2: len(corrupt) // 2 + 64] = b"\xff" * 64
    (tmp_path / "corrupt.npz").write_bytes(bytes(corrupt))
    make_head([tiny_bpe, tiny_spm], tiny_bpe, np.zeros((2, d)), np.zeros(2)).save(tmp_path / "other-models.npz")
    make_head([tiny_bpe, tiny_bpe_b], tiny_spm, np.zeros((2, d)), np.zeros(2)).save(tmp_path / "other-router.npz")
    make_head([tiny_bpe, tiny_bpe_b], tiny_bpe, np.zeros((2, d + 1)), np.zeros(2)).save(tmp_path / "hidden.npz")
    loads: list[Path] = []
    real_init = Model.__init__

    def counting_init(self, path, options=LoadOptions()):  # a spy: full loads (not tokenizer probes)
        if not options.vocab_only:
            loads.append(Path(path))
        real_init(self, path, options)

    monkeypatch.setattr(Model, "__init__", counting_init)
    cases = {
        "truncated.npz": "corrupt or truncated",
        "corrupt.npz": "corrupt or truncated",
        "other-models.npz": f"trained for expert {tiny_spm.stem}",
        "other-router.npz": f"trained for router {tiny_spm.stem}",
        "hidden.npz": f"hidden states of size {d + 1}, but router",
        "missing.npz": "not found",
    }
    for name, words in cases.items():
        r = CliRunner().invoke(cli, ["run", "-m", str(tiny_bpe), "-m", str(tiny_bpe_b), "--policy", "route",
                                     "--head", str(tmp_path / name), "hi"])
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (name, r.output)
        assert words in lines[0] and "route train" in lines[0], (name, lines[0])
    assert loads == []  # nothing loaded half-way
    def never(*args, **kwargs):
        raise AssertionError("the members were located (a download, on a fresh machine) before the head was read")

    with monkeypatch.context() as m:
        m.setattr(Ensemble, "_resolve", never)
        for name in ("truncated.npz", "corrupt.npz", "missing.npz"):
            with pytest.raises(HeadFileError, match=cases[name]):
                Ensemble([str(tiny_bpe), str(tiny_bpe_b)], policy="route", head=str(tmp_path / name))
    for value in ("nan", "inf"):
        r = CliRunner().invoke(cli, ["route", "train", "-m", str(tiny_bpe), "-m", str(tiny_bpe_b), "--l2", value,
                                     "--out", str(tmp_path / "never.npz")])
        assert r.exit_code == 2 and "--l2 must be a finite number" in r.output, r.output
    r = CliRunner().invoke(cli, ["route", "train", "-m", str(tiny_bpe), "-m", str(tiny_bpe_b),
                                 "--out", str(tmp_path / "good.npz" / "head.npz")])
    assert r.exit_code == 2 and "not a directory" in r.output, r.output
    assert loads == []
    for name in ("truncated.npz", "corrupt.npz", "missing.npz"):  # eval checks the file before any ensemble loads
        r = CliRunner().invoke(cli, ["eval", "gsm8k", "-m", str(tiny_bpe), "-m", str(tiny_bpe_b), "--configs",
                                     "single,route", "--head", str(tmp_path / name), "--limit", "1",
                                     "--out", str(tmp_path / "eval"), "--no-plot"])
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1 and cases[name] in lines[0], (name, r.output)
    assert loads == []
    r = CliRunner().invoke(cli, ["run", "-m", str(tiny_bpe), "-m", str(tiny_bpe_b), "--policy", "route", "hi"])
    assert r.exit_code == 2 and "--head FILE" in r.output
    r = CliRunner().invoke(cli, ["run", "-m", str(tiny_bpe), "-m", str(tiny_bpe_b), "--policy", "route",
                                 "--head", str(good), "--max-tokens", "5", "hi"])
    assert r.exit_code == 0, r.output
    assert len(loads) == 2


# -- training --------------------------------------------------------------------------------------------------


def greedy_items(tiny_bpe, tiny_bpe_b, n: int = 9) -> list[TrainItem]:
    """Items whose references are one tiny model's or the other's greedy answer: each expert is right often."""
    items = []
    for i in range(n):
        ask = [{"role": "user", "content": f"Question {i}: tell me about the number {i}."}]
        _, text = greedy_tokens(tiny_bpe if i % 2 else tiny_bpe_b, ask, 40)
        shared = [{"role": "user", "content": "Question : tell me about the number ."}] if i % 3 else None
        items.append(TrainItem("syn", str(i), ask, text, shared))
    return items


def test_training_set_and_head_are_deterministic_and_the_build_resumes(tiny_bpe, tiny_bpe_b, tmp_path, monkeypatch):
    items = greedy_items(tiny_bpe, tiny_bpe_b)
    models = load_models([tiny_bpe, tiny_bpe_b], tiny_bpe, ["a", "b"], "a", n_ctx=1024)
    try:
        first = build_features(models, items, tmp_path / "one")
        calls = []
        real = route_train.item_features
        monkeypatch.setattr(route_train, "item_features", lambda m, it: (calls.append(it.key), real(m, it))[1])

        def interrupt(done, total, decoded, seconds):
            if done == 4:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            build_features(models, items, tmp_path / "two", interrupt)
        assert len(calls) == 4
        second = build_features(models, items, tmp_path / "two")  # resumes: only the rest is decoded
        assert len(calls) == len(items)
        backwards = build_features(models, items[::-1], tmp_path / "three")[::-1]  # another order, same features
    finally:
        models.close()
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second] == [p.read_bytes() for p in backwards]
    heads = []
    for name in ("h1.npz", "h2.npz"):
        result = fit_from_features(second, models, seed=3, date=DATE, training_data="synthetic")
        result.head.save(tmp_path / name)
        heads.append((tmp_path / name).read_bytes())
    assert heads[0] == heads[1]
    assert result.report["positions"]["informative_train"] > 0
    accuracy = result.report["token_accuracy_test"]
    if accuracy:  # a fitted beta of 0 is the "route beta=0" row itself, not listed a second time
        assert "route beta=0" in accuracy
        assert len([k for k in accuracy if k.endswith("(fitted)")]) == (result.head.beta != 0)
    assert fit_from_features(second, models, seed=4, date=DATE).report["items"]["test"] >= 1


def test_training_features_are_the_hidden_states_routing_reads(tiny_bpe, tiny_bpe_b, tmp_path):
    """The head is trained on teacher-forced hidden states and reads step-by-step ones: the same vectors."""
    items = greedy_items(tiny_bpe, tiny_bpe_b, n=2)
    models = load_models([tiny_bpe, tiny_bpe_b], tiny_bpe, ["a", "b"], "a", n_ctx=1024)
    try:
        feats = route_train.item_features(models, items[0])
        router = models.router
        prompt = router.prompt_tokens(router.render_chat(items[0].messages))
        ref = list(feats["ref"])
        for row, p in list(zip(range(len(feats["decisive"])), feats["decisive"]))[:5]:
            router.reset()
            router.decode(prompt[:-1], want=None)
            tokens = [prompt[-1], *ref[:p]]
            for t in tokens[:-1]:
                router.decode([t], want=None)
            step = router.decode_many([SeqRequest(0, tokens[-1:], "last")]).hidden[0][-1]
            np.testing.assert_allclose(feats["hidden"][row], step, rtol=1e-4, atol=1e-4)
    finally:
        models.close()


def test_train_router_writes_a_head_the_policy_reads(tiny_bpe, tiny_bpe_b, tmp_path, monkeypatch):
    items = greedy_items(tiny_bpe, tiny_bpe_b)
    monkeypatch.setattr(route_train, "training_items", lambda gsm8k, mbpp: items)
    out = tmp_path / "head.npz"
    r = CliRunner().invoke(cli, ["route", "train", "-m", str(tiny_bpe), "-m", str(tiny_bpe_b), "--router",
                                 str(tiny_bpe), "--out", str(out), "--cache", str(tmp_path / "cache"), "--n-ctx", "1024"])
    assert r.exit_code == 0, r.output
    assert "router accuracy on test informative positions" in r.output and out.with_name("head.npz.md").exists()
    head = load_head(out)
    assert head.expert_sha256 == (file_sha256(tiny_bpe), file_sha256(tiny_bpe_b))
    assert head.router_sha256 == file_sha256(tiny_bpe) and head.hidden_size == n_embd(tiny_bpe)
    assert head.beta in route_train.BETA_GRID and head.training_data and head.date
    r = CliRunner().invoke(cli, ["run", "-m", str(tiny_bpe), "-m", str(tiny_bpe_b), "--policy", "route", "--head",
                                 str(out), "--max-tokens", "8", "--json", "hi"])
    assert r.exit_code == 0, r.output
    # the API function, with a fixed date: the same bytes again
    again = tmp_path / "again.npz"
    train_router([str(tiny_bpe), str(tiny_bpe_b)], str(tiny_bpe), again, cache_dir=tmp_path / "cache", n_ctx=1024,
                 date=head.date)
    assert again.read_bytes() == out.read_bytes()


def test_route_train_in_shards_then_one_fit_equals_one_run(tiny_bpe, tiny_bpe_b, tmp_path, monkeypatch):
    items = greedy_items(tiny_bpe, tiny_bpe_b)
    monkeypatch.setattr(route_train, "training_items", lambda gsm8k, mbpp: items)
    args = ["route", "train", "-m", str(tiny_bpe), "-m", str(tiny_bpe_b), "--router", str(tiny_bpe),
            "--cache", str(tmp_path / "shared"), "--n-ctx", "1024"]
    for k in range(2):
        r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "never.npz"), "--shard", f"{k}/2"])
        assert r.exit_code == 0 and "once every shard is done" in r.output, r.output
    assert not (tmp_path / "never.npz").exists()
    assert len(list((tmp_path / "shared").rglob("*.npz"))) == len(items)
    common = dict(cache_dir=tmp_path / "shared", n_ctx=1024, date="2026-01-02")
    joined = train_router([str(tiny_bpe), str(tiny_bpe_b)], str(tiny_bpe), tmp_path / "joined.npz", **common)
    assert joined.report["seconds"]["decoded_items"] == 0  # every item came from the shards
    alone = train_router([str(tiny_bpe), str(tiny_bpe_b)], str(tiny_bpe), tmp_path / "alone.npz",
                         **{**common, "cache_dir": tmp_path / "alone"})
    assert (tmp_path / "joined.npz").read_bytes() == (tmp_path / "alone.npz").read_bytes()
    r = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "x.npz"), "--shard", "3/2"])
    assert r.exit_code == 2 and "--shard must be K/N" in r.output


def test_route_train_refuses_experts_with_other_tokenizers_or_one_expert_before_a_full_load(tiny_bpe, tiny_spm,
                                                                                           monkeypatch):
    from edge_ensemble.errors import IncompatibleMembersError

    loads: list[Path] = []
    real_init = Model.__init__

    def counting_init(self, path, options=LoadOptions()):
        if not options.vocab_only:
            loads.append(Path(path))
        real_init(self, path, options)

    monkeypatch.setattr(Model, "__init__", counting_init)
    with pytest.raises(IncompatibleMembersError, match="share one tokenizer"):
        load_models([tiny_bpe, tiny_spm], tiny_bpe, ["a", "b"], "a", n_ctx=256)
    with pytest.raises(UsageError, match="two or more experts"):
        load_models([tiny_bpe], tiny_bpe, ["a"], "a", n_ctx=256)
    assert loads == []


def test_training_data_are_outside_the_evaluation_slices():
    pytest.importorskip("edge_ensemble.eval.tasks")
    items = route_train.training_items(3, 2)
    assert [i.key for i in items] == ["gsm8k-200", "gsm8k-201", "gsm8k-202", "mbpp-11", "mbpp-12"]
    assert items[0].reference.endswith(f"The answer is {items[0].reference.rsplit(' ', 1)[1]}")
    assert "<<" not in items[0].reference and "####" not in items[0].reference
    assert items[3].reference.startswith("```python\ndef ") and "\r" not in items[3].reference
    with pytest.raises(UsageError):
        route_train.training_items(0, 0)


# -- real models -----------------------------------------------------------------------------------------------

PROMPTS = {
    "english": "Explain in two sentences why the sky is blue.",
    "python": "Write a Python function that returns the n-th Fibonacci number.",
    "chinese": "请用两句话介绍一下长城。",
    "emoji": "Describe a sunny day at the beach using lots of emoji 🌞🏖️.",
}


@pytest.mark.real
def test_coder_pair_always_the_first_expert_equals_it_alone(real_models, tmp_path):
    """Both ways round: always the 1.5B (the router 0.5B only routes; the 1.5B decodes every token) and always
    the 0.5B (the router writes too), beta 0: each writes exactly what it writes alone."""
    big, small = real_models("qwen2.5-coder-1.5b-instruct"), real_models("qwen2.5-coder-0.5b-instruct")
    d = n_embd(small)
    cfg = EnsembleConfig(n_ctx=1024, check_memory=False)
    heads = {}
    for expert0, other in ((big, small), (small, big)):
        heads[expert0] = tmp_path / f"always-{expert0.stem}.npz"
        make_head([expert0, other], small, np.zeros((2, d)), np.array([1.0, 0.0]), beta=0.5).save(heads[expert0])
    want = {}
    for expert0 in heads:
        with Ensemble([str(expert0)], config=cfg) as alone:
            want[expert0] = {k: alone.generate(p, max_tokens=24, policy="single").text for k, p in PROMPTS.items()}
    with Ensemble([str(big), str(small)], config=cfg, policy="route", head=str(heads[big])) as routed:
        for i, expert0 in enumerate(heads):
            for overlap in (False, True) if expert0 == big else (False,):  # overlap: the 1.5B steps in a thread
                for k, p in PROMPTS.items():
                    result = routed.generate(p, max_tokens=24, head=str(heads[expert0]), beta=0.0, overlap=overlap)
                    assert result.text == want[expert0][k], (expert0.name, overlap, k)
                    assert {s.winner for s in result.provenance} == {routed._members[i].name}


def test_each_context_size_has_its_own_feature_cache(tiny_bpe, tiny_bpe_b, tmp_path):
    """Which items fit depends on the context size, so each size has its own feature cache: an item skipped
    ("longer than the context") at a small one is decoded at a larger one, and skipped again at the small one."""
    [item] = greedy_items(tiny_bpe, tiny_bpe_b, n=1)
    item = dataclasses.replace(item, reference=item.reference * 20)  # longer than 256 tokens (llama.cpp's least n_ctx)
    for n_ctx, skipped in ((256, True), (2048, False), (256, True)):
        models = load_models([tiny_bpe, tiny_bpe_b], tiny_bpe, ["a", "b"], "a", n_ctx=n_ctx)
        try:
            assert models.router.n_ctx == n_ctx
            [path] = build_features(models, [item], tmp_path)
        finally:
            models.close()
        with np.load(path) as data:
            assert ("skipped" in data.files) is skipped, n_ctx
