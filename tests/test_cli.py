"""The command line, driven through click's CliRunner with the tiny GGUF models.

Expected answers are computed with the API (same models, same settings) and must appear verbatim in the
CLI's output. Nothing here downloads: the catalog tests point the caches at empty temp directories, or only
read whatever the user's cache holds.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import click
import pytest
from click.testing import CliRunner, Result

import tiny_gguf
from doubles import ctrl_c_in_first_answer
from edge_ensemble import __version__
from edge_ensemble.api import Ensemble
from edge_ensemble.cli import cli
from edge_ensemble.sources import Catalog, model_status

MAX_TOKENS = 12
N_CTX = 256
# One thread: on a busy 2-core machine llama.cpp's spinning worker threads make tiny models 100x slower.
COMMON = ["--max-tokens", str(MAX_TOKENS), "--n-ctx", str(N_CTX), "--threads", "1"]


@pytest.fixture
def models(tiny_bpe: Path, tiny_bpe_b: Path) -> list[str]:
    return [str(tiny_bpe), str(tiny_bpe_b)]


@pytest.fixture
def model_args(models: list[str]) -> list[str]:
    return ["-m", models[0], "-m", models[1], *COMMON]


@pytest.fixture
def api(models: list[str]) -> Iterator[Ensemble]:
    """The same ensemble through the API: the reference for every expected answer."""
    with Ensemble(models, n_ctx=N_CTX, n_threads=1) as ens:
        yield ens


@pytest.fixture
def empty_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No model on disk: our cache and huggingface-hub's point at empty directories; no network."""
    monkeypatch.setenv("EDGE_ENSEMBLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def invoke(args: list[str], input: str | None = None) -> Result:
    return CliRunner().invoke(cli, args, input=input)


def answer(api: Ensemble, messages: list[dict[str, str]]) -> str:
    text = api.generate(messages=messages, max_tokens=MAX_TOKENS).text
    assert text.strip(), "the tiny models should say something for this prompt"
    return text


def shown(text: str) -> str:
    """An answer as printed: followed by a newline unless it ends with one."""
    return text if text.endswith("\n") else text + "\n"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def assert_in_order(haystack: str, needles: list[str]) -> None:
    pos = 0
    for needle in needles:
        found = haystack.find(needle, pos)
        assert found >= 0, f"{needle!r} not found (in order) in:\n{haystack}"
        pos = found + len(needle)


def squeeze(text: str) -> str:
    """Runs of spaces as one (table columns are as wide as their longest cell)."""
    return re.sub(r" {2,}", " ", text)


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


def assert_error(result: Result, code: int, *fragments: str) -> None:
    """A clean failure: the exit code, exactly one stderr line `error: ...`, no traceback."""
    assert result.exit_code == code, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # not an exception escaping the CLI
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# -- chat -------------------------------------------------------------------------------------------------------


def test_chat_multi_turn_with_commands(model_args: list[str], api: Ensemble, tmp_path: Path) -> None:
    saves = [tmp_path / f"s{i}.json" for i in (1, 2, 3)]
    script = ["Hi", "Tell me more", "/stats", f"/save {saves[0]}", "/system Be brief.", "Again",
              f"/save {saves[1]}", "/models", "/reset", "Hi", f"/save {saves[2]}", "/exit"]
    result = invoke(["chat", *model_args], input="\n".join(script) + "\n")
    assert_ok(result)

    system = {"role": "system", "content": "Be brief."}
    a1 = answer(api, [user("Hi")])
    turn2 = [user("Hi"), assistant(a1), user("Tell me more")]
    a2 = answer(api, turn2)
    r2 = api.generate(messages=turn2, max_tokens=MAX_TOKENS)
    a3 = answer(api, [system, *turn2, assistant(a2), user("Again")])
    a4 = answer(api, [system, user("Hi")])
    s = r2.stats
    assert_in_order(squeeze(result.stdout), [squeeze(x) for x in [
        "> Hi\n" + shown(a1),
        "> Tell me more\n" + shown(a2),
        f"{s.tokens} (ensembled {s.ensembled_tokens})",  # /stats: the last answer
        f"E/T {s.ensembled_fraction:.2f}",
        f"drafted tokens {s.drafted_tokens}",  # SAFE's own figures follow
        f"Saved 4 messages to {saves[0]}.",
        "System prompt set.",
        "> Again\n" + shown(a3),
        "drafter tiny-bpe llama, 559 tokens, chat template yes",  # /models
        "verifier tiny-bpe-b llama, 559 tokens, chat template yes",
        "Conversation cleared (system prompt kept).",
        "> Hi\n" + shown(a4),
    ]])
    assert result.stderr.count("tok/s") == 4  # one figures line per answer

    saved = [json.loads(p.read_text()) for p in saves]
    # History is carried: each save holds exactly the conversation the next turn would send.
    assert saved[0]["messages"] == [*turn2, assistant(a2)]
    assert saved[1]["messages"] == [system, *turn2, assistant(a2), user("Again"), assistant(a3)]
    assert saved[2]["messages"] == [system, user("Hi"), assistant(a4)]
    assert saved[1]["system"] == "Be brief." and saved[1]["policy"] == "safe"
    assert [m["name"] for m in saved[0]["members"]] == ["tiny-bpe", "tiny-bpe-b"]
    assert [m["role"] for m in saved[0]["members"]] == ["drafter", "verifier"]


def test_chat_ctrl_c_keeps_the_partial_answer(model_args: list[str], api: Ensemble, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    first_events = [e.text for _, e in zip(range(3), api.stream(messages=[user("Hi")], max_tokens=MAX_TOKENS))]
    partial = "".join(first_events)
    assert partial and len(partial) < len(answer(api, [user("Hi")]))
    ctrl_c_in_first_answer(monkeypatch, after=3)
    save = tmp_path / "chat.json"
    result = invoke(["chat", *model_args], input=f"Hi\nGo on\n/stats\n/save {save}\n/exit\n")
    assert_ok(result)

    a2 = answer(api, [user("Hi"), assistant(partial), user("Go on")])
    assert_in_order(result.stdout, ["> Hi\n" + shown(partial), "> Go on\n" + shown(a2)])
    assert "[interrupted]" in result.stderr
    assert json.loads(save.read_text())["messages"] == [
        user("Hi"), {"role": "assistant", "content": partial, "interrupted": True}, user("Go on"), assistant(a2)]


def test_chat_ctrl_c_at_the_prompt_does_not_quit(model_args: list[str], api: Ensemble,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real_prompt = click.prompt
    calls = []

    def prompt_with_ctrl_c(*args: Any, **kwargs: Any) -> str:
        """The user's Ctrl-C at the first prompt, reported the way click reports it."""
        calls.append(1)
        if len(calls) == 1:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise click.Abort() from None
        return real_prompt(*args, **kwargs)

    monkeypatch.setattr(click, "prompt", prompt_with_ctrl_c)
    result = invoke(["chat", *model_args], input="Hi\n")
    assert_ok(result)
    assert "(Ctrl-D or /exit quits)" in result.stderr
    assert "> Hi\n" + shown(answer(api, [user("Hi")])) in result.stdout


def test_chat_context_overflow_keeps_the_session(model_args: list[str], api: Ensemble) -> None:
    long = "word " * 300
    result = invoke(["chat", *model_args], input=f"{long}\nHi\n/exit\n")
    assert_ok(result)
    assert "error: the prompt is" in result.stderr and "raise --n-ctx" in result.stderr
    assert "> Hi\n" + shown(answer(api, [user("Hi")])) in result.stdout  # the failed turn left no trace


def test_chat_eof_and_unknown_command(model_args: list[str]) -> None:
    result = invoke(["chat", *model_args], input="/nope\n/help\n")  # ends with EOF (Ctrl-D)
    assert_ok(result)
    assert "error: unknown command /nope; /help lists the commands" in result.stderr
    assert "/save FILE" in result.stdout


# -- run --------------------------------------------------------------------------------------------------------


def test_run_json(model_args: list[str], api: Ensemble) -> None:
    result = invoke(["run", *model_args, "--json", "Hi"])
    assert_ok(result)
    data = json.loads(result.stdout)
    expected = api.generate("Hi", max_tokens=MAX_TOKENS)
    assert data["text"] == expected.text
    assert data["finish_reason"] == expected.finish_reason
    schema = {"text": str, "finish_reason": str, "stats": dict, "provenance": list, "members": list,
              "policy": str, "config": dict, "generation": dict}
    for key, kind in schema.items():
        assert isinstance(data[key], kind), key
    assert data["preset"] is None and data["policy"] == "safe"
    stats = data["stats"]
    assert stats["tokens"] == expected.stats.tokens and stats["ensembled_tokens"] == expected.stats.ensembled_tokens
    for key in ("tokens_per_second", "ensembled_fraction", "generation_seconds"):
        assert isinstance(stats[key], float)
    assert all(set(span) == {"kind", "text", "winner"} for span in data["provenance"])
    assert "".join(span["text"] for span in data["provenance"]) == data["text"]
    assert [(m["name"], m["role"], m["n_vocab"], m["chat_template"]) for m in data["members"]] == [
        ("tiny-bpe", "drafter", 559, True), ("tiny-bpe-b", "verifier", 559, True)]
    assert data["config"]["n_ctx"] == N_CTX and data["generation"]["max_tokens"] == MAX_TOKENS


def test_run_streams_and_reads_stdin(model_args: list[str], api: Ensemble) -> None:
    expected = shown(api.generate("Why is the sky blue?", max_tokens=MAX_TOKENS).text)
    for args, stdin in ((["Why is the sky blue?"], None), ([], "Why is the sky blue?\n"), (["-"], "Why is the sky blue?")):
        result = invoke(["run", *model_args, *args], input=stdin)
        assert_ok(result)
        assert result.stdout == expected
        assert result.stderr.count("tok/s") == 1


def test_run_system_prompt(model_args: list[str], api: Ensemble) -> None:
    result = invoke(["run", *model_args, "-s", "Answer in French.", "Hi"])
    assert_ok(result)
    assert result.stdout == shown(api.generate("Hi", system="Answer in French.", max_tokens=MAX_TOKENS).text)


def test_run_show_marks_ensembled_tokens(model_args: list[str], api: Ensemble) -> None:
    events = list(api.stream("Hi", max_tokens=MAX_TOKENS))
    assert any(e.kind == "ensemble" and e.text for e in events)
    marked = "".join(f"[{e.text}|{e.winner}]" if e.kind == "ensemble" and e.text else e.text for e in events)
    result = invoke(["run", *model_args, "--show", "Hi"])  # NO_COLOR is set by conftest: plain markers
    assert_ok(result)
    assert result.stdout == shown(marked)


def test_run_ctrl_c_exits_130(model_args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def stream_with_ctrl_c(self: Ensemble, *args: Any, **kwargs: Any) -> Iterator[Any]:
        raise KeyboardInterrupt  # the user's Ctrl-C, as the answer starts
        yield

    monkeypatch.setattr(Ensemble, "stream", stream_with_ctrl_c)
    result = invoke(["run", *model_args, "Hi"])
    assert result.exit_code == 130 and isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output


# -- precedence: flag > config file > default ---------------------------------------------------------------------


def test_config_file_and_flag_precedence(models: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'members = {json.dumps(models)}\npolicy = "single"\ndraft_len = 3\nmax_tokens = 7\n'
                      'gate = "off"\nn_ctx = 256\nthreads = 1\n')
    monkeypatch.setenv("EDGE_ENSEMBLE_CONFIG", str(config))

    data = json.loads(invoke(["run", "--json", "Hi"]).stdout)
    assert data["policy"] == "single" and data["stats"]["members"] == ["tiny-bpe"]
    assert [m["name"] for m in data["members"]] == ["tiny-bpe"]  # single: the verifier is not even loaded
    assert data["config"]["draft_len"] == 3 and data["config"]["gate"] is None  # "off" = faithful SAFE
    assert data["generation"]["max_tokens"] == 7 and data["config"]["union_k"] == 10  # a built-in default

    result = invoke(["run", "--json", "--policy", "safe", "--max-tokens", "5", "--gate", "0.7", "-m", models[1], "Hi"])
    assert_ok(result)
    data = json.loads(result.stdout)
    assert data["policy"] == "safe" and data["generation"]["max_tokens"] == 5 and data["config"]["gate"] == 0.7
    assert data["config"]["draft_len"] == 3  # still from the file
    assert [m["name"] for m in data["members"]] == ["tiny-bpe-b"]  # -m replaces the file's members


# -- errors: one line on stderr, the right exit code, never a traceback -------------------------------------------


def test_bad_models(tiny_bpe: Path, tmp_path: Path) -> None:
    not_gguf = tiny_gguf.write_not_gguf(tmp_path / "notes.gguf")
    truncated = tiny_gguf.write_truncated_gguf(tiny_bpe, tmp_path / "cut.gguf")
    assert_error(invoke(["run", "-p", "nope", "Hi"]), 2, "unknown preset 'nope'")  # bad usage (tests/test_newcomer.py)
    cases = [
        (["-m", "no-such-model"], "unknown model 'no-such-model'"),
        (["-m", str(tmp_path / "missing.gguf")], "model file not found"),
        (["-m", str(not_gguf)], "is not a GGUF file"),
        (["-m", str(truncated)], "is truncated"),
    ]
    for args, fragment in cases:
        assert_error(invoke(["run", *args, "Hi"]), 1, fragment)


@pytest.mark.parametrize("args, fragment", [
    (["--gate", "2"], '--gate must be a number between 0.0 and 1.0 or "off"; got 2.0'),
    (["--gate", "high"], '--gate must be a number between 0.0 and 1.0 or "off"; got \'high\''),
    (["--draft-len", "0"], "--draft-len must be a whole number between 1 and 64; got 0"),
    (["--draft-len", "2.5"], "--draft-len must be a whole number between 1 and 64; got '2.5'"),
    (["--temperature", "-1"], "--temperature must be a number between 0.0 and 5.0; got -1.0"),
    (["--top-p", "0"], "--top-p must be a number above 0.0 and at most 1.0; got 0.0"),
    (["--union-k", "0"], "--union-k must be a whole number between 1 and 1000; got 0"),
    (["--top-k-union", "5"], "No such option"),  # the union size has one name: --union-k
    (["--weights", "1,2,3"], "--weights: give one per member (2); got 3"),
    (["--weights", "1,x"], "--weights must be a list of numbers above 0.0 (e.g. 2,1); got '1,x'"),
    (["--weights", "1,0"], "--weights must be a list of numbers above 0.0 (e.g. 2,1); got (1.0, 0.0)"),
    (["--policy", "fast"], "--policy must be one of single, every-token, safe, eager, route, vote; got 'fast'"),
    (["--policy", "eager", "--max-branches", "0"], "--max-branches must be a whole number between 1 and 64; got 0"),
    (["--policy", "eager", "--max-branches", "100"], "--max-branches must be a whole number between 1 and 64; got 100"),
    (["--policy", "eager", "--threshold", "-1"], '--threshold must be a number between 0.0 and 50.0 or "off"; got -1.0'),
    (["--policy", "eager", "--percentile", "101"], "--percentile must be a number between 0.0 and 100.0; got 101.0"),
    (["--policy", "eager", "--entropy", "half"], "--entropy must be one of top20, full; got 'half'"),
    (["--no-such-option"], "No such option"),
    (["-p", "tiny"], "give either --preset or --model, not both"),
])
def test_invalid_options_exit_2(model_args: list[str], args: list[str], fragment: str) -> None:
    assert_error(invoke(["run", *model_args, *args, "Hi"]), 2, fragment)


def test_prompt_longer_than_context(model_args: list[str]) -> None:
    result = invoke(["run", *model_args, "--n-ctx", "64", "word " * 300])
    assert_error(result, 1, "the prompt is", "raise --n-ctx")


def test_not_enough_memory(model_args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # A mock of the machine's RAM: 1000 bytes available, so the API's estimate refuses to load.
    monkeypatch.setattr("edge_ensemble.memory.available_memory_bytes", lambda: 1000)
    assert_error(invoke(["run", *model_args, "Hi"]), 1, "not enough memory")


def test_empty_stdin(model_args: list[str]) -> None:
    assert_error(invoke(["run", *model_args], input=""), 2, "empty")


@pytest.mark.parametrize("text, fragments", [
    ("gatee = 0.3\n", ["unknown key 'gatee'", "did you mean gate?", "known keys: preset"]),
    ("gate = 2.0\n", ['gate must be a number between 0.0 and 1.0 or "off"; got 2.0']),
    ('draft_len = "five"\n', ["draft_len must be a whole number between 1 and 64; got 'five'"]),
    ("top_k_union = 5\n", ["unknown key 'top_k_union'"]),
    ("weights = [2, 1, 1]\n", ["weights: give one per member (2); got 3"]),
    ('policy = "fast"\n', ["policy must be one of single, every-token, safe, eager, route, vote; got 'fast'"]),
    ("members = []\n", ["members must be a non-empty list"]),
    ("gate = [\n", ["is not valid TOML"]),
])
def test_bad_config_file(model_args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         text: str, fragments: list[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    monkeypatch.setenv("EDGE_ENSEMBLE_CONFIG", str(config))
    args = model_args if "members" not in text else COMMON
    assert_error(invoke(["run", *args, "Hi"]), 2, str(config), *fragments)


@pytest.mark.parametrize("text, fragment", [
    ('preset = "nosuch"\n', "preset: unknown preset 'nosuch'"),
    ('members = ["nosuch-model"]\n', "members: unknown model 'nosuch-model'"),
])
def test_an_ensemble_from_the_config_file_is_blamed_on_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 text: str, fragment: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    monkeypatch.setenv("EDGE_ENSEMBLE_CONFIG", str(config))
    result = invoke(["run", *COMMON, "Hi"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    line = result.stderr.strip()
    assert "\n" not in line and f"config file {config}: {fragment}" in line, line


def test_an_empty_model_name_and_a_preset_as_a_model_are_one_line() -> None:
    assert_error(invoke(["run", "-m", "", "Hi"]), 1, "an empty model name")
    assert_error(invoke(["models", "path", "tiny"]), 2, "tiny is a preset, not a model", "models path qwen2.5-coder")


def test_console_script_error_has_no_traceback(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("edge-ensemble")
    if not script.exists():
        pytest.skip("the edge-ensemble console script is not installed next to this interpreter")
    proc = subprocess.run([str(script), "run", "-m", str(tmp_path / "missing.gguf"), "Hi"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: model file not found") and proc.stderr.count("\n") == 1


# -- models, presets, version -----------------------------------------------------------------------------------


def test_models_list_with_nothing_on_disk(empty_cache: None) -> None:
    result = invoke(["models", "list"])
    assert_ok(result)
    catalog = Catalog.load()
    lines = result.stdout.splitlines()
    for entry in catalog.models.values():
        row = next(line for line in lines if line.startswith(entry.key + " "))
        assert f"{entry.size / 1e6:,.1f} MB" in row and " no " in row and "bundle, hub" in row
    assert_in_order(result.stdout, ["PRESET", "tiny *", "qwen2.5-coder-0.5b-instruct, smollm2-135m-instruct"])


def test_models_list_info_path_with_the_real_cache() -> None:
    """Whatever the user's cache holds (nothing is fetched): info works either way."""
    assert_ok(invoke(["models", "list"]))
    entry = Catalog.load().model("smollm2-135m-instruct")
    status = model_status(entry)
    info = invoke(["models", "info", "SmolLM2-135M-Instruct"])  # the display name works too
    assert_ok(info)
    assert_in_order(info.stdout, ["smollm2-135m-instruct (SmolLM2-135M-Instruct)", "tokenizer", entry.tokenizer,
                                  "present"])
    path = invoke(["models", "path", entry.key])
    if status.present:
        assert "vocabulary 49,152 tokens" in squeeze(info.stdout) and "architecture llama" in squeeze(info.stdout)
        assert path.stdout == f"{status.path}\n"
    else:
        assert f"edge-ensemble models pull {entry.key}" in info.stdout
        assert_error(path, 1, f"edge-ensemble models pull {entry.key}")


def test_models_info_and_path_when_absent(empty_cache: None) -> None:
    info = invoke(["models", "info", "gemma-3-270m"])
    assert_ok(info)
    assert_in_order(squeeze(info.stdout), ["gemma-3-270m (Gemma-3-270M)", "253.1 MB", "SentencePiece",
                                           "present no; fetch it with `edge-ensemble models pull gemma-3-270m`"])
    assert_error(invoke(["models", "path", "gemma-3-270m"]), 1, "not on disk", "edge-ensemble models pull gemma-3-270m")
    assert_error(invoke(["models", "info", "nope"]), 1, "unknown model 'nope'")
    assert_error(invoke(["models", "pull", "nope"]), 1, "unknown model or preset 'nope'")


def test_models_info_and_path_of_a_file(tiny_bpe: Path) -> None:
    info = invoke(["models", "info", str(tiny_bpe)])
    assert_ok(info)
    assert_in_order(squeeze(info.stdout), [str(tiny_bpe), "architecture llama", "vocabulary 559 tokens",
                                           "template in file yes"])
    path = invoke(["models", "path", str(tiny_bpe)])
    assert_ok(path)
    assert path.stdout == f"{tiny_bpe.absolute()}\n"


def test_presets_and_version() -> None:
    for args in (["presets"], ["models", "presets"]):
        result = invoke(args)
        assert_ok(result)
        assert_in_order(result.stdout, ["tiny *", "coder", "trio", "* default"])
    version = invoke(["--version"])
    assert_ok(version)
    assert version.stdout.startswith(f"edge-ensemble {__version__} (llama-cpp-python ")


def test_module_entry_point_knows_every_command():
    """`python -m edge_ensemble.cli eval --help` works: the module runs main() only after every command exists."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "edge_ensemble.cli", "eval", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "TASK" in out.stdout or "task" in out.stdout.lower()


def test_run_eager_prints_the_answer_a_branch_summary_and_the_tree(models: list[str]) -> None:
    args = ["run", "-m", models[0], *COMMON, "--policy", "eager", "--max-branches", "3", "--threshold", "0",
            "--percentile", "0", "--temperature", "0.6", "--seed", "1"]
    shown_run = invoke([*args, "--show", "Tell me a story."])
    assert shown_run.exit_code == 0, shown_run.output
    err = shown_run.stderr.splitlines()
    summary = next(line for line in err if " branches (" in line)
    assert summary.startswith("3 branches (2 entropy)") and "tokens generated; chosen: #" in summary
    tree = [line for line in err if line.lstrip().startswith("#")]
    assert len(tree) == 3 and tree[0].startswith("#0: ") and sum("<- chosen" in t for t in tree) == 1
    assert all(" from #" in t and "(entropy)" in t for t in tree[1:])
    data = json.loads(invoke([*args, "--json", "Tell me a story."]).stdout)  # the same seed: the same run
    assert len(data["branches"]) == 3 and sum(b["chosen"] for b in data["branches"]) == 1
    chosen = next(b for b in data["branches"] if b["chosen"])
    assert data["text"] == chosen["text"] and shown_run.stdout.startswith(chosen["text"].rstrip("\n")[:20])
    assert {"text", "tokens", "parent", "forked_at", "origin", "answer", "votes", "finish_reason"} <= set(chosen)
