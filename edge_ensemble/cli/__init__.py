"""The command line: ``edge-ensemble chat | run | serve | logs | models | presets | eval | calibrate | route |
doctor``.

A thin click layer over :class:`edge_ensemble.api.Ensemble`. The options shared by ``chat`` and ``run`` are
defined once (:func:`~edge_ensemble.cli.flags.settings_options`) and merged with the user config file into one
validated :class:`~edge_ensemble.config.Settings` before any model loads (see :mod:`edge_ensemble.config`).

Every error is one line ``error: ...`` on stderr, never a traceback (:class:`~edge_ensemble.cli.common._Cli` is
the one place that turns exceptions into exit codes): 0 success; 1 the command could not be carried out (model
unknown, missing or unreadable, not enough memory, prompt longer than the context, failed download); 2 usage (bad
option, option value or config file); 3 llama.cpp crashed in ``doctor``'s test decode; 130 interrupted with Ctrl-C.

This module is only the dispatcher: the top-level group, :func:`main` (the console script) and the commands added
to the group. Each command is a module of its own (:mod:`.run`, :mod:`.chat`, :mod:`.serve`, :mod:`.models` with
``presets``, :mod:`.logs`, :mod:`.doctor`, :mod:`.eval`, :mod:`.calibrate`, :mod:`.route`); they import the shared machinery
(:mod:`.common`: errors and exit codes, output, the catalog; :mod:`.flags`: flags made from the declared
options; :mod:`.render`: showing an answer), never each other.
"""

from __future__ import annotations

import importlib.metadata

import click

from .. import __version__
from . import calibrate, chat, doctor, eval as eval_, logs, models, route, run, serve  # (eval_: not the builtin)
from .chat import ChatSession
from .common import EXIT_INTERRUPTED, _Cli, open_ensemble, stream_answer
from .flags import preset_default, resolved_defaults, settings_options
from ..config import describe_policy
from ..options import Option
from ..policies import DEFAULT_POLICY, registry
from .models import _expand  # noqa: F401  (tests/test_remote.py imports it from here)
from .render import Renderer, branch_summary, branch_tree, footer

__all__ = ["cli", "main", "settings_options", "open_ensemble", "stream_answer", "Renderer", "footer",
           "branch_summary", "branch_tree", "ChatSession", "EXIT_INTERRUPTED"]


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    try:
        llama = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        llama = "not installed"
    click.echo(f"edge-ensemble {__version__} (llama-cpp-python {llama})")
    ctx.exit()


class _TopLevel(_Cli):
    """The top-level group; its help states what a plain run answers with, as resolved when the help is shown."""

    def format_help_text(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        template = self.help or ""
        resolved = resolved_defaults(ctx)
        plain = (f"A plain `run` (no options) answers with preset {preset_default(resolved)}, policy "
                 f"{describe_policy(resolved)}; --policy {DEFAULT_POLICY} ensembles." if resolved is not None else "")
        self.help = template.replace(_PLAIN_RUN, plain)
        try:
            super().format_help_text(ctx, formatter)
        finally:
            self.help = template


_PLAIN_RUN = "(what a plain run answers with)"


@click.group(cls=_TopLevel, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-V", "--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and exit.")
def cli() -> None:
    """Several local GGUF models write one answer together, token by token.

    Under policy {default_policy} the first member drafts a few tokens ({draft_flag});
    where its top-1 probability is below {gate_flag} (default {gate_default};
    {entropy_flag} adds an entropy test, {entropy_default} by default) the other
    members verify, and the ensemble picks the next token from the union of
    their candidates. A preset may ship a calibration that chose other
    settings (`edge-ensemble presets` shows each one's policy).
    (what a plain run answers with)

    \b
    Settings: a flag > the config file > a preset's calibration > the built-in default.
    The config file is TOML at $EDGE_ENSEMBLE_CONFIG (which must exist when set),
    else at $XDG_CONFIG_HOME/edge-ensemble/config.toml (~/.config/edge-ensemble/...).
    Its keys are the long options of `chat` and `run` with underscores:
        preset = "tiny"        # or: members = ["a.gguf", "b.gguf"]
        policy = "{default_policy}"
        gate = 0.6             # or "off"
        draft_len = 5
        threads = 4
        max_tokens = 400
        log = false            # keep no conversation log (`edge-ensemble logs`)

    \b
    Exit codes: 0 ok; 1 the command failed (model missing or unreadable,
    not enough memory, prompt longer than the context, download failed);
    2 bad usage (options, values, config file, unknown preset); 3 llama.cpp
    crashed (doctor); 130 interrupted (Ctrl-C).
    """


def _declared(name: str) -> Option:
    """The declaration of the default policy's option ``name`` (the top-level help states its flag and default)."""
    option = registry.declaration(name, DEFAULT_POLICY)
    assert option is not None
    return option


cli.help = (cli.help or "").format(
    default_policy=DEFAULT_POLICY, draft_flag=_declared("draft_len").flag, gate_flag=_declared("gate").flag,
    gate_default=_declared("gate").default_text, entropy_flag=_declared("gate_entropy").flag,
    entropy_default=_declared("gate_entropy").default_text)


def main() -> None:
    """Console-script entry point (``edge-ensemble``)."""
    cli.main(prog_name="edge-ensemble")


# Every command; --help lists them in name order, whatever the order here.
for _command in (run.run, chat.chat, serve.serve, logs.logs, models.models, models.presets, doctor.doctor,
                 eval_.eval_command, calibrate.calibrate_command, route.route):
    cli.add_command(_command)
