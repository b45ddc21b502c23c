"""``edge-ensemble run``: answer one prompt (an argument, or stdin) and exit."""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import asdict
from typing import Iterator

import click

from ..api import Ensemble
from ..chat import clean_text
from ..config import Settings
from ..engine import Event, GenerationResult
from ..errors import UsageError
from ..logs import Logbook, exchange
from .common import _note, open_ensemble, stream_answer
from .flags import _SHOW_HELP, settings_options
from .render import Renderer, _member_dict, branch_summary, branch_tree, footer


@click.command()
@click.argument("prompt", required=False)
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (text, finish_reason, stats, provenance, members, policy, preset, "
                   "config, generation) instead of streaming text; not with --show.")
@click.option("--show", is_flag=True, help=_SHOW_HELP)
@click.option("--raw", is_flag=True,
              help="Continue PROMPT as raw text: no chat template and no system prompt; each member tokenizes "
                   "it itself (its own BOS; control-token text such as <|im_start|> is parsed as markup).")
@settings_options
def run(settings: Settings, prompt: str | None, as_json: bool, show: bool, raw: bool) -> None:
    """Answer one PROMPT and exit; without PROMPT (or with -) the prompt is read from stdin.

    The answer streams to stdout; a line of figures follows on stderr. The exchange is then kept in the
    conversation log (`edge-ensemble logs`), unless --no-log.
    """
    if as_json and show:
        raise UsageError("--show marks the streamed text and --json streams none (its \"provenance\" says which "
                         "member won each ensembled token); give one of them")
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
                       "config": {**settings.ensemble.to_dict(), "calibrated": calibrated},
                       "generation": asdict(settings.generation)}
            click.echo(json.dumps(payload, ensure_ascii=False))
            _log(settings, ensemble, result, messages, text if raw else None)
            return
        renderer = Renderer([m.name for m in ensemble.members], show)
        if show:
            _note(renderer.legend())
        result = None
        try:
            # a vote's first answer streams as it is written when a person watches; piped, only the answer returned
            for event in answer(ensemble, settings, messages, preview=sys.stdout.isatty()):
                renderer.write(event)
                result = event.result or result
        finally:
            renderer.end_line()
        if result is not None:
            _note(footer(result, settings.calibration))
            if len(result.branches) > 1:
                _note(branch_summary(result))
                if show:
                    for line in branch_tree(result):
                        _note(line)
            _log(settings, ensemble, result, messages, text if raw else None)


def _log(settings: Settings, ensemble: Ensemble, result: GenerationResult, messages: list[dict[str, str]] | None,
         raw: str | None) -> None:
    """Keep the exchange in the conversation log, once the answer is out (a failure is one warning line)."""
    if settings.log:
        sys.stdout.flush()  # the answer is shown first, whatever the log does
        Logbook().record(lambda: exchange("run", ensemble, result, messages=messages, raw=raw,
                                          call=asdict(settings.generation), preset=settings.preset))


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


def _last(events: Iterator[Event]) -> GenerationResult:
    result = None
    for event in events:
        result = event.result or result
    assert result is not None  # the engine always ends with a result event
    return result
