"""``edge-ensemble chat``: a conversation in the terminal (:class:`ChatSession`), with slash commands."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import json
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

import click

from .. import paths
from ..api import Ensemble, EnsembleConfig
from ..chat import VALID_ROLES, clean_text
from ..config import Settings, describe_policy
from ..engine import GenerationResult
from ..errors import EdgeEnsembleError, UsageError
from ..logs import Logbook, exchange
from ..options import GENERATION, LOAD_OPTIONS, OFF, Option, declarations
from ..policies import POLICY, registry
from .chat_input import Reader, bracketed_paste
from .common import _error, _mb, _note, _table, open_ensemble
from .flags import _SHOW_HELP, settings_options
from .render import Renderer, _member_dict, footer


_CHAT_HELP = """\
/help           this list
/reset          forget the conversation (the system prompt stays)
/system [TEXT]  set the system prompt (without TEXT: show it)
/stats          figures of the last answer
/models         the members
/policy [NAME]  answer with another policy (without NAME: list them)
/set NAME VALUE set a generation or policy option (without NAME: list them)
/save FILE      write the conversation as JSON
/load FILE      go on with a conversation that /save wrote
/exit           quit (also Ctrl-D)
A paste of several lines is one message, and so is a message that starts
with a line beginning with \"\"\" and ends with a line ending with \"\"\".
Start a message with // to send a text that begins with /.
Ctrl-C stops an answer; what was written so far stays in the conversation."""


@click.command(help="Chat in the terminal; each answer streams as it is written.\n\n\b\nCommands:\n" + _CHAT_HELP
             + "\n\nIn /save files an interrupted answer has \"interrupted\": true.")
@click.option("--show", is_flag=True, help=_SHOW_HELP)
@click.option("-c", "--continue", "resume", is_flag=True,
              help="Go on with the last chat conversation in the conversation log (`edge-ensemble logs`).")
@settings_options
def chat(settings: Settings, show: bool, resume: bool) -> None:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for the prompt, where available)
    _tolerant_stdio()
    last = _last_conversation() if resume else None  # (before any model loads: a damaged log fails first)
    with open_ensemble(settings) as ensemble:
        session = ChatSession(ensemble, settings, Renderer([m.name for m in ensemble.members], show))
        if last is not None:
            session.resume(*last)
        with contextlib.closing(session), bracketed_paste():  # (/policy may have loaded another ensemble)
            session.loop()


def _last_conversation() -> tuple[str, str | None, list[dict[str, Any]]]:
    """The last chat conversation of the log: its id, system prompt and turns (its last answer included)."""
    book = Logbook()
    last = book.recent(1, source="chat")
    if not last or last[0].messages is None:
        raise UsageError(f"no chat conversation in the conversation log {book.path} to continue; start one with "
                         "`edge-ensemble chat`")
    entry = last[0]
    messages = [*entry.messages, {"role": "assistant", "content": entry.answer}]
    system, turns = saved_conversation({"messages": messages}, f"the conversation log {book.path} (exchange {entry.id})")
    return entry.conversation or uuid.uuid4().hex, system, turns


def _tolerant_stdio() -> None:
    """Let typed lines that are not UTF-8 through as lone surrogates (replaced later, with a warning) instead
    of a UnicodeDecodeError that would end the chat; an echo of such a line (a pipe, a test runner) prints
    U+FFFD instead of failing."""
    for stream, errors in ((sys.stdin, "surrogateescape"), (sys.stdout, "replace")):
        if isinstance(stream, io.TextIOWrapper) and stream.errors not in (errors, "surrogateescape"):
            with contextlib.suppress(ValueError, io.UnsupportedOperation):  # e.g. already closed
                stream.reconfigure(errors=errors)


class ChatSession:
    """One conversation: the ensemble, the turns so far, the system prompt, the last answer, and what the slash
    commands changed: ``settings.generation`` (``/set``) and ``call``, the policy and policy options each answer
    passes to :meth:`~edge_ensemble.api.Ensemble.stream` in place of the ensemble's own."""

    def __init__(self, ensemble: Ensemble, settings: Settings, renderer: Renderer) -> None:
        self.ensemble, self.settings, self.renderer = ensemble, settings, renderer
        self.system = clean_text(settings.system, "the system prompt") if settings.system else settings.system
        self.turns: list[dict[str, Any]] = []  # user and assistant messages; the system prompt is kept apart
        self.last: GenerationResult | None = None
        self.call: dict[str, Any] = {}  # /policy and the policy options of /set, checked
        self.logbook = Logbook() if settings.log else None
        self.conversation = uuid.uuid4().hex  # the id its turns share in the conversation log
        self.commands: dict[str, Callable[[str], bool | None]] = {
            "/help": self.help, "/reset": self.reset, "/system": self.set_system, "/stats": self.stats,
            "/models": self.models, "/policy": self.set_policy, "/set": self.set_option, "/save": self.save,
            "/load": self.load, "/exit": self.exit, "/quit": self.exit,
        }

    @property
    def policy(self) -> str:
        """The policy of the next answer."""
        return self.call.get("policy", self.ensemble.config.policy)

    def close(self) -> None:
        self.ensemble.close()

    def resume(self, conversation: str, system: str | None, turns: list[dict[str, Any]]) -> None:
        """Go on with a logged conversation (``chat --continue``): its turns, its system prompt, its id."""
        self.conversation, self.turns = conversation, turns
        self.system = system if system is not None else self.system
        _note(f"(continuing the last conversation: {len(turns)} messages)")

    def messages(self) -> list[dict[str, Any]]:
        """The conversation as the API takes it (interrupted answers carry ``"interrupted": true``)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [dict(t) for t in self.turns]

    def loop(self) -> None:
        names = [m.name for m in self.ensemble.members]
        click.echo(f"Chatting with {' + '.join(names)} (policy {describe_policy(self.settings)}). "
                   "/help lists the commands, Ctrl-D quits.")
        if self.renderer.show:
            _note(self.renderer.legend())
        reader = Reader(note=_note)
        while True:
            try:
                entry = reader.read()
            except KeyboardInterrupt:  # Ctrl-C at the prompt (perhaps meant for an answer that just ended)
                click.echo()
                _note("(Ctrl-D or /exit quits)")
                continue
            if entry is None:  # Ctrl-D
                return
            line = entry.text
            if entry.multiline:  # a paste or a """ block: a message as it is, even if it starts with /
                if line:
                    self.ask(line)
            elif line.startswith("/") and not line.startswith("//"):
                if self.command(line):
                    return
            elif line:
                self.ask(line[1:] if line.startswith("//") else line)

    def command(self, line: str) -> bool:
        """Run one slash command; True ends the chat. A refused command says why in one line; the chat goes on."""
        name, _, arg = line.partition(" ")
        command = self.commands.get(name.lower())
        if command is None:
            _error(f"unknown command {name}; /help lists the commands")
            return False
        try:
            return bool(command(arg.strip()))
        except EdgeEnsembleError as e:
            _error(str(e))
            return False

    def ask(self, text: str) -> None:
        """Stream one answer; Ctrl-C stops it and keeps what was written."""
        text = clean_text(text, "your message")  # once, so that the history holds what the models saw
        self.turns.append({"role": "user", "content": text})
        written: list[str] = []
        options = {**dataclasses.asdict(self.settings.generation), **self.call}
        sent = self._api_messages()
        try:
            with contextlib.closing(self.ensemble.stream(messages=sent, preview=True, **options)) as events:
                for event in events:
                    if event.kind != "status":  # before printing: the history holds at least what was shown
                        written.append(event.text)
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
        # The calibration's date only while its settings are the ones answering.
        _note(footer(self.last, None if self.call else self.settings.calibration))
        if self.logbook is not None:  # after the answer is shown; a failure is one warning line
            last, conversation = self.last, self.conversation
            self.logbook.record(lambda: exchange("chat", self.ensemble, last, messages=sent, call=options,
                                                 preset=self.settings.preset, conversation=conversation))

    def _api_messages(self) -> list[dict[str, str]]:
        return [{"role": m["role"], "content": m["content"]} for m in self.messages()]

    # -- slash commands: each returns True to end the chat --------------------------------------------------

    def help(self, _arg: str) -> None:
        click.echo(_CHAT_HELP)

    def reset(self, _arg: str) -> None:
        self.turns, self.last = [], None
        self.conversation = uuid.uuid4().hex
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
        data = {"members": [_member_dict(m) for m in self.ensemble.members], "policy": self.policy,
                "preset": self.settings.preset, "system": self.system, "messages": self.messages()}
        try:
            paths.write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            _error(f"cannot save to {path}: {e.strerror or e}")
            return
        click.echo(f"Saved {len(self.turns)} messages to {path}.")

    def load(self, arg: str) -> None:
        if not arg:
            raise UsageError("usage: /load FILE (a conversation that /save wrote)")
        path = Path(arg).expanduser()
        try:
            data = json.loads(path.read_text("utf-8"))
        except OSError as e:
            raise UsageError(f"cannot load {path}: {e.strerror or e}") from None
        except ValueError as e:  # not UTF-8, not JSON
            raise UsageError(f"cannot load {path}: not a conversation that /save wrote (not JSON: {e})") from None
        self.system, self.turns = saved_conversation(data, str(path))
        self.last, self.conversation = None, uuid.uuid4().hex
        click.echo(f"Loaded {len(self.turns)} messages from {path}"
                   + (" (with a system prompt)." if self.system else "."))
        saved_policy = data.get("policy")
        if isinstance(saved_policy, str) and saved_policy != self.policy:
            _note(f"(saved under policy {saved_policy}; this chat answers with {self.policy}: "
                  f"/policy {saved_policy} switches)")

    # -- /policy and /set: what the next answers are made with ---------------------------------------------

    def set_policy(self, arg: str) -> None:
        if not arg:
            click.echo(f"Policy: {self.policy}. The policies (/policy NAME switches):")
            click.echo(_table([(f"  {name}", summary) for name, summary in registry.summaries()]))
            return
        name = POLICY.from_text(arg, "/policy")
        self._apply({**self.call, "policy": name})
        click.echo(f"Policy {name}: the next answers use it.")

    def set_option(self, arg: str) -> None:
        if not arg:
            self._list_options()
            return
        name, _, text = arg.partition(" ")
        name, text = name.lower().replace("-", "_"), text.strip()
        if name == "policy":
            self.set_policy(text)
            return
        if not text:
            raise UsageError(f"usage: /set {name} VALUE (/set lists the options and their values)")
        if name in GENERATION:
            value = GENERATION[name].from_text(text, name)
            self.settings = dataclasses.replace(
                self.settings, generation=dataclasses.replace(self.settings.generation, **{name: value}))
            click.echo(f"{name} = {_shown(value, GENERATION[name])}")
            return
        load = next((o for o in LOAD_OPTIONS if name in (o.name, o.key)), None)
        if load is not None:
            raise UsageError(f"{name} is fixed when the models load; restart the chat with {load.flag} {text}")
        declaration = registry.declaration(name, self.policy)
        if declaration is None:
            known = [*GENERATION, *registry.policy_options()]
            close = difflib.get_close_matches(name, known, n=1)
            raise UsageError(f"unknown option {name}" + (f"; did you mean {close[0]}?" if close else "")
                             + " (/set lists the options)")
        value = declaration.from_text(text, name)
        self._apply({**self.call, name: value})
        readers = registry.policies_reading(name)
        click.echo(f"{name} = {_shown(self.call[name], declaration)}" + ("" if self.policy in readers else
                   f" (read by {', '.join(readers)}; policy {self.policy} does not read it)"))

    def _list_options(self) -> None:
        config = self._config()
        options: list[tuple[Option, Any]] = [(o, getattr(self.settings.generation, o.name)) for o in GENERATION.values()]
        options += [(o, getattr(config, o.name)) for o in declarations(registry.get(self.policy).Options)]
        click.echo(f"Options of the next answers (policy {self.policy}); /set NAME VALUE changes one:")
        click.echo(_table([(f"  {o.name}", _shown(value, o), o.allowed(f'"{OFF}"')) for o, value in options]))

    def _config(self, call: dict[str, Any] | None = None) -> EnsembleConfig:
        return dataclasses.replace(self.ensemble.config, **(self.call if call is None else call))

    def _apply(self, call: dict[str, Any]) -> None:
        """Make ``call`` (the policy and policy options) the next answers', checked as the ensemble checks a call's.
        A chat that loaded only the drafter (its policy reads no other member) loads every member for a policy
        that reads them; a policy these models cannot serve otherwise is refused in one line."""
        n_all = len(self.settings.members)
        policy = call.get("policy", self.ensemble.config.policy)
        if len(self.ensemble.members) < n_all and not registry.get(policy).drafter_only:
            config = dataclasses.replace(self.settings.ensemble, **call).validate(n_all)
            self._reload(config)
        else:
            config = self._config(call).validate(len(self.ensemble.members))
            reason = self.ensemble.unmet_needs(config)
            if reason:
                raise UsageError(f"policy {policy} with these options needs {reason}; restart the chat with "
                                 f"--policy {policy} (and these options as flags)")
        self.call = {name: config.given[name] for name in call}

    def _reload(self, config: EnsembleConfig) -> None:
        """Every member, loaded for ``config``, in place of the drafter alone (kept if that fails)."""
        _note(f"(this chat loaded only the drafter; loading all {len(self.settings.members)} members for "
              f"policy {config.policy})")
        ensemble = Ensemble(list(self.settings.members), config=config, progress=True)
        self.ensemble, old = ensemble, self.ensemble
        old.close()
        self.renderer = Renderer([m.name for m in ensemble.members], self.renderer.show)
        if self.renderer.show:
            _note(self.renderer.legend())

    def exit(self, _arg: str) -> bool:
        return True


def saved_conversation(data: Any, where: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The system prompt and the turns of a conversation as ``/save`` wrote it (its ``messages``), checked; a
    one-line :class:`UsageError` naming ``where`` and the first thing wrong."""
    bad = f"cannot load {where}: not a conversation that /save wrote"
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list):
        raise UsageError(f'{bad} (no "messages" list)')
    system, turns = None, []
    for i, m in enumerate(messages):
        if (not isinstance(m, dict) or m.get("role") not in VALID_ROLES or not isinstance(m.get("content"), str)
                or not set(m) <= {"role", "content", "interrupted"}):
            raise UsageError(f'{bad} (message {i} must be {{"role": {"|".join(VALID_ROLES)}, "content": TEXT}}, '
                             f'and "interrupted": true for an interrupted answer)')
        if "interrupted" in m and (m["role"] != "assistant" or not isinstance(m["interrupted"], bool)):
            raise UsageError(f'{bad} (message {i}: only an answer is "interrupted", true or false)')
        content = clean_text(m["content"], f"{where}: message {i}")
        if m["role"] == "system":
            if i != 0:
                raise UsageError(f"{bad} (message {i}: only the first message may be the system prompt)")
            system = content
            continue
        turns.append({"role": m["role"], "content": content, **({"interrupted": True} if m.get("interrupted") else {})})
    return system, turns


def _shown(value: Any, option: Option) -> str:
    """An option's value as /set writes it (None: "off", or what it means, e.g. a random seed)."""
    if value is None:
        return OFF if option.off else option.default_text
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _figure(name: str, value: Any) -> str:
    """A policy's figure as /stats shows it: rates in percent, counts per member listed, none as "-"."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "-"
    if isinstance(value, float) and name.endswith("_rate"):
        return f"{value:.0%}"
    return str(value)


def _tokenizer_summary(shared: dict[str, bool]) -> str:
    """Which members use the drafter's token ids (same tokenizer) and which re-tokenize the text."""
    same = [n for n, s in shared.items() if s]
    other = [n for n, s in shared.items() if not s]
    if not other:
        return "one tokenizer shared by all (token ids, no re-tokenization)"
    return f"drafter's ids: {', '.join(same)}; re-tokenized: {', '.join(other)}"
