"""User settings: the config file, and how flags, file and built-in defaults merge into one :class:`Settings`.

The config file is TOML at :func:`edge_ensemble.paths.config_path` — ``$EDGE_ENSEMBLE_CONFIG`` if set, else
``$XDG_CONFIG_HOME/edge-ensemble/config.toml`` (``~/.config/edge-ensemble/config.toml``). Its keys are the
long command-line options with underscores (``--draft-len`` -> ``draft_len``), see :data:`KEYS`::

    preset = "tiny"            # or: members = ["qwen2.5-coder-0.5b-instruct", "~/models/other.gguf"]
    policy = "safe"
    gate = 0.6                 # or "off": faithful SAFE, every chunk verified
    threads = 4
    max_tokens = 400
    log = false                # keep no conversation log (edge_ensemble.logs)

A ``[calibrated.presets.<name>]`` or ``[calibrated.members."<member set>"]`` table holds the settings
``edge-ensemble calibrate`` measured for that one ensemble (:func:`calibration_key` names a member set), with
the evidence (see :mod:`edge_ensemble.eval.calibrate`)::

    [calibrated.presets.tiny]
    policy = "safe"
    weights = [2.0, 1.0]
    gate = 0.4
    date = "2026-05-30T12:00:00+00:00"
    dev_set = "gsm8k items 0-199"
    items = 200
    evidence = [{setting = "single:...", correct = 44, n = 200, ...}, ...]

Precedence: a command-line flag > the user's calibration of the ensemble being run > the config file's other
keys > the calibration a preset ships with (``[presets.<name>.calibrated]`` in models/presets.toml) > the
built-in default. A flag that names the ensemble
(``--preset`` or ``--model``) replaces both ``preset`` and ``members`` of the file. In ``members``, ``~``
is expanded; other relative paths are relative to the working directory. Apart from ``preset``,
``members`` and ``system`` every key is a declared option (:mod:`edge_ensemble.options`, :data:`OPTIONS`, and
the commands' own, :data:`COMMAND_OPTIONS`: ``log``),
checked by its declaration as the file is read and as a flag is merged; an error names the option (the
flag, or the key and the file), the allowed values and the value given.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from . import paths
from .api import ENSEMBLE_OPTIONS, EnsembleConfig
from .calibration import (OPTIONS, Calibration, calibration_key, parse_calibration,  # (re-exported)
                          parse_calibrations, toml_key)
from .errors import EdgeEnsembleError, UsageError
from .logs import LOG
from .sources import Catalog, ModelSpec, parse_spec
from .options import GENERATION, OFF, Option, option
from .policies import POLICY, registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

# -- value parsers of the keys that are not options; ValueError says what was expected -------------------------


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("a string")
    return value


def _names(value: Any) -> tuple[str, ...]:
    if not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
        raise ValueError("a non-empty list of model names or paths")
    return tuple(value)


# Keys that choose the models and the system prompt: settings of the CLI, not options of the API.
_SELECTION: Mapping[str, Callable[[Any], Any]] = MappingProxyType({"preset": _str, "members": _names, "system": _str})
# Options of the commands (run, chat, serve), not of the API: a flag and a config key each.
COMMAND_OPTIONS: Mapping[str, Option] = MappingProxyType({LOG.key: LOG})
KEYS: tuple[str, ...] = (*_SELECTION, *OPTIONS, *COMMAND_OPTIONS)


def declared(key: str) -> Option:
    """The declaration of the config key ``key`` (an API option or a command's)."""
    return COMMAND_OPTIONS[key] if key in COMMAND_OPTIONS else OPTIONS[key]


@dataclass(frozen=True)
class Generation:
    """Per-answer settings (passed to :meth:`Ensemble.stream`; fields: the generation options)."""

    max_tokens: int = option(GENERATION["max_tokens"])
    stop: tuple[str, ...] = option(GENERATION["stop"])
    temperature: float = option(GENERATION["temperature"])
    top_p: float = option(GENERATION["top_p"])
    top_k: int = option(GENERATION["top_k"])
    seed: int | None = option(GENERATION["seed"])


@dataclass(frozen=True)
class Settings:
    """Everything ``chat`` and ``run`` need: which models, how they combine, how each answer is made."""

    members: tuple[ModelSpec, ...]  # first = drafter
    preset: str | None  # the preset the members came from, if any
    system: str | None
    ensemble: EnsembleConfig
    generation: Generation
    calibration: Calibration | None = None  # the calibration this ensemble's settings partly came from
    log: bool = LOG.default  # keep each exchange in the conversation log


@dataclass(frozen=True)
class UserConfig:
    """The config file's settings (only the keys it sets, type-checked) and where it is; ``calibrations`` by
    :func:`calibration_key`."""

    path: Path
    values: Mapping[str, Any] = field(default_factory=dict)
    calibrations: Mapping[tuple[str, str], Calibration] = field(default_factory=dict)


def load_config(path: Path | None = None, *, missing_ok: bool = False) -> UserConfig:
    """Read and type-check the user config file; a missing file is an empty config, except one the user named
    with ``$EDGE_ENSEMBLE_CONFIG`` (unless ``missing_ok``: a command that is about to write it). Raises
    UsageError naming the file and the offending key (unknown key, wrong type, invalid TOML)."""
    named = path is None and bool(os.environ.get(paths.CONFIG_ENV))
    path = path or paths.config_path()
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        if named and not missing_ok:
            raise UsageError(f"config file {path} (named by ${paths.CONFIG_ENV}) does not exist; create it, or unset "
                             f"{paths.CONFIG_ENV} to read the default one") from None
        return UserConfig(path)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    values: dict[str, Any] = {}
    calibrations = parse_calibrations(data.pop("calibrated"), f"config file {path}") if "calibrated" in data else {}
    for key, value in data.items():
        if key in OPTIONS or key in COMMAND_OPTIONS:
            values[key] = declared(key).from_config(value, f"config file {path}: {key}")
            continue
        if key not in _SELECTION:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"config file {path}: unknown key {key!r}{hint}; known keys: {', '.join(KEYS)}, "
                             "and the [calibrated] tables")
        try:
            values[key] = _SELECTION[key](value)
        except ValueError as e:
            raise UsageError(f"config file {path}: {key} must be {e}; got {value!r}") from None
    if "preset" in values and "members" in values:
        raise UsageError(f"config file {path}: set either preset or members, not both")
    return UserConfig(path, MappingProxyType(values), MappingProxyType(calibrations))


@dataclass(frozen=True)
class Resolved:
    """The settings of a command line merged over the config file and the calibrations, before they are checked
    together: what :func:`resolve_settings` makes a :class:`Settings` of, and what help texts and ``presets`` read
    the resolved defaults from (:func:`default_text`, :func:`describe_policy`), so the two cannot disagree."""

    members: tuple[ModelSpec, ...]
    preset: str | None
    values: Mapping[str, Any]  # config key -> value, for every key set anywhere but the built-in defaults
    origins: Mapping[str, str]  # config key -> "flag", "calibration" or "config" (where its value came from)
    calibration: Calibration | None
    config: UserConfig


def resolve_values(flags: Mapping[str, Any], config: UserConfig, catalog: Any = None) -> Resolved:
    """Merge command-line ``flags`` (by config key, as click gives them: text, a bool for an on/off flag, a
    tuple for a repeated one; None or () = not given) over ``config`` over the calibrations, each value checked by
    its declaration but not yet against the others (:func:`resolve_settings` does that)."""
    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    unknown = set(given) - set(KEYS)
    if unknown:  # a programming error in the CLI, not a user error
        raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    given = {k: declared(k).from_text(v) if k not in _SELECTION else v for k, v in given.items()}
    if "preset" in given and "members" in given:
        raise UsageError("give either --preset or --model, not both")
    file_values = dict(config.values)
    if "preset" in given or "members" in given:  # the command line names the ensemble: the file's choice goes
        file_values.pop("preset", None)
        file_values.pop("members", None)
    catalog = catalog or Catalog.load()
    try:
        members, preset = _members({**file_values, **given}, catalog)
    except EdgeEnsembleError as e:  # the ensemble came from the file: say so, the user never typed it
        if "preset" in given or "members" in given or not ({"preset", "members"} & set(file_values)):
            raise
        key = "members" if "members" in file_values else "preset"
        raise type(e)(f"config file {config.path}: {key}: {e}") from None
    # The user's own calibration of this ensemble, else the one the preset ships with (below the file's keys).
    calibration = config.calibrations.get(calibration_key(preset, members))
    shipped: dict[str, Any] = {}
    if calibration is None and preset is not None and catalog.preset(preset).calibrated:
        calibration = parse_calibration(dict(catalog.preset(preset).calibrated),
                                        f"catalog presets.toml [presets.{toml_key(preset)}.calibrated]")
        shipped = dict(calibration.values)
    calibrated = {} if shipped else dict(calibration.values) if calibration else {}
    layers = (("calibration", shipped), ("config", file_values), ("calibration", calibrated), ("flag", given))
    values = {k: v for _, layer in layers for k, v in layer.items()}
    origins = {k: origin for origin, layer in layers for k in layer}
    if calibration is not None:
        calibration = replace(calibration, applied=tuple(
            k for k in calibration.values if k not in given and (not shipped or k not in file_values)))
    return Resolved(members, preset, MappingProxyType(values), MappingProxyType(origins), calibration, config)


def resolve_settings(flags: Mapping[str, Any], config: UserConfig, catalog: Any = None) -> Settings:
    """Merge command-line ``flags`` (see :func:`resolve_values`) over ``config`` over the defaults, and check each
    value once. ``catalog`` (a :class:`~edge_ensemble.sources.Catalog`) resolves presets."""
    r = resolve_values(flags, config, catalog)
    values, calibration = r.values, r.calibration

    def origin(name: str) -> str:
        """How the user wrote the option called ``name``: its flag, its calibration or its config key."""
        o = ENSEMBLE_OPTIONS[name]
        if r.origins.get(o.key) == "flag":
            return o.flag
        if calibration is not None and o.key in calibration.applied:
            return f"{calibration.source}: {o.key}"
        return f"config file {config.path}: {o.key}"
    chosen = {o.name: values[key] for key, o in OPTIONS.items() if key in values}
    ensemble = EnsembleConfig(**{n: v for n, v in chosen.items() if n in ENSEMBLE_OPTIONS})
    generation = Generation(**{n: v for n, v in chosen.items() if n in GENERATION})
    return Settings(r.members, r.preset, values.get("system"), ensemble.validate(len(r.members), origin), generation,
                    calibration, values.get(LOG.key, LOG.default))


# -- the resolved defaults, as help texts and startup lines state them -----------------------------------------


def value_text(option: Option, value: Any) -> str:
    """A value of ``option`` as the command line spells it (on/off, off for None, 2,1 for a list)."""
    if value == option.default:
        return option.default_text
    if option.type is bool:
        return "on" if value else "off"
    if value is None:
        return OFF
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def _calibration_label(r: Resolved | Settings) -> str:
    c = r.calibration
    assert c is not None
    return f"calibrated {c.date[:10]}" if c.date else "calibrated"


def default_text(key: str, r: Resolved) -> str:
    """What option ``key`` is when its flag is not given, as ``--help`` states it: the value and, unless it is the
    built-in default, where it comes from (``single, calibrated 2026-12-02 for preset tiny (else safe)``)."""
    option = declared(key)
    origin = r.origins.get(key)
    if origin is None:
        return option.default_text
    text = value_text(option, r.values[key])
    if origin == "calibration":
        whose = f"preset {r.preset}" if r.preset else "these members"
        return f"{text}, {_calibration_label(r)} for {whose} (else {option.default_text})"
    return f"{text}, from {r.config.path} (else {option.default_text})"


def describe_policy(settings: Settings | Resolved) -> str:
    """The policy an ensemble answers with, named as calibrated when a calibration chose it, and what it does:
    ``single, calibrated 2026-12-02 (the first member alone)`` (startup lines, ``presets``, ``--help``)."""
    if isinstance(settings, Resolved):
        policy = settings.values.get("policy", POLICY.default)
        calibrated = settings.origins.get("policy") == "calibration"
    else:
        policy = settings.ensemble.policy
        calibrated = settings.calibration is not None and "policy" in settings.calibration.applied
    return f"{policy}{', ' + _calibration_label(settings) if calibrated else ''} ({registry.get(policy).summary})"


def find_preset(catalog: Any, name: str) -> Any:
    """The catalog's preset called ``name`` (any case); an unknown name is bad usage (exit 2): one line with the
    closest name and where the presets are listed."""
    known = list(catalog.presets)
    if name.strip().lower() not in {p.lower() for p in known}:
        close = difflib.get_close_matches(name.strip().lower(), [p.lower() for p in known], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"unknown preset '{name}'{hint}; known: {', '.join(known) or 'none'}; "
                         "see `edge-ensemble presets`")
    return catalog.preset(name)


def _members(values: Mapping[str, Any], catalog: Any) -> tuple[tuple[ModelSpec, ...], str | None]:
    """The members parsed once (the API takes them as they are) and the preset they came from, if any."""
    catalog = catalog or Catalog.load()
    if "members" in values:
        return tuple(parse_spec(m, catalog) for m in values["members"]), None
    preset = find_preset(catalog, values["preset"]) if "preset" in values else catalog.default_preset
    return tuple(parse_spec(m, catalog) for m in preset.members), preset.name
