"""``edge-ensemble logs``: the conversation log (:mod:`edge_ensemble.logs`): list, search and show the exchanges
kept by ``run``, ``chat`` and ``serve``, and say where the database is."""

from __future__ import annotations

import json
from typing import Any, Callable

import click

from ..logs import SOURCES, Exchange, Logbook
from ..options import GENERATION, OFF
from ..policies import registry
from .common import _note, _table


def _list_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options of ``logs`` and ``logs list`` (the same listing)."""
    for option in reversed((
        click.option("-n", "count", type=click.IntRange(min=0), default=10, show_default=True,
                     help="How many of the most recent exchanges; 0 = all."),
        click.option("-q", "--query", metavar="TEXT", help="Only exchanges whose prompt or answer holds TEXT "
                     "(any case for ASCII letters)."),
        click.option("--source", type=click.Choice(SOURCES), help="Only exchanges of this command."),
        click.option("--json", "as_json", is_flag=True, help="Print a JSON list of the whole records."),
    )):
        command = option(command)
    return command


@click.group(invoke_without_command=True)
@_list_options
@click.pass_context
def logs(ctx: click.Context, count: int, query: str | None, source: str | None, as_json: bool) -> None:
    """The conversation log: every exchange of run, chat and serve, kept in SQLite.

    Without a command: `logs list`. Oldest first, the newest last (as `llm logs` does), so the latest is
    next to the prompt. --no-log (or `log = false` in the config file) keeps an exchange out of it.
    """
    if ctx.invoked_subcommand is None:
        _list(count, query, source, as_json)


@logs.command("list")
@_list_options
def logs_list(count: int, query: str | None, source: str | None, as_json: bool) -> None:
    """List the most recent exchanges, oldest first (-n of them)."""
    _list(count, query, source, as_json)


@logs.command("show")
@click.argument("exchange_id", metavar="ID", type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the whole record as one JSON object.")
def logs_show(exchange_id: int, as_json: bool) -> None:
    """Show one exchange whole: the messages, the answer marked with who wrote it, the settings and figures."""
    book = Logbook()
    entry = book.get(exchange_id)
    if entry is None:
        raise click.BadParameter(f"no exchange {exchange_id} in {book.path} (`edge-ensemble logs` lists them)",
                                 param_hint="ID")
    if as_json:
        click.echo(json.dumps(entry.to_dict(), ensure_ascii=False, indent=2))
        return
    for line in _details(entry):
        click.echo(line)


@logs.command("path")
def logs_path() -> None:
    """Print where the conversation log is (set $EDGE_ENSEMBLE_LOGS to keep it elsewhere)."""
    click.echo(str(Logbook().path))


def _list(count: int, query: str | None, source: str | None, as_json: bool) -> None:
    book = Logbook()
    entries = book.recent(count, query, source)
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in entries], ensure_ascii=False, indent=2))
        return
    if not entries:
        what = "matching exchange" if query or source else "exchange"
        where = "" if book.path.exists() else " (it does not exist yet)"
        click.echo(f"No {what} in the conversation log {book.path}{where}.")
        return
    rows = [(str(e.id), _when(e.time), e.source, e.policy or "-", str(e.stats.get("tokens", "-")),
             _short(e.prompt), _short(e.answer)) for e in entries]
    click.echo(_table(rows, ("id", "time (UTC)", "source", "policy", "tokens", "prompt", "answer")))
    _note("`edge-ensemble logs show ID` shows one whole.")


def _when(time: str) -> str:
    return time[:19].replace("T", " ")


def _short(text: str, width: int = 36) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[:width - 3] + "..."


def _details(e: Exchange) -> list[str]:
    """An exchange as ``logs show`` prints it."""
    members = ", ".join(f"{m.get('name')} ({m.get('role')})" for m in e.members)
    options = ", ".join(f"{k} {_value(k, v)}" for k, v in e.options.items())
    s = e.stats
    figures = [f"{s['tokens']} tokens" if "tokens" in s else "",
               f"{s['tokens_per_second']:.1f} tok/s" if isinstance(s.get("tokens_per_second"), (int, float)) else "",
               f"E/T {s['ensembled_fraction']:.2f}" if isinstance(s.get("ensembled_fraction"), (int, float)) else ""]
    rows = [("exchange", f"{e.id}, {e.time}, {e.source}" + (f", conversation {e.conversation}" if e.conversation
                                                              else "")),
            ("members", (f"preset {e.preset}: " if e.preset else "") + members),
            ("policy", f"{e.policy or '-'}" + (f" ({options})" if options else "")),
            ("finish", f"{e.finish_reason or '-'}; " + ", ".join(f for f in figures if f))]
    lines = [_table(rows), ""]
    if e.messages is None:
        lines += ["raw text:", e.prompt, ""]
    else:
        for m in e.messages:
            lines += [f"{m.get('role')}:", str(m.get("content", "")), ""]
    lines += ["answer ([text|member]: a stretch the members chose, and who won it):", _marked(e)]
    for b in e.branches or []:
        lines.append(f"branch #{b.get('index')} ({b.get('origin')}, {b.get('tokens')} tokens, answer "
                     f"{b.get('answer')!r}, {b.get('votes')} votes{', chosen' if b.get('chosen') else ''}): "
                     f"{_short(str(b.get('text', '')), 60)}")
    return lines


def _marked(e: Exchange) -> str:
    """The answer with each stretch the members chose marked ``[text|member]`` (as ``run --show`` marks it off a
    terminal); the plain answer when there is no provenance."""
    if not e.provenance or "".join(p.get("text", "") for p in e.provenance) != e.answer:
        return e.answer
    return "".join(f"[{p['text']}|{p['winner']}]" if p.get("winner") else p.get("text", "") for p in e.provenance)


def _value(name: str, v: Any) -> str:
    """An option's value as the command line spells it (None: "off", or what it means, e.g. a random seed)."""
    if v is None:
        declared = GENERATION.get(name) or registry.policy_options().get(name)
        return "none" if declared is None else OFF if declared.off else declared.default_text
    if isinstance(v, list):
        return ",".join(map(str, v)) or "none"
    return str(v)
