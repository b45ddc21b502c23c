"""``edge-ensemble chat``'s input and its commands for what answers are made with: a bracketed paste and a ``\"\"\"``
block as one message, ``/policy``, ``/set``, ``/load``.

Two ways in: click's CliRunner (stdin is no terminal: lines are turns, a ``\"\"\"`` block is one message), and a real
terminal, tmux, for the paste (tmux must be installed: ``apt-get install -y tmux``; the test fails without it). Expected
answers come from the API with the same models and settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from click.testing import CliRunner, Result

from doubles import ctrl_c_in_first_answer
from edge_ensemble.api import Ensemble
from edge_ensemble.cli import cli
from edge_ensemble.cli.chat_input import PASTE_END, PASTE_OFF, PASTE_ON, PASTE_START, Entry, Reader, bracketed_paste
from edge_ensemble.errors import UsageError
from edge_ensemble.policies import registry

MAX_TOKENS = 12
N_CTX = 256
COMMON = ["--max-tokens", str(MAX_TOKENS), "--n-ctx", str(N_CTX), "--threads", "1"]
SAFE = "safe"  # the must-hold names it; the tests below check it is a registered policy that reads the verifiers
DRAFTER_ALONE = registry.BASELINE_POLICY
FOOTER = " tok/s, E/T "  # in the line of figures after each answer (/stats has "tok/s (")


@pytest.fixture
def models(tiny_bpe: Path, tiny_bpe_b: Path) -> list[str]:
    return [str(tiny_bpe), str(tiny_bpe_b)]


@pytest.fixture
def model_args(models: list[str]) -> list[str]:
    return ["-m", models[0], "-m", models[1], *COMMON]


@pytest.fixture
def api(models: list[str]) -> Iterator[Ensemble]:
    with Ensemble(models, n_ctx=N_CTX, n_threads=1) as ens:
        yield ens


def invoke(args: list[str], input: str) -> Result:
    return CliRunner().invoke(cli, args, input=input)


def answer(api: Ensemble, messages: list[dict[str, Any]], **options: Any) -> str:
    text = api.generate(messages=messages, max_tokens=options.pop("max_tokens", MAX_TOKENS), **options).text
    assert text.strip(), "the tiny models should say something for this prompt"
    return text


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def saved(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text("utf-8"))["messages"]


def errors(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, (result.output, result.exception)


def test_the_policy_names_used_here() -> None:
    assert SAFE in registry.names() and not registry.get(SAFE).drafter_only
    assert registry.get(DRAFTER_ALONE).drafter_only


# -- input: a """ block, a paste, lines ------------------------------------------------------------------------


def reader(*lines: str | None) -> Reader:
    """A Reader over these lines (None: the end of input), with the prompts it showed recorded."""
    feed = list(lines)
    prompts: list[str] = []

    def read_line(prompt: str) -> str | None:
        prompts.append(prompt)
        return feed.pop(0) if feed else None

    r = Reader(read_line, note=lambda text: None)
    r.prompts = prompts  # type: ignore[attr-defined]
    return r


def test_reader_lines_blocks_and_pastes() -> None:
    r = reader("  Hi  ", "/stats", '"""', "  def f():", "      return 1", '"""', '"""one line"""',
               "GNU readline's paste\nof three\nlines\n", PASTE_START + "marked", "paste", "end" + PASTE_END + "!",
               '"""  first', "second   \"\"\"  ", '"""\n  def g():\n      pass\n"""\n', '"""pasted\nopen', 'closed"""',
               None)
    entries = []
    while (e := r.read()) is not None:
        entries.append(e)
    assert entries == [
        Entry("Hi"), Entry("/stats"),
        Entry("  def f():\n      return 1", True),  # the block's indentation stays
        Entry("one line", True),
        Entry("GNU readline's paste\nof three\nlines", True),
        Entry("marked\npaste\nend!", True),
        Entry("first\nsecond", True),
        Entry("  def g():\n      pass", True),  # a whole block pasted: the quotes are not the message's
        Entry("pasted\nopen\nclosed", True),  # a pasted block's opening, closed by a typed line
    ]
    assert r.prompts.count("...") == 5  # type: ignore[attr-defined]  (a """ block's further lines)


def test_reader_end_of_input_inside_a_block_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match='ended inside a """ block'):
        reader('"""', "one", None).read()


def test_bracketed_paste_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty:
        def __init__(self) -> None:
            self.written = ""

        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> None:
            self.written += text

        def flush(self) -> None:
            pass

    monkeypatch.delitem(sys.modules, "readline", raising=False)
    out = Tty()
    with bracketed_paste(Tty(), out):
        assert out.written == PASTE_ON
    assert out.written == PASTE_ON + PASTE_OFF
    class Libedit:
        __doc__ = "Importing this module enables command line editing using libedit readline."
        bound: list[str] = []

        def parse_and_bind(self, text: str) -> None:
            self.bound.append(text)

    class Gnu(Libedit):
        __doc__ = "Importing this module enables command line editing using GNU readline."

    for readline, bound in ((Libedit(), []), (Gnu(), ["set enable-bracketed-paste on"])):
        monkeypatch.setitem(sys.modules, "readline", readline)
        with bracketed_paste(Tty(), out):
            pass
        assert readline.bound == bound and out.written == PASTE_ON + PASTE_OFF
        readline.bound = []
    piped = Tty()
    piped.isatty = lambda: False  # type: ignore[method-assign]
    with bracketed_paste(piped, out):
        pass
    assert out.written == PASTE_ON + PASTE_OFF  # nothing for a pipe


def test_chat_piped_block_is_one_message_and_lines_are_turns(model_args: list[str], api: Ensemble,
                                                             tmp_path: Path) -> None:
    save = tmp_path / "chat.json"
    script = ['"""', "line one", "/stats is text here", '"""', "Hi", "Go on", f"/save {save}"]
    result = invoke(["chat", *model_args], "\n".join(script) + "\n")
    assert_ok(result)
    block = "line one\n/stats is text here"
    a1 = answer(api, [user(block)])
    a2 = answer(api, [user(block), assistant(a1), user("Hi")])
    a3 = answer(api, [user(block), assistant(a1), user("Hi"), assistant(a2), user("Go on")])
    assert saved(save) == [user(block), assistant(a1), user("Hi"), assistant(a2), user("Go on"), assistant(a3)]
    assert result.stderr.count("tok/s") == 3 and not errors(result)


def test_chat_piped_paste_markers_are_one_message(model_args: list[str], api: Ensemble, tmp_path: Path) -> None:
    save = tmp_path / "chat.json"
    result = invoke(["chat", *model_args], f"{PASTE_START}one\ntwo\nthree\n{PASTE_END}\n/save {save}\n")
    assert_ok(result)
    assert saved(save) == [user("one\ntwo\nthree"), assistant(answer(api, [user("one\ntwo\nthree")]))]


def test_chat_unclosed_block_at_the_end_of_input(model_args: list[str]) -> None:
    result = invoke(["chat", *model_args], '"""\nnever closed\n')
    assert result.exit_code == 2
    assert errors(result) == ['error: the input ended inside a """ block: end the message with a line that ends '
                              'with """']
    assert "tok/s" not in result.stderr  # nothing was sent


# -- /policy and /set ------------------------------------------------------------------------------------------


def test_chat_policy_loads_the_verifiers_of_a_drafter_only_chat(model_args: list[str], api: Ensemble,
                                                                tmp_path: Path) -> None:
    save = tmp_path / "chat.json"
    script = ["/policy", "/policy nope", "Hi", "/stats", f"/policy {SAFE}", "/models", "Go on", "/stats", f"/save {save}"]
    result = invoke(["chat", *model_args, "--policy", DRAFTER_ALONE], "\n".join(script) + "\n")
    assert_ok(result)
    a1 = answer(api, [user("Hi")], policy=DRAFTER_ALONE)
    a2 = answer(api, [user("Hi"), assistant(a1), user("Go on")], policy=SAFE)
    assert saved(save) == [user("Hi"), assistant(a1), user("Go on"), assistant(a2)]
    assert json.loads(save.read_text())["policy"] == SAFE
    assert errors(result) == [f"error: /policy must be one of {', '.join(registry.names())}; got 'nope'"]
    out = result.stdout
    assert f"Policy: {DRAFTER_ALONE}." in out and all(name in out for name in registry.names())  # /policy alone
    stats = [line.split() for line in out.splitlines() if line.startswith("policy ")]
    assert stats == [["policy", DRAFTER_ALONE], ["policy", SAFE]]  # /stats after each answer
    assert f"loading all 2 members for policy {SAFE}" in result.stderr
    assert "verifier tiny-bpe-b" in " ".join(out.split())  # /models: the verifier is loaded now
    footers = [line for line in result.stderr.splitlines() if "tok/s" in line]
    assert f", {DRAFTER_ALONE}" in footers[0] and f", {SAFE}" in footers[1]


def test_chat_policy_the_models_cannot_serve_is_refused(model_args: list[str], api: Ensemble) -> None:
    def unmet(policy: str) -> str:
        try:
            return api.unmet_needs(dataclasses.replace(api.config, policy=policy).validate(2))
        except UsageError:  # a policy that needs an option first (route: its head)
            return ""

    needs_more = [n for n in registry.names() if unmet(n)]
    assert needs_more, "some registered policy needs more than a plain load (eager: more sequences)"
    result = invoke(["chat", *model_args], f"/policy {needs_more[0]}\nHi\n/stats\n")
    assert_ok(result)
    line, = errors(result)
    assert line.startswith(f"error: policy {needs_more[0]} with these options needs ") and "restart the chat" in line
    assert ["policy", SAFE] in [ln.split() for ln in result.stdout.splitlines()]  # the chat went on, unchanged


def test_chat_set_generation_and_policy_options(model_args: list[str], api: Ensemble, tmp_path: Path) -> None:
    save = tmp_path / "chat.json"
    script = ["/set max-tokens 4", "/set gate 0.3", "/set gate 2", "/set temperature hot", "/set n_ctx 512",
              "/set gtae 0.3", "/set", "Hi", f"/save {save}", "/stats"]
    result = invoke(["chat", *model_args], "\n".join(script) + "\n")
    assert_ok(result)
    assert errors(result) == [
        'error: gate must be a number between 0.0 and 1.0 or "off"; got 2.0',
        "error: temperature must be a number between 0.0 and 5.0; got 'hot'",
        "error: n_ctx is fixed when the models load; restart the chat with --n-ctx 512",
        "error: unknown option gtae; did you mean gate? (/set lists the options)",
    ]
    out = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert "max_tokens = 4" in out and "gate = 0.3" in out
    assert "max_tokens 4 a whole number between 1 and 1048576" in out  # /set's list: value and allowed values
    assert 'gate 0.3 a number between 0.0 and 1.0 or "off"' in out
    expected = answer(api, [user("Hi")], max_tokens=4, gate=0.3)
    assert saved(save) == [user("Hi"), assistant(expected)]
    assert "tokens 4 (ensembled" in " ".join(result.stdout.split())


def test_chat_set_an_option_the_policy_does_not_read(model_args: list[str]) -> None:
    result = invoke(["chat", *model_args, "--policy", DRAFTER_ALONE], "/set gate off\n")
    assert_ok(result)
    readers = ", ".join(registry.policies_reading("gate"))
    assert f"gate = off (read by {readers}; policy {DRAFTER_ALONE} does not read it)" in result.stdout


# -- /load -----------------------------------------------------------------------------------------------------


def test_chat_save_then_load_restores_the_conversation(model_args: list[str], api: Ensemble, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    ctrl_c_in_first_answer(monkeypatch, after=3)  # an interrupted answer survives the round trip
    script = ["/system Be brief.", "Hi", "Go on", f"/save {first}", "/reset", "/system Other.", "Unrelated",
              f"/load {first}", "/system", "And then?", f"/save {second}"]
    result = invoke(["chat", *model_args], "\n".join(script) + "\n")
    assert_ok(result)
    before = saved(first)
    assert before[0] == {"role": "system", "content": "Be brief."} and before[2]["interrupted"] is True
    api_history = [{"role": m["role"], "content": m["content"]} for m in before]
    assert saved(second) == [*before, user("And then?"), assistant(answer(api, [*api_history, user("And then?")]))]
    assert f"Loaded 4 messages from {first} (with a system prompt)." in result.stdout
    assert "System prompt: Be brief." in result.stdout  # /system after /load
    assert not errors(result)


@pytest.mark.parametrize("content, message", [
    (None, "cannot load {path}: No such file or directory"),
    ("not json", "cannot load {path}: not a conversation that /save wrote (not JSON: "),
    ('{"messages": "Hi"}', 'cannot load {path}: not a conversation that /save wrote (no "messages" list)'),
    ('[{"role": "user", "content": "Hi"}]', "(no \"messages\" list)"),
    ('{"messages": [{"role": "robot", "content": "Hi"}]}', "(message 0 must be {\"role\": system|user|assistant"),
    ('{"messages": [{"role": "user", "content": 3}]}', "(message 0 must be"),
    ('{"messages": [{"role": "user", "content": "Hi", "extra": 1}]}', "(message 0 must be"),
    ('{"messages": [{"role": "user", "content": "Hi", "interrupted": true}]}', '(message 0: only an answer is '),
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "S"}]}',
     "(message 1: only the first message may be the system prompt)"),
])
def test_chat_load_refuses_a_bad_file_and_goes_on(model_args: list[str], tmp_path: Path, content: str | None,
                                                  message: str) -> None:
    path = tmp_path / "chat.json"
    if content is not None:
        path.write_text(content)
    save = tmp_path / "after.json"
    result = invoke(["chat", *model_args], f"Hi\n/load {path}\n/save {save}\n")
    assert_ok(result)
    line, = errors(result)
    assert line.startswith("error: ") and message.replace("{path}", str(path)) in line, line
    assert [m["content"] for m in saved(save)][0] == "Hi"  # the conversation is as it was


# -- a real terminal: tmux -------------------------------------------------------------------------------------


class Tmux:
    """A chat in a tmux pane of its own tmux server (its socket under the test's tmp directory)."""

    def __init__(self, socket: Path, command: str) -> None:
        self.base = ["tmux", "-S", str(socket)]
        self.run("new-session", "-d", "-s", "chat", "-x", "160", "-y", "50", command)

    def run(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], check=True, capture_output=True, text=True).stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-J", "-S", "-500", "-t", "chat")

    def wait_for(self, text: str, count: int = 1, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if screen.count(text) >= count:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{text!r} (x{count}) did not appear on the terminal:\n{self.screen()}")

    def type(self, line: str) -> None:
        self.run("send-keys", "-t", "chat", "-l", line)
        self.run("send-keys", "-t", "chat", "Enter")

    def paste(self, text: str, tmp: Path) -> None:
        """Paste ``text`` as a terminal does when the program asked for bracketed pastes (``-p``)."""
        (tmp / "paste.txt").write_text(text)
        self.run("load-buffer", "-b", "paste", str(tmp / "paste.txt"))
        self.run("paste-buffer", "-p", "-d", "-b", "paste", "-t", "chat")

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


# How the chat is started in the terminal: as installed (Python's GNU readline: it marks the paste), and without
# readline (the chat asks the terminal to mark pastes itself).
NO_READLINE = ("import sys; sys.modules['readline'] = None; from edge_ensemble.cli import main; "
               "main()")


@pytest.fixture(params=["gnu-readline", "no-readline"])
def tmux_chat(request: pytest.FixtureRequest, tmp_path: Path, models: list[str]) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed; the chat's terminal tests need it (apt-get install -y tmux)")
    repo = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(repo), "NO_COLOR": "1", "EDGE_ENSEMBLE_CONFIG": os.environ["EDGE_ENSEMBLE_CONFIG"],
           "TERM": "xterm-256color", "HOME": os.environ.get("HOME", str(tmp_path)),
           **{k: os.environ[k] for k in ("EDGE_ENSEMBLE_CACHE", "XDG_CACHE_HOME", "EDGE_ENSEMBLE_LOGS")
              if k in os.environ}}
    start = ["-m", "edge_ensemble.cli"] if request.param == "gnu-readline" else ["-c", NO_READLINE]
    chat = [sys.executable, *start, "chat", "-m", models[0], "-m", models[1], *COMMON,
            "--policy", DRAFTER_ALONE]
    command = (" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(chat)
               + f" 2>&1; echo CHAT-EXIT $?; sleep 600")
    tmux = Tmux(tmp_path / "tmux.sock", "env -i " + command)
    try:
        tmux.wait_for("/help lists the commands")
        yield tmux
    finally:
        tmux.close()


def test_chat_in_a_terminal_paste_policy_save_load(tmux_chat: Tmux, api: Ensemble, tmp_path: Path) -> None:
    """The must-hold of issue 36: a three-line paste is one turn; /policy safe then a question answers with SAFE
    (/stats says so); /save then /load restores the conversation."""
    t = tmux_chat
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    pasted = "Here are three lines:\nthe second one\nand the third.\n"
    t.paste(pasted, tmp_path)
    t.run("send-keys", "-t", "chat", "Enter")  # (a paste waits for Enter, as in bash)
    t.wait_for(FOOTER)
    t.type("/stats")
    t.wait_for("peak memory")
    t.type(f"/policy {SAFE}")
    t.wait_for(f"Policy {SAFE}: the next answers use it.")
    t.type("What is two and two?")
    t.wait_for(FOOTER, 2)
    t.type("/stats")
    t.wait_for("peak memory", 2)
    t.type(f"/save {first}")
    t.wait_for(f"Saved 4 messages to {first}.")
    t.type("/reset")
    t.wait_for("Conversation cleared.")
    t.type(f"/load {first}")
    t.wait_for(f"Loaded 4 messages from {first}.")
    t.type("And then?")
    t.wait_for(FOOTER, 3)
    t.type(f"/save {second}")
    t.wait_for(f"Saved 6 messages to {second}.")
    t.run("send-keys", "-t", "chat", "C-d")
    screen = t.wait_for("CHAT-EXIT 0")

    one = "Here are three lines:\nthe second one\nand the third."
    a1 = answer(api, [user(one)], policy=DRAFTER_ALONE)
    a2 = answer(api, [user(one), assistant(a1), user("What is two and two?")], policy=SAFE)
    history = [user(one), assistant(a1), user("What is two and two?"), assistant(a2)]
    assert saved(first) == history  # the paste was one turn: one question, one answer
    a3 = answer(api, [*history, user("And then?")], policy=SAFE)
    assert saved(second) == [*history, user("And then?"), assistant(a3)]  # /load restored what the models see
    stats = [line.split() for line in screen.splitlines() if line.startswith("policy ")]
    assert stats == [["policy", DRAFTER_ALONE], ["policy", SAFE]]
    assert screen.count(FOOTER) == 3 and "error:" not in screen
