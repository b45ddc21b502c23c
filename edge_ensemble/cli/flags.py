"""Command-line flags made from the declared options (:mod:`edge_ensemble.options`, the policies' options).

Each declared option becomes one click option whose help states the allowed values and the default once
(:func:`_flag`). The options ``chat``, ``run`` and ``serve`` share are merged with the user config file into one
validated :class:`~edge_ensemble.config.Settings` before any model loads (:func:`settings_options`); ``eval`` and
``calibrate`` share their own (:data:`_eval_options`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import click

from ..config import KEYS, Resolved, declared, default_text, load_config, resolve_settings, resolve_values
from ..errors import EdgeEnsembleError
from ..logs import LOG
from ..options import EVAL_N_CTX, GENERATION, GENERATION_OPTIONS, LOAD_OPTIONS, Option
from ..policies import POLICY, policy_help, registry


_DEFAULT = "\0default\0"  # where a resolved default goes into a help text, once it is shown


def resolved_defaults(ctx: click.Context | None = None) -> Resolved | None:
    """The settings a plain ``run`` (no flag) resolves to: the config file over the default preset's calibration
    over the built-in defaults (:func:`~edge_ensemble.config.resolve_values`, what the commands resolve their flags
    with); read once per command line (kept in ``ctx.meta``). None when they cannot be resolved (a bad config file:
    the command itself will say so)."""
    meta = ctx.find_root().meta if ctx is not None else {}
    if "edge_ensemble.resolved" not in meta:
        try:
            meta["edge_ensemble.resolved"] = resolve_values({}, load_config())
        except EdgeEnsembleError:
            meta["edge_ensemble.resolved"] = None
    return meta["edge_ensemble.resolved"]


def preset_default(resolved: Resolved | None) -> str:
    """The ensemble a plain run uses, as ``--preset``'s help states it."""
    if resolved is None:
        return "the catalog's default"
    if resolved.preset is None:
        return f"none: the members in {resolved.config.path}"
    return resolved.preset + (f", from {resolved.config.path}" if "preset" in resolved.origins else "")


class _ResolvedOption(click.Option):
    """A flag whose help states its default as a plain run resolves it (a calibration, the config file; see
    :func:`resolved_defaults`), worked out when the help is shown, not when the program starts."""

    def __init__(self, *args: Any, config_key: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config_key = config_key
        self.help_template = self.help or ""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        resolved = resolved_defaults(ctx)
        if self.config_key == "preset":
            shown = preset_default(resolved)
        else:
            shown = declared(self.config_key).default_text if resolved is None else default_text(self.config_key, resolved)
        self.help = self.help_template.replace(_DEFAULT, shown)
        return super().get_help_record(ctx)


def _flag(option: Option, *, shown_default: str = "", prefix: str = "",
          resolved: bool = False) -> Callable[[Callable[..., Any]], Any]:
    """The click option of a declared option: its flag, and help that states the allowed values and the default
    once (``resolved``: the default as a plain run resolves it, see :class:`_ResolvedOption`). The value stays
    text: the declaration parses and checks it (:func:`resolve_settings`)."""
    bounds = option.bounds() + (" or off" if option.off else "")
    shown = f"{bounds}; " if bounds else ""
    text = option.help[0].lower() + option.help[1:] if prefix else option.help
    default = _DEFAULT if resolved else shown_default or option.default_text
    help = f"{prefix}{text} [{shown}default: {default}]"
    extra: dict[str, Any] = {"cls": _ResolvedOption, "config_key": option.key} if resolved else {}
    if option.type is bool:
        return click.option(f"{option.flag}/--no-{option.flag[2:]}", option.key, default=None, help=help, **extra)
    if option.item is str:
        return click.option(option.flag, option.key, multiple=True, metavar="TEXT", help=help, **extra)
    if option.metavar:
        metavar = option.metavar
    elif option.allowed_choices:
        metavar = "[" + "|".join(option.allowed_choices) + "]"
    elif option.type is tuple:
        metavar = "X1,X2,..."
    else:
        metavar = ("INT" if option.type is int else "FLOAT") + ("|off" if option.off else "")
    return click.option(option.flag, option.key, metavar=metavar, help=help, **extra)


def _policy_flag(option: Option) -> Callable[[Callable[..., Any]], Any]:
    """A policy option's flag; its help starts with the policies that read it ("safe: tokens drafted ...")."""
    return _flag(option, prefix=", ".join(registry.policies_reading(option.name)) + ": ", resolved=True)


def _declared_flags(options: Sequence[Option], into: str, *, defaults: bool = True,
                    shown: dict[str, str] | None = None) -> Callable[[Callable[..., Any]], Any]:
    """Add the flags of ``options`` to a command; it receives the values given, checked, as one dict ``into``
    (by option name), with each option's default where not given when ``defaults``. ``shown``: how --help
    shows a default that differs from the declaration's."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(**params: Any) -> Any:
            given = {o: params.pop(o.key) for o in options}
            # (a repeatable flag that was not given arrives as (): not given either)
            values = {o.name: o.from_text(v) for o, v in given.items() if v is not None and v != ()}
            if defaults:
                values = {o.name: values.get(o.name, o.default) for o in options}
            return command(**{into: values}, **params)

        for option in reversed(options):
            wrapper = _flag(option, shown_default=(shown or {}).get(option.name, ""))(wrapper)
        return wrapper

    return decorate


# -- options shared by chat, run and serve -------------------------------------------------------------------


_SETTINGS_OPTIONS = [
    click.option("-p", "--preset", metavar="NAME", cls=_ResolvedOption, config_key="preset",
                 help=f"A named ensemble from the catalog (`edge-ensemble presets`) [default: {_DEFAULT}]."),
    click.option("-m", "--model", "members", multiple=True, metavar="MODEL",
                 help="A member: a .gguf path, a catalog name or hf:org/repo/file. Repeat it; the first one "
                      "drafts. Replaces --preset."),
    click.option("-s", "--system", metavar="TEXT", help="System prompt."),
    _flag(dataclasses.replace(POLICY, help=f"The decoding policy ({policy_help()})."), resolved=True),
    *(_policy_flag(o) for o in registry.policy_options().values()),
    *(_flag(o, resolved=True) for o in GENERATION_OPTIONS),
    *(_flag(o, resolved=True) for o in LOAD_OPTIONS if o.cli),
    _flag(LOG, resolved=True),
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


# -- options shared by eval and calibrate --------------------------------------------------------------------


# Evaluations keep the context their recorded runs used; their token budget is each task's own.
_EVAL_DEFAULTS = {"n_ctx": EVAL_N_CTX}
# The branching configurations' entropy threshold depends on the model (benchmarks/entropy_probe.py).
_EVAL_OPTIONS = (GENERATION["max_tokens"], registry.policy_options()["threshold"], *(o for o in LOAD_OPTIONS if o.cli))


_eval_options = _declared_flags(_EVAL_OPTIONS, "options", defaults=False, shown={
    "max_tokens": "per task", **{k: str(v) for k, v in _EVAL_DEFAULTS.items()}})
