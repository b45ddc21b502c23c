"""The conversation log (:mod:`edge_ensemble.logs`, ``edge-ensemble logs``): its schema and migrations, what
``run``, ``chat`` and the server write into it, and what happens when the database is busy, read-only, damaged,
shared by two processes or left by a killed one.

Every test logs into a database of its own: ``conftest._clean_env`` points ``EDGE_ENSEMBLE_LOGS`` at a fresh path.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from edge_ensemble import paths
from edge_ensemble.cli import cli
from edge_ensemble.logs import MIGRATIONS, SCHEMA_VERSION, Exchange, Logbook, LogError

COMMON = ["--max-tokens", "8", "--n-ctx", "256", "--threads", "1"]


def log_path() -> Path:
    return paths.logs_path()


def invoke(args: list[str], input: str | None = None) -> Result:
    return CliRunner().invoke(cli, args, input=input)


def entry(prompt: str = "What is 2+2?", answer: str = "4", **kw: Any) -> Exchange:
    fields: dict[str, Any] = dict(source="run", prompt=prompt, answer=answer, finish_reason="stop",
                                  members=[{"name": "tiny-bpe", "role": "drafter"}], policy="safe",
                                  stats={"tokens": 1, "tokens_per_second": 10.0, "ensembled_fraction": 0.0},
                                  provenance=[{"kind": "draft", "text": answer, "winner": None}])
    return Exchange(**{**fields, **kw})


def warnings_of(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]


@pytest.fixture
def models(tiny_bpe: Path, tiny_bpe_b: Path) -> list[str]:
    return ["-m", str(tiny_bpe), "-m", str(tiny_bpe_b)]


# -- the schema -------------------------------------------------------------------------------------------------


def test_the_log_path_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGE_ENSEMBLE_LOGS", str(tmp_path / "mine.db"))
    assert paths.logs_path() == tmp_path / "mine.db"
    monkeypatch.delenv("EDGE_ENSEMBLE_LOGS")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert paths.logs_path() == tmp_path / "data" / "edge-ensemble" / "logs.db"
    result = invoke(["logs", "path"])
    assert result.exit_code == 0 and result.stdout == f"{tmp_path / 'data' / 'edge-ensemble' / 'logs.db'}\n"


def test_a_new_log_has_the_current_schema_in_wal_mode_private_to_its_owner(tmp_path: Path) -> None:
    book = Logbook(tmp_path / "new" / "logs.db")
    assert book.add(entry()) == 1
    with sqlite3.connect(book.path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        columns = {row[1] for row in conn.execute("PRAGMA table_info(exchanges)")}
    assert {"id", "time", "source", "conversation", "prompt", "messages", "answer", "members", "policy", "options",
            "stats", "provenance", "branches", "finish_reason"} <= columns
    assert book.path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("version", [0, 1])
def test_an_older_log_is_migrated_and_keeps_its_rows(tmp_path: Path, version: int) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # as the code of that version made it: version 0 is an empty database
        for statements in MIGRATIONS[:version]:
            for statement in statements:
                conn.execute(statement)
        if version:
            conn.execute("INSERT INTO exchanges (time, source, prompt, answer, members, policy, options, stats) "
                         "VALUES ('2026-01-01T00:00:00.000Z', 'run', 'old prompt', 'old answer', '[]', 'single', "
                         "'{}', '{\"tokens\": 2}')")
        conn.execute(f"PRAGMA user_version = {version}")
    conn.close()
    book = Logbook(path)
    rows = book.recent(0)
    assert [(e.prompt, e.answer, e.stats, e.provenance, e.branches) for e in rows] == (
        [("old prompt", "old answer", {"tokens": 2}, [], None)] if version else [])
    new = book.add(entry(branches=[{"index": 0, "chosen": True}]))
    assert book.get(new).branches == [{"index": 0, "chosen": True}]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_a_log_from_a_newer_version_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(LogError, match=f"newer edge-ensemble.*mv {path} {path}.bad"):
        Logbook(path).recent()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1


# -- what run, chat and the server write ------------------------------------------------------------------------


def test_run_logs_its_exchange_after_the_answer(models: list[str], tiny_bpe: Path) -> None:
    result = invoke(["run", *models, *COMMON, "-s", "Be brief.", "Name a colour."])
    assert result.exit_code == 0, result.output
    [logged] = Logbook().recent()
    assert logged.source == "run" and logged.id == 1 and logged.conversation is None
    assert logged.prompt == "Name a colour." and logged.answer == result.stdout.rstrip("\n") and logged.answer
    assert logged.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    assert [m["name"] for m in logged.members] == ["tiny-bpe", "tiny-bpe-b"] and logged.members[0]["role"] == "drafter"
    assert logged.members[0]["path"] == str(tiny_bpe)
    assert logged.policy == logged.stats["policy"] == "safe"
    assert logged.options["max_tokens"] == 8 and logged.options["draft_len"] == 5  # generation and policy options
    assert logged.stats["tokens"] == 8 and logged.finish_reason == "length"
    assert "".join(p["text"] for p in logged.provenance) == logged.answer
    assert any(p["winner"] for p in logged.provenance)  # the tiny pair disagrees: some stretch was ensembled
    assert datetime.fromisoformat(logged.time.replace("Z", "+00:00")).tzinfo is not None

    raw = invoke(["run", *models, *COMMON, "--raw", "--json", "Once upon a time"])
    assert raw.exit_code == 0, raw.output
    second = Logbook().get(2)
    assert second is not None and second.messages is None and second.prompt == "Once upon a time"
    assert second.answer == json.loads(raw.stdout)["text"]


def test_no_log_and_log_false_write_nothing(models: list[str], _no_config_path: Path) -> None:
    result = invoke(["run", *models, *COMMON, "--no-log", "Hello"])
    assert result.exit_code == 0 and result.stdout.strip()
    assert not log_path().exists() and not log_path().parent.joinpath("logs.db-wal").exists()
    _no_config_path.write_text("log = false\n")
    assert invoke(["run", *models, *COMMON, "Hello"]).exit_code == 0
    assert not log_path().exists()
    assert invoke(["run", *models, *COMMON, "--log", "Hello"]).exit_code == 0  # the flag over the file
    assert len(Logbook().recent()) == 1
    _no_config_path.write_text("log = 3\n")
    bad = invoke(["run", *models, *COMMON, "Hello"])
    assert bad.exit_code == 2 and "log must be true or false; got 3" in bad.stderr


def test_chat_turns_share_a_conversation_and_continue_resumes_it(models: list[str]) -> None:
    result = invoke(["chat", *models, *COMMON], input="Hello\nAnd then?\n/exit\n")
    assert result.exit_code == 0, result.output
    first, second = Logbook().recent()
    assert first.source == second.source == "chat"
    assert first.conversation == second.conversation and first.conversation
    assert second.messages == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.answer},
                               {"role": "user", "content": "And then?"}]
    resumed = invoke(["chat", *models, *COMMON, "--continue"], input="Go on\n/exit\n")
    assert resumed.exit_code == 0, resumed.output
    assert "continuing the last conversation: 4 messages" in resumed.stderr
    third = Logbook().recent()[-1]
    assert third.conversation == first.conversation
    assert third.messages == [*second.messages, {"role": "assistant", "content": second.answer},
                              {"role": "user", "content": "Go on"}]
    invoke(["chat", *models, *COMMON], input="/reset\nHi\n/exit\n")
    assert Logbook().recent()[-1].conversation != first.conversation


def test_chat_continue_without_a_conversation_is_one_line(models: list[str]) -> None:
    result = invoke(["chat", *models, *COMMON, "--continue"], input="/exit\n")
    assert result.exit_code == 2 and result.stderr.startswith("error: no chat conversation in the conversation log")
    assert result.stderr.count("\n") == 1


def test_the_server_logs_each_answer_streamed_or_not(tiny_bpe: Path, tiny_bpe_b: Path, llama_quiet: None) -> None:
    pytest.importorskip("uvicorn")
    openai = pytest.importorskip("openai")
    Running = importlib.import_module("test_server").Running
    from edge_ensemble.api import Ensemble, EnsembleConfig
    from edge_ensemble.server import ServerOptions, create_app

    config = EnsembleConfig(n_ctx=512, n_threads=1, check_memory=False, parallel=2)
    hello = [{"role": "user", "content": "Tell me about the sea."}]
    with Ensemble([str(tiny_bpe), str(tiny_bpe_b)], config=config) as ens:
        running = Running(create_app(ens, ServerOptions(model_id="pair", max_tokens=6), logbook=Logbook()))
        try:
            client: Any = running.client()
            whole = client.chat.completions.create(model="pair", messages=hello, n=2, seed=7)
            chunks = list(client.chat.completions.create(model="pair", messages=hello, stream=True,
                                                         extra_body={"edge_ensemble": {"policy": "single"}}))
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            raw = client.completions.create(model="pair", prompt="Once upon")
        finally:
            running.stop()  # the log's writer thread writes what is queued as the app shuts down
    assert isinstance(client, openai.OpenAI)
    rows = Logbook().recent()
    assert [r.source for r in rows] == ["serve"] * 4
    a, b, s, r = rows
    assert a.conversation == b.conversation == whole.id and {a.answer, b.answer} == {c.message.content for c in whole.choices}
    assert {a.options["seed"], b.options["seed"]} == {7, 8} and a.messages == hello
    assert s.answer == streamed and s.policy == "single" and s.conversation == chunks[0].id
    assert r.messages is None and r.prompt == "Once upon" and r.answer == raw.choices[0].text
    assert all(x.stats["tokens"] <= 6 and x.finish_reason for x in rows)


# -- concurrency and crashes ------------------------------------------------------------------------------------

# A process that writes exchanges tagged TAG: N of them (0: until killed), once START exists.
_WRITER = textwrap.dedent("""
    import os, sys, time
    from edge_ensemble.logs import Exchange, Logbook
    path, tag, n, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    book = Logbook(path)
    while not os.path.exists(start):
        time.sleep(0.001)
    i = 0
    while n == 0 or i < n:
        book.add(Exchange(source="run", prompt=f"{tag} {i}", answer="x" * int(sys.argv[5]), finish_reason="stop",
                          members=[{"name": tag}], policy="safe"))
        i += 1
""")


def writer(path: Path, tag: str, n: int, start: Path, size: int = 100) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(path), tag, str(n), str(start), str(size)],
                            stderr=subprocess.PIPE, text=True)


def test_two_processes_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    path, start = tmp_path / "shared.db", tmp_path / "go"
    procs = [writer(path, tag, 50, start) for tag in ("a", "b")]  # both create and migrate the new file at once
    time.sleep(0.5)
    start.touch()
    for p in procs:
        assert p.wait(60) == 0, p.stderr.read() if p.stderr else ""
    rows = Logbook(path).recent(0)
    assert len(rows) == 100
    for tag in ("a", "b"):
        assert sorted(int(r.prompt.split()[1]) for r in rows if r.prompt.startswith(tag + " ")) == list(range(50))


def test_two_runs_at_once_both_land(models: list[str]) -> None:
    procs = [subprocess.Popen([sys.executable, "-m", "edge_ensemble.cli", "run", *models, *COMMON, f"Question {i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("warning" not in err for _, err in outs), outs
    assert sorted(r.prompt for r in Logbook().recent()) == ["Question 0", "Question 1"]


def test_a_process_killed_while_writing_leaves_a_readable_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, start = tmp_path / "killed.db", tmp_path / "go"
    start.touch()
    proc = writer(path, "k", 0, start, size=200_000)  # big rows: a kill is likely to land inside a write
    book = Logbook(path)
    deadline = time.monotonic() + 60
    while not path.exists() or book.count() < 20:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    rows = book.recent(0)
    assert len(rows) >= 20 and all(len(r.answer) == 200_000 for r in rows)
    assert [int(r.prompt.split()[1]) for r in rows] == list(range(len(rows)))  # no gap, no half row
    assert book.add(entry()) == rows[-1].id + 1  # and it takes new rows
    monkeypatch.setenv("EDGE_ENSEMBLE_LOGS", str(path))
    result = invoke(["logs", "-n", "2"])
    assert result.exit_code == 0 and f"k {len(rows) - 1}" in result.stdout


# -- a log that cannot be written -------------------------------------------------------------------------------


def test_a_locked_log_is_one_warning_and_the_answer_stands(tmp_path: Path) -> None:
    book = Logbook(tmp_path / "locked.db", busy_seconds=0.2)
    book.add(entry())
    holder = sqlite3.connect(book.path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process in the middle of a long write
    try:
        reports: list[str] = []
        started = time.monotonic()
        assert book.record(entry(), reports.append) is None
        assert time.monotonic() - started < 2
        assert len(reports) == 1 and "locked by another process" in reports[0] and str(book.path) in reports[0]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert book.record(entry(), reports.append) == 2  # a lock is not lasting: the next answer is logged


def test_a_read_only_log_is_one_warning_and_the_answer_stands(models: list[str], tmp_path: Path) -> None:
    read_only = importlib.import_module("test_faults").read_only
    directory = log_path().parent
    with read_only(directory):  # no log yet: the file cannot be made
        result = invoke(["run", *models, *COMMON, "Hello"])
    assert result.exit_code == 0 and result.stdout.strip()
    [line] = warnings_of(result)
    assert str(log_path()) in line and "--no-log" in line and "Traceback" not in result.output
    Logbook().add(entry())
    with read_only(directory):  # a log that exists, on a read-only disk
        result = invoke(["run", *models, *COMMON, "Hello"])
        listed = invoke(["logs", "--json"])
    assert result.exit_code == 0 and result.stdout.strip() and len(warnings_of(result)) == 1
    assert str(log_path()) in warnings_of(result)[0]
    assert len(Logbook().recent()) == 1
    assert listed.exit_code in (0, 2) and "Traceback" not in listed.output  # reading it may or may not work there


def test_a_damaged_log_is_one_line_naming_the_file_and_the_fix(models: list[str]) -> None:
    path = log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(4096))
    fix = f"mv {path} {path}.bad"
    for args in (["logs"], ["logs", "show", "1"], ["logs", "list", "--json"]):
        result = invoke(args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith(f"error: the conversation log {path} is damaged") and fix in result.stderr
        assert result.stderr.count("\n") == 1 and not result.stdout
    run = invoke(["run", *models, *COMMON, "Hello"])
    assert run.exit_code == 0 and run.stdout.strip()
    [line] = warnings_of(run)
    assert str(path) in line and fix in line and "Traceback" not in run.output
    path.rename(f"{path}.bad")  # as the message says: a new log starts
    assert invoke(["run", *models, *COMMON, "Hello"]).exit_code == 0 and len(Logbook().recent()) == 1


# -- edge-ensemble logs -----------------------------------------------------------------------------------------


def test_logs_list_search_json_and_show() -> None:
    empty = invoke(["logs"])
    assert empty.exit_code == 0 and empty.stdout == f"No exchange in the conversation log {log_path()} (it does not exist yet).\n"
    assert not log_path().exists()  # reading never creates it
    book = Logbook()
    for i in range(12):
        book.add(entry(prompt=f"question {i}" + (" about the SEA" if i % 5 == 0 else ""), answer=f"answer {i}",
                       source="chat" if i == 3 else "run"))
    listed = invoke(["logs"])
    assert listed.exit_code == 0
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["id", "time", "(UTC)", "source", "policy", "tokens", "prompt", "answer"]
    assert [line.split()[0] for line in lines[1:]] == [str(i) for i in range(3, 13)]  # the last 10, newest last
    assert invoke(["logs", "list", "-n", "2"]).stdout.splitlines()[1:] == lines[-2:]
    assert [r["id"] for r in json.loads(invoke(["logs", "-n", "3", "--json"]).stdout)] == [10, 11, 12]
    everything = json.loads(invoke(["logs", "-n", "0", "--json"]).stdout)
    assert len(everything) == 12 and everything[0]["prompt"] == "question 0 about the SEA"
    found = json.loads(invoke(["logs", "-q", "sea", "--json"]).stdout)
    assert [r["id"] for r in found] == [1, 6, 11]
    assert json.loads(invoke(["logs", "-q", "answer 7", "--json"]).stdout)[0]["id"] == 8
    assert json.loads(invoke(["logs", "-q", "100%_", "--json"]).stdout) == []  # LIKE's wildcards are plain text
    assert [r["id"] for r in json.loads(invoke(["logs", "--source", "chat", "--json"]).stdout)] == [4]
    none = invoke(["logs", "-q", "nothing like this"])
    assert none.exit_code == 0 and none.stdout.startswith("No matching exchange")

    shown = invoke(["logs", "show", "2"])
    assert shown.exit_code == 0
    assert "question 1" in shown.stdout and "answer 1" in shown.stdout and "tiny-bpe (drafter)" in shown.stdout
    whole = json.loads(invoke(["logs", "show", "2", "--json"]).stdout)
    assert whole == {**book.get(2).to_dict()} and whole["id"] == 2 and whole["stats"]["tokens"] == 1
    missing = invoke(["logs", "show", "99"])
    assert missing.exit_code == 2 and "no exchange 99" in missing.stderr and missing.stderr.count("\n") == 1


def test_logs_show_marks_who_wrote_what() -> None:
    book = Logbook()
    book.add(entry(answer="The sea is blue.", provenance=[
        {"kind": "draft", "text": "The sea is ", "winner": None},
        {"kind": "ensemble", "text": "blue", "winner": "qwen"},
        {"kind": "draft", "text": ".", "winner": None}]))
    shown = invoke(["logs", "show", "1"])
    assert "The sea is [blue|qwen]." in shown.stdout.splitlines()
