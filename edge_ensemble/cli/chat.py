"""``edge-ensemble chat``: a conversation in the terminal (:class:`ChatSession`), with slash commands."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .. import paths
from ..api import Ensemble
from ..chat import clean_text
from ..config import Settings
from ..engine import GenerationResult
from ..errors import EdgeEnsembleError
from .common import _error, _mb, _note, _table, open_ensemble, stream_answer
from .flags import _SHOW_HELP, settings_options
from .render import Renderer, _member_dict, footer


_CHAT_HELP = """\
/help           this list
/reset          forget the conversation (the system prompt stays)
/system [TEXT]  set the system prompt (without TEXT: show it)
/stats          figures of the last answer
/models         the members
/save FILE      write the conversation as JSON
/exit           quit (also Ctrl-D)
Start a message with // to send a text that begins with /.
Ctrl-C stops an answer; what was written so far stays in the conversation."""


@click.command(help="Chat in the terminal; each answer streams as it is written.\n\n\b\nCommands:\n" + _CHAT_HELP
             + "\n\nIn /save files an interrupted answer has \"interrupted\": true.")
@click.option("--show", is_flag=True, help=_SHOW_HELP)
@settings_options
def chat(settings: Settings, show: bool) -> None:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for the prompt, where available)
    _tolerant_stdio()
    with open_ensemble(settings) as ensemble:
        ChatSession(ensemble, settings, Renderer([m.name for m in ensemble.members], show)).loop()


def _tolerant_stdio() -> None:
    """Let typed lines that are not UTF-8 through as lone surrogates (replaced later, with a warning) instead
    of a UnicodeDecodeError that would end the chat; an echo of such a line (a pipe, a test runner) prints
    U+FFFD instead of failing."""
    for stream, errors in ((sys.stdin, "surrogateescape"), (sys.stdout, "replace")):
        if isinstance(stream, io.TextIOWrapper) and stream.errors not in (errors, "surrogateescape"):
            with contextlib.suppress(ValueError, io.UnsupportedOperation):  # e.g. already closed
                stream.reconfigure(errors=errors)


class ChatSession:
    """One conversation: the ensemble, the turns so far, the system prompt and the last answer."""

    def __init__(self, ensemble: Ensemble, settings: Settings, renderer: Renderer) -> None:
        self.ensemble, self.settings, self.renderer = ensemble, settings, renderer
        self.system = clean_text(settings.system, "the system prompt") if settings.system else settings.system
        self.turns: list[dict[str, Any]] = []  # user and assistant messages; the system prompt is kept apart
        self.last: GenerationResult | None = None
        self.commands: dict[str, Callable[[str], bool | None]] = {
            "/help": self.help, "/reset": self.reset, "/system": self.set_system, "/stats": self.stats,
            "/models": self.models, "/save": self.save, "/exit": self.exit, "/quit": self.exit,
        }

    def messages(self) -> list[dict[str, Any]]:
        """The conversation as the API takes it (interrupted answers carry ``"interrupted": true``)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [dict(t) for t in self.turns]

    def loop(self) -> None:
        names = [m.name for m in self.ensemble.members]
        click.echo(f"Chatting with {' + '.join(names)} (policy {self.ensemble.config.policy}). "
                   "/help lists the commands, Ctrl-D quits.")
        if self.renderer.show:
            _note(self.renderer.legend())
        while True:
            try:
                line = _read_line()
            except KeyboardInterrupt:  # Ctrl-C at the prompt (perhaps meant for an answer that just ended)
                click.echo()
                _note("(Ctrl-D or /exit quits)")
                continue
            if line is None:  # Ctrl-D
                return
            if line.startswith("/") and not line.startswith("//"):
                name, _, arg = line.partition(" ")
                command = self.commands.get(name.lower())
                if command is None:
                    _error(f"unknown command {name}; /help lists the commands")
                elif command(arg.strip()):
                    return
            elif line:
                self.ask(line[1:] if line.startswith("//") else line)

    def ask(self, text: str) -> None:
        """Stream one answer; Ctrl-C stops it and keeps what was written."""
        text = clean_text(text, "your message")  # once, so that the history holds what the models saw
        self.turns.append({"role": "user", "content": text})
        written: list[str] = []
        try:
            with contextlib.closing(stream_answer(self.ensemble, self.settings, self._api_messages())) as events:
                for event in events:
                    written.append(event.text)  # before printing: the history holds at least what was shown
                    self.renderer.write(event)
                    self.last = event.result or self.last
        except KeyboardInterrupt:
            self.renderer.end_line()
            _note("[interrupted]")
            self.turns.append({"role": "assistant", "content": "".join(written), "interrupted": True})
            self.last = None
            return
        except EdgeEnsembleError as e:  # e.g. the conversation outgrew the context: the session goes on
            self.renderer.end_line()
            self.turns.pop()
            _error(str(e) + ("; /reset starts a new conversation" if self.turns else ""))
            return
        self.renderer.end_line()
        assert self.last is not None
        self.turns.append({"role": "assistant", "content": self.last.text})
        _note(footer(self.last, self.settings.calibration))

    def _api_messages(self) -> list[dict[str, str]]:
        return [{"role": m["role"], "content": m["content"]} for m in self.messages()]

    # -- slash commands: each returns True to end the chat --------------------------------------------------

    def help(self, _arg: str) -> None:
        click.echo(_CHAT_HELP)

    def reset(self, _arg: str) -> None:
        self.turns, self.last = [], None
        click.echo("Conversation cleared" + (" (system prompt kept)." if self.system else "."))

    def set_system(self, arg: str) -> None:
        if not arg:
            click.echo(f"System prompt: {self.system}" if self.system else "No system prompt.")
            return
        self.system = clean_text(arg, "the system prompt")
        click.echo("System prompt set.")

    def stats(self, _arg: str) -> None:
        if self.last is None:
            click.echo("No figures: no answer yet, or the last one was interrupted.")
            return
        s = self.last.stats
        per_member = ", ".join(f"{name} {s.member_decoded_tokens.get(name, 0)} tokens in "
                               f"{s.member_decode_seconds.get(name, 0.0):.3f} s" for name in s.members)
        rows = [
            ("policy", s.policy),
            ("finish", self.last.finish_reason),
            ("tokens", f"{s.tokens} (ensembled {s.ensembled_tokens})"),
            ("E/T", f"{s.ensembled_fraction:.2f}"),
            *((name.replace("_", " "), _figure(name, value)) for name, value in s.policy_stats.items()),
            ("tokenizers", _tokenizer_summary(s.shared_tokenizer)),
            ("speed", f"{s.tokens_per_second:.1f} tok/s ({s.generation_seconds:.2f} s)"),
            ("prompt", ", ".join(f"{k} {v} tokens" for k, v in s.prompt_tokens.items())
             + f" ({s.prompt_seconds:.2f} s)"),
            ("member decoding", per_member),
            ("peak memory", f"{s.peak_memory_mb:.0f} MB"),
        ]
        click.echo(_table(rows))

    def models(self, _arg: str) -> None:
        rows = [(m.role, m.name, f"{m.architecture}, {m.n_vocab:,} tokens, chat template "
                 f"{'yes' if m.chat_template else 'no'}", f"{_mb(m.size_bytes)}  {m.path}")
                for m in self.ensemble.members]
        click.echo(_table(rows))

    def save(self, arg: str) -> None:
        if not arg:
            _error("usage: /save FILE")
            return
        path = Path(arg).expanduser()
        data = {"members": [_member_dict(m) for m in self.ensemble.members], "policy": self.ensemble.config.policy,
                "preset": self.settings.preset, "system": self.system, "messages": self.messages()}
        try:
            paths.write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            _error(f"cannot save to {path}: {e.strerror or e}")
            return
        click.echo(f"Saved {len(self.turns)} messages to {path}.")

    def exit(self, _arg: str) -> bool:
        return True


def _figure(name: str, value: Any) -> str:
    """A policy's figure as /stats shows it: rates in percent, counts per member listed, none as "-"."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
    if isinstance(value, float) and name.endswith("_rate"):
        return f"{value:.0%}"
    return str(value)


def _read_line() -> str | None:
    """The next line typed, stripped; None at the end of input (Ctrl-D). Ctrl-C raises KeyboardInterrupt."""
    try:
        return click.prompt(">", prompt_suffix=" ", default="", show_default=False).strip()
    except click.Abort as e:  # click turns both Ctrl-C and Ctrl-D into Abort; the original is its context
        if isinstance(e.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        return None


def _tokenizer_summary(shared: dict[str, bool]) -> str:
    """Which members use the drafter's token ids (same tokenizer) and which re-tokenize the text."""
    same = [n for n, s in shared.items() if s]
    other = [n for n, s in shared.items() if not s]
    if not other:
        return "one tokenizer shared by all (token ids, no re-tokenization)"
    return f"drafter's ids: {', '.join(same)}; re-tokenized: {', '.join(other)}"
