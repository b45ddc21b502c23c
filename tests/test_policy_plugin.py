"""A policy defined only here, registered as a plugin is, and run through the API, `run` and `eval` — the example of
docs/writing-a-policy.md, which walks through this file. Nothing else in the package knows it exists."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import CliRunner

from edge_ensemble import Ensemble
from edge_ensemble.options import Option
from edge_ensemble.policies import ContextFull, EvalConfig, Piece, Policy, PolicyStats, option, register, registry

# -- the policy (docs/writing-a-policy.md, step by step) -------------------------------------------------------

MARGIN = Option("margin", float, 0.2, "Another member writes a token only where its top-1 probability beats the "
                "drafter's by more than this.", range=(0.0, 1.0))


@dataclass(frozen=True)
class ConfidentOptions:
    """most-confident's options."""

    margin: float = option(MARGIN)


@dataclass
class ConfidentStats(PolicyStats):
    """Counts of a most-confident answer (``ensembled``: tokens another member wrote)."""

    consulted: int = 0  # tokens every member was asked about

    def figures(self, tokens: int) -> dict[str, Any]:
        return {"consulted_tokens": self.consulted}

    def summary(self, figures: dict[str, Any]) -> list[str]:
        return [f"{figures['consulted_tokens']} tokens consulted"]


class MostConfident(Policy):
    """Every token is written by the member most sure of its own next token (the drafter keeps it within
    ``margin``). The members must share one tokenizer: each token is one id of it."""

    name = "most-confident"
    summary = "the member most sure of its next token writes it"
    Options = ConfidentOptions
    Stats = ConfidentStats
    options: ConfidentOptions
    stats: ConfidentStats
    shared_tokenizer = True
    eval_configs = (EvalConfig("most-confident"), EvalConfig("most-confident-0", {"margin": 0.0}, by_default=False))

    def start(self) -> None:
        self.tokens: list[int] = []  # the accepted tokens after each member's prompt (one tokenizer: same ids)

    def step(self, budget: int) -> list[Piece]:
        # Each member's next-token distribution after the text (a lagging member catches up in one decode).
        dists = [self.next_dist(lane, self.tokens) for lane in self.lanes]
        self.stats.consulted += 1
        best = max(range(len(dists)), key=lambda i: dists[i].top1)
        if best != 0 and dists[best].top1 <= dists[0].top1 + self.options.margin:
            best = 0  # the drafter keeps the token within the margin
        lane, token = self.lanes[best], self.pick(dists[best])
        kind = "draft" if best == 0 else "ensemble"
        if best != 0:
            self.stats.ensembled += 1
        if lane.member.is_eog(token):
            return [Piece(b"", kind, lane.name, end=True)]
        if self.lanes[0].room < 1:
            raise ContextFull
        self.tokens.append(token)
        return [Piece(lane.member.token_bytes(token), kind, lane.name if best else None)]


@pytest.fixture
def most_confident() -> Iterator[type[MostConfident]]:
    register(MostConfident)
    yield MostConfident
    registry.unregister(MostConfident.name)


# -- the checks -------------------------------------------------------------------------------------------------

ASK = "Count from one to five."


def test_a_policy_defined_here_runs_through_the_api(most_confident, tiny_bpe, tiny_bpe_b):
    with Ensemble([tiny_bpe], n_ctx=512, check_memory=False) as alone:
        single = alone.generate(ASK, max_tokens=24, policy="single")
        # one member: the drafter writes every token, so the answer is plain greedy decoding
        assert alone.generate(ASK, max_tokens=24, policy="most-confident").text == single.text
    with Ensemble([tiny_bpe, tiny_bpe_b], n_ctx=512, check_memory=False, policy="most-confident") as ens:
        result = ens.generate(ASK, max_tokens=24, margin=0.0)
        assert result.stats.policy == "most-confident"
        assert result.stats.consulted_tokens == result.stats.tokens > 0  # its own figure, passed through
        assert result.to_dict()["stats"]["consulted_tokens"] == result.stats.tokens
        written = {s.winner for s in result.provenance if s.kind == "ensemble"}
        assert written <= {ens.members[1].name}
        # its option is checked by its own declaration, in one line
        with pytest.raises(Exception, match=r"^margin must be a number between 0\.0 and 1\.0; got 2$"):
            ens.generate(ASK, max_tokens=4, margin=2)


def test_a_policy_defined_here_runs_through_run(most_confident, tiny_bpe, tiny_bpe_b):
    from edge_ensemble.cli import cli

    args = ["run", "-m", str(tiny_bpe), "-m", str(tiny_bpe_b), "--n-ctx", "512", "--max-tokens", "16",
            "--policy", "most-confident", "--json", ASK]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["stats"]["policy"] == "most-confident" and out["stats"]["consulted_tokens"] > 0
    r = CliRunner().invoke(cli, args[:-2] + [ASK])
    assert r.exit_code == 0 and "tokens consulted" in r.stderr, r.output  # its own part of the footer


def test_a_policy_defined_here_runs_through_eval(most_confident, tiny_bpe, tiny_bpe_b, tmp_path: Path):
    from edge_ensemble.cli import cli

    r = CliRunner().invoke(cli, ["eval", "gsm8k", "-m", str(tiny_bpe), "-m", str(tiny_bpe_b), "--configs",
                                 "single,most-confident,most-confident-0", "--limit", "2", "--max-tokens", "8",
                                 "--out", str(tmp_path), "--no-plot"])
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in (tmp_path / "gsm8k.jsonl").read_text().splitlines()]
    assert {r["config"] for r in records} >= {"most-confident", "most-confident-0"}
    assert "most-confident-0" in (tmp_path / "summary.md").read_text()
