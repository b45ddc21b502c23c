"""The machinery every command shares.

The top-level group class (:class:`_Cli`, the one place where an exception becomes one ``error: ...`` line and
an exit code), notes and tables on the terminal, the catalog, ``--shard K/N``, the ``--preset``/``--model``
choice of ``eval``, ``calibrate`` and ``route train`` (:class:`EnsembleChoice`), and loading and streaming an
ensemble (:func:`open_ensemble`, :func:`stream_answer`).

Names with a leading underscore are private to the package :mod:`edge_ensemble.cli`: its command modules
import them, nothing outside it should.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import click

from ..api import Ensemble
from ..config import Settings, find_preset
from ..engine import Event
from ..errors import EdgeEnsembleError, EdgeEnsembleWarning, UsageError
from ..policies import registry

if TYPE_CHECKING:  # pragma: no cover
    from ..sources import Preset


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


# -- output -------------------------------------------------------------------------------------------------


def _color_ok(stream: Any) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


def _note(text: str) -> None:
    """A dimmed line on stderr (figures and notices, kept out of the answer on stdout)."""
    click.echo(click.style(text, dim=True), err=True, color=_color_ok(sys.stderr))


def _mb(n: int | None) -> str:
    return "?" if not n else f"{n / 1e6:,.1f} MB"


def _table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    rows = [list(header)] + [list(r) for r in rows] if header else [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _catalog() -> Any:
    from ..sources import Catalog

    return Catalog.load()


# -- options of several commands ----------------------------------------------------------------------------


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    """``--shard K/N`` as (K, N), checked: N >= 1 and 0 <= K < N."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise UsageError(f"--shard must be K/N with 0 <= K < N (0/2 and 1/2 split a run in two); got {text!r}")
    return int(match[1]), int(match[2])


@dataclass(frozen=True)
class EnsembleChoice:
    """The ensemble that ``-p/--preset NAME`` or ``-m/--model MODEL`` (repeated) names in ``eval``, ``calibrate``
    and ``route train``: never both (checked when it is made, so that the command can make it before anything
    else fails or loads), else the members given, else a preset's. (``run``, ``chat`` and ``serve`` take the same
    two flags through :func:`~edge_ensemble.cli.flags.settings_options`, where
    :func:`~edge_ensemble.config.resolve_settings` weighs them against the config file.)"""

    preset: str | None
    members: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.preset and self.members:
            raise UsageError("give either --preset or --model, not both")

    def chosen_preset(self, catalog: Any, default: str | None = None) -> Preset | None:
        """The catalog's preset, or None with ``--model``; without either flag ``default``, else the catalog's
        default preset. An unknown name is a :class:`~edge_ensemble.errors.UsageError`."""
        if self.members:
            return None
        return find_preset(catalog, self.preset or default or catalog.default_preset.name)

    def specs(self, catalog: Any, default: str | None = None) -> list[str]:
        """The members as written: those given with ``--model``, else the chosen preset's (first drafts)."""
        chosen = self.chosen_preset(catalog, default)
        return list(self.members) if chosen is None else list(chosen.members)

    def label(self, catalog: Any, default: str | None = None) -> str:
        """The name the results go under (a directory, a head file): the preset as given, else the members'
        file names without extension joined by ``-``, else ``default``, else the default preset's name."""
        return self.preset or ("-".join(Path(m).stem for m in self.members) if self.members
                               else default or catalog.default_preset.name)


# -- the ensemble -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _loading_line(name: str, path: Path, stream: Any = None) -> Iterator[None]:
    """While a member loads, one line on stderr when it is a terminal: which member, its size and the seconds so
    far, redrawn in place and cleared once the member has loaded; nothing when stderr is not a terminal."""
    stream = stream or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        yield
        return
    try:
        size = _mb(path.stat().st_size)
    except OSError:
        size = "?"
    start, done = time.monotonic(), threading.Event()

    def draw() -> None:
        line = f"loading {name} ({size}) {time.monotonic() - start:.1f}s"
        stream.write("\r\x1b[2K" + click.style(line, dim=True) if _color_ok(stream) else "\r\x1b[2K" + line)
        stream.flush()

    def tick() -> None:
        while not done.wait(0.2):
            draw()

    draw()
    ticker = threading.Thread(target=tick, name="loading-line", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        stream.write("\r\x1b[2K")  # the line goes: what follows (the answer, a prompt) starts clean
        stream.flush()


def open_ensemble(settings: Settings, *, per_request_policy: bool = False) -> Ensemble:
    """Load the members (fetching catalog models on first use, with progress on stderr; on a terminal, a line
    while each loads).

    Under a policy that answers with the drafter alone (``single``: a flag, the config file, or a calibration that
    kept the drafter alone) only the drafter is loaded: the verifiers would never be read, yet cost their download, load time and memory. Not
    with ``per_request_policy`` (the server, whose requests may ask for another policy)."""
    members, config = list(settings.members), settings.ensemble
    if registry.get(config.policy).drafter_only and not per_request_policy:
        members, config = members[:1], replace(config, weights=None)
    return Ensemble(members, config=config, progress=True, loading=_loading_line)


def stream_answer(ensemble: Ensemble, settings: Settings, messages: Sequence[dict[str, str]] | None, *,
                  raw: str | None = None, preview: bool = False) -> Iterator[Event]:
    """The answer to ``messages`` (or the completion of ``raw`` text) as a stream of events, with the settings'
    generation options; ``preview``: a vote's first answer and progress too (a terminal)."""
    return ensemble.stream(messages=messages, raw=raw, preview=preview, **asdict(settings.generation))
