"""`calibrate --policy vote`: the replay of a vote setting over one draw of every answer (hand-made records, and
against real runs of the policy on a real llama.cpp context), the rule that chooses on the fit items and checks on
the others, the written table that the next run picks up, and bad sweep flags (one line, exit 2, nothing
written)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edge_ensemble import Ensemble
from edge_ensemble.cli import cli
from edge_ensemble.config import load_config
from edge_ensemble.eval.calibrate import write_calibration
from edge_ensemble.eval.calibrate_vote import (DRAW, SliceScore, StepTimes, VoteScore, VoteSetting, VoteSweep, choose,
                                               replay_calibration, replay_item, settings)

TIMES = StepTimes(one=0.01, batch_time=0.04, batch=7)
DRAFTER = "Tiny"


def branch(answer: str | None, confidence: float = 8.0, tokens: int = 10, gold: str = "1") -> dict[str, Any]:
    return {"answer": answer, "confidence": confidence, "tokens": tokens, "correct": answer == gold}


def draw(first: dict[str, Any], samples: list[dict[str, Any]], item: str = "0") -> dict[str, Any]:
    return {"task": "t", "item": item, "config": DRAW, "branches": [first, *samples], "seconds": 1.0}


def test_an_accepting_gate_returns_the_first_answer_at_the_cost_of_one() -> None:
    rec = draw(branch("2", confidence=9.0, tokens=30), [branch("1")] * 7)
    got = replay_item(rec, VoteSetting(8.5, 4, 8, "beta", "majority"), TIMES)
    assert (got.answer, got.right, got.samples, got.tokens) == ("2", False, 1, 30)
    assert got.seconds == pytest.approx(30 * 0.01)
    # below the gate: the samples outvote it
    voted = replay_item(rec, VoteSetting(9.5, 4, 8, "beta", "majority"), TIMES)
    assert voted.answer == "1" and voted.right and voted.samples > 1


def test_a_first_answer_without_an_answer_is_accepted_only_by_always() -> None:
    rec = draw(branch(None, confidence=99.0), [branch("1")] * 7)
    assert replay_item(rec, VoteSetting(8.5, 4, 8, "none", "majority"), TIMES).samples == 8
    assert replay_item(rec, VoteSetting(0.0, 4, 8, "none", "majority"), TIMES).samples == 1


def test_windows_stop_by_the_rule_and_the_cap_and_cost_the_longest_sample() -> None:
    samples = [branch("1", tokens=10), branch("1", tokens=20), branch("3"), branch("1"), branch("1"), branch("1"),
               branch("1")]
    rec = draw(branch("1", confidence=1.0, tokens=5), samples)
    unanimous2 = replay_item(rec, VoteSetting(None, 2, 8, "unanimous", "majority"), TIMES)
    assert unanimous2.samples == 3  # the first window [1, 1] is unanimous
    assert unanimous2.seconds == pytest.approx(5 * 0.01 + 20 * (0.01 + 0.03 / 6))
    assert unanimous2.tokens == 5 + 10 + 20
    unanimous3 = replay_item(rec, VoteSetting(None, 3, 8, "unanimous", "majority"), TIMES)
    assert unanimous3.samples == 7  # [1, 1, 3] disagrees, [1, 1, 1] stops
    assert replay_item(rec, VoteSetting(None, 4, 5, "none", "majority"), TIMES).samples == 5  # the cap
    assert replay_item(rec, VoteSetting(None, 2, 8, "none", "majority"), TIMES).samples == 8


def test_confidence_weighting_can_overturn_a_majority() -> None:
    samples = [branch("2", confidence=5.0), branch("2", confidence=5.0), branch("1", confidence=12.0)]
    rec = draw(branch("1", confidence=12.0), samples + [branch(None)] * 4)
    majority = replay_item(rec, VoteSetting(None, 3, 4, "none", "majority"), TIMES)
    weighted = replay_item(rec, VoteSetting(None, 3, 4, "none", "confidence", 0.5), TIMES)
    assert majority.answer == "1"  # a tie 2-2 goes to the answer with the more confident sample
    assert weighted.answer == "1" and weighted.right
    rec2 = draw(branch("1", confidence=6.0), [branch("2", confidence=5.0), branch("2", confidence=5.0),
                                               branch("1", confidence=12.0), branch("2", confidence=5.0)] + [branch(None)] * 3)
    assert replay_item(rec2, VoteSetting(None, 4, 5, "none", "majority"), TIMES).answer == "2"
    assert replay_item(rec2, VoteSetting(None, 4, 5, "none", "confidence", 0.5), TIMES).answer == "1"


def test_the_sweep_skips_windows_the_cap_cannot_hold_and_always_tries_no_gate() -> None:
    got = settings(VoteSweep(windows=(2, 4), caps=(3, 8), stoppings=("beta",), weightings=("majority",)).validate(),
                   [6.0, 7.0, 8.0, 9.0])
    assert {s.vote_gate for s in got} >= {None}
    assert not any(s.max_samples == 3 and s.window == 4 for s in got)
    assert any(s.max_samples == 8 and s.window == 4 for s in got)


def _score(won: int, lost: int, seconds: float, check: tuple[int, int] | None = (1, 0), name: float = 1.0) -> VoteScore:
    fit = SliceScore(100, 30 + won - lost, won, lost, seconds=seconds)
    return VoteScore(VoteSetting(name, 4, 8, "beta", "majority"), fit,
                     SliceScore(100, 30 + check[0] - check[1], *check) if check else None)


def test_the_rule_takes_the_cheapest_significant_gain_and_checks_it() -> None:
    slow_big, cheap_sig, cheap_insig = _score(20, 2, 30.0, name=1), _score(12, 1, 12.0, name=2), _score(3, 0, 8.0, name=3)
    sweep = VoteSweep().validate()
    chosen, candidates, why = choose([slow_big, cheap_sig, cheap_insig], sweep, None)
    assert chosen is cheap_sig and set(map(id, candidates)) == {id(slow_big), id(cheap_sig)} and why == ""
    # without the significance test the cheapest gain wins
    chosen, _, _ = choose([slow_big, cheap_sig, cheap_insig], VoteSweep(significance=None).validate(), None)
    assert chosen is cheap_insig
    # a fit winner that does not hold on the check items: the drafter alone, with the reason
    failing = _score(12, 1, 12.0, check=(2, 3))
    chosen, _, why = choose([failing], sweep, None)
    assert chosen is None and "check items" in why
    chosen, _, why = choose([cheap_insig], sweep, None)
    assert chosen is None and "p < 0.05" in why


def _records(n: int, win_from: int) -> list[dict[str, Any]]:
    """n items: the drafter (and so the first answer, at low confidence) right on items below win_from; from there
    the first answer is wrong and the samples agree on the right one."""
    out = []
    for i in range(n):
        right_first = i < win_from
        first = branch("1" if right_first else "9", confidence=9.0 if right_first else 6.0, tokens=20)
        out.append(draw(first, [branch("1", tokens=25)] * 7, item=str(i)))
        out.append({"task": "t", "item": str(i), "config": f"single:{DRAFTER}", "correct": right_first,
                    "tokens": 20, "seconds": 0.2})
    return out


def test_a_calibration_that_wins_writes_a_vote_table_the_next_run_picks_up(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    records = _records(40, win_from=20)  # items 20-39: the vote wins every one
    ids = [str(i) for i in range(40)]
    ids = ids[::2] + ids[1::2]  # fit and check both hold winning items
    result = replay_calibration(records, "t", ids, VoteSweep(windows=(2,), caps=(5,)).validate(), key=("presets", "tiny"),
                                dev_set="t items 0-39", records_path=tmp_path / "t.jsonl", drafter_name=DRAFTER,
                                sample_temperature=0.6)
    assert result.chosen is not None and result.chosen.fit.won == 10 and result.chosen.fit.lost == 0
    # the cheapest winner accepts the confident (right) first answers: a gate between 6 and 9
    assert result.chosen.setting.vote_gate is not None and 6.0 < result.chosen.setting.vote_gate <= 9.0
    assert result.chosen.check is not None and result.chosen.check.won == 10
    table = result.table()
    assert table["policy"] == "vote" and table["window"] == 2 and table["max_samples"] == 5
    assert "| single:Tiny (measured) |" in result.markdown()
    config = tmp_path / "config.toml"
    write_calibration(result, config)
    values = load_config(config).calibrations[("presets", "tiny")].values
    assert values["policy"] == "vote" and values["vote_gate"] == table["vote_gate"] and values["stopping"] == table["stopping"]


def test_a_calibration_without_a_significant_winner_keeps_the_drafter(tmp_path: Path) -> None:
    records = _records(10, win_from=9)  # one winning item only
    result = replay_calibration(records, "t", [str(i) for i in range(10)], VoteSweep().validate(),
                                key=("presets", "tiny"), dev_set="t", records_path=tmp_path / "t.jsonl",
                                drafter_name=DRAFTER, sample_temperature=0.6)
    assert result.chosen is None and result.table()["policy"] == "single" and "p < 0.05" in result.why


# -- the replay against real runs of the policy ------------------------------------------------------------------


def _first_char(text: str) -> str | None:
    """A coarse answer (a few distinct values on a tiny model's text), so that windows agree and disagree."""
    stripped = text.strip()
    return stripped[0] if stripped else None


@pytest.mark.parametrize("prompt", ["Why is the sky blue?", "def add(a, b):", "日本の首都は", "🙂🙃 emoji"])
def test_the_replay_is_what_the_policy_does(prompt: str, tiny_bpe) -> None:
    """Each sample draws from its own generator, so a setting's samples are the first ones of the draw: the
    replayed samples, tokens and answer equal a real run of the setting (on this model's exact numerics)."""
    common = dict(max_tokens=12, seed=7, extract=_first_char, sample_temperature=1.5)
    with Ensemble([tiny_bpe], n_ctx=4096, check_memory=False, policy="vote", window=7) as ens:
        full = ens.generate(prompt, vote_gate="never", stopping="none", window=7, max_samples=8, **common)
        rec = draw(*(lambda b: (b[0], b[1:]))([{"answer": b.answer, "confidence": b.confidence, "tokens": b.tokens,
                                                 "correct": False} for b in full.branches]))
        first_conf = full.branches[0].confidence
        cases = [VoteSetting(None, 2, 8, "unanimous", "majority"), VoteSetting(None, 3, 5, "beta", "confidence", 0.5),
                 VoteSetting(None, 4, 8, "none", "filter"), VoteSetting(first_conf - 1e-3, 2, 8, "beta", "majority"),
                 VoteSetting(first_conf + 1e-3, 2, 8, "unanimous", "majority")]
        for s in cases:
            real = ens.generate(prompt, vote_gate="never" if s.vote_gate is None else s.vote_gate, window=s.window,
                                max_samples=s.max_samples, stopping=s.stopping, weighting=s.weighting,
                                weight_temperature=s.weight_temperature, **common)
            got = replay_item(rec, s, TIMES)
            chosen = [b.answer for b in real.branches if b.chosen]
            assert got.samples == real.stats.samples, s
            assert got.tokens == sum(b.tokens for b in real.branches), s
            assert [got.answer] == chosen, (s, chosen, [b.answer for b in full.branches])


# -- the command line ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (["--policy", "vote", "--gates", "0.5"], "--gates sweeps the safe policy"),
    (["--windows", "2"], "--windows sweeps the vote policy"),
    (["--policy", "vote", "--windows", "0"], "--windows must be"),
    (["--policy", "vote", "--caps", "9"], "--caps must be"),
    (["--policy", "vote", "--windows", "2,2"], "repeats a value"),
    (["--policy", "vote", "--vote-gates", "-1"], "--vote-gates must be"),
    (["--policy", "vote", "--significance", "2"], "--significance must be"),
    (["--policy", "vote", "--fit-items", "50", "--limit", "4"], "--fit-items 50 is more than the 4 items"),
])
def test_bad_vote_sweeps_are_one_line_and_write_nothing(args: list[str], needle: str, tiny_bpe,
                                                        tmp_path: Path) -> None:
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"prompt": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(6)))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["calibrate", "-m", str(tiny_bpe), "--file", str(dev), "--out", str(out),
                                      "--no-write", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.output, result.output
    assert not out.exists()


def test_calibrate_vote_runs_the_draw_and_reports(tiny_bpe, tmp_path: Path) -> None:
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"prompt": f"What is {i} plus 1?", "answer": str(i + 1)}) + "\n"
                           for i in range(4)))
    out = tmp_path / "out"
    args = ["calibrate", "--policy", "vote", "-m", str(tiny_bpe), "--file", str(dev), "--out", str(out),
            "--no-write", "--max-tokens", "8", "--json", "--significance", "off"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["items"] == 4 and got["fitted_on"].startswith("2 items") and got["config_file"] is None
    (path,) = out.glob("*.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted({r["config"] for r in records}) == [got["evidence"][0]["setting"], DRAW]
    assert all(len(r["branches"]) == 8 for r in records if r["config"] == DRAW)
    assert (out / "summary.md").read_text().startswith("# Vote calibration")
    # resumed: nothing is drawn again, the same choice
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and json.loads(again.stdout)["chosen"] == got["chosen"]
    assert len(path.read_text().splitlines()) == len(records)


def test_a_vote_record_that_drew_every_answer_is_a_draw_and_vote_all_is_preferred(tmp_path: Path) -> None:
    records = _records(4, win_from=4)
    for r in records:  # the same items as other vote configurations' records
        if r["config"] == DRAW:
            r.update(config="vote", settings={"sample_temperature": 0.6, "sample_from": "first", "kill": None})
    killed = dict(records[0], settings={"sample_temperature": 0.6, "sample_from": "first", "kill": 10.0})
    other_t = dict(records[0], item="9", settings={"sample_temperature": 1.0, "sample_from": "first", "kill": None})
    short = dict(records[0], item="8", branches=records[0]["branches"][:4])
    drawn = draw(branch("1", confidence=20.0), [branch("1")] * 7, item="0")  # eval's own draw of item 0
    common = dict(key=("presets", "tiny"), dev_set="t", records_path=tmp_path / "t.jsonl", drafter_name=DRAFTER,
                  sample_temperature=0.6)
    ids = ["0", "1", "2", "3", "8", "9"]
    result = replay_calibration([killed, *records, other_t, short, drawn], "t", ids, VoteSweep().validate(), **common)
    assert result.items == 4  # items 8 (4 answers) and 9 (another temperature) have no draw
    never = next(s for s in result.scores if s.setting.vote_gate is None)
    assert never.fit.n == 2 and never.fit.samples > 1
    # item 0's vote-all record, not the vote record before it, is the draw: its first answer is confident
    top_gate = max(s.setting.vote_gate for s in result.scores if s.setting.vote_gate is not None)
    assert top_gate > 6.0  # (the gates are percentiles of the fit items' first confidences: 20 and 6, not 6 and 6)
