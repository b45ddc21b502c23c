"""User settings: the config file, and how flags, file and built-in defaults merge into one :class:`Settings`.

The config file is TOML at :func:`edge_ensemble.paths.config_path` — ``$EDGE_ENSEMBLE_CONFIG`` if set, else
``$XDG_CONFIG_HOME/edge-ensemble/config.toml`` (``~/.config/edge-ensemble/config.toml``). Its keys are the
long command-line options with underscores (``--draft-len`` -> ``draft_len``), see :data:`KEYS`::

    preset = "tiny"            # or: members = ["qwen2.5-coder-0.5b-instruct", "~/models/other.gguf"]
    policy = "safe"
    gate = 0.6                 # or "off": faithful SAFE, every chunk verified
    threads = 4
    max_tokens = 400

Precedence: a command-line flag > the config file > the built-in default. A flag that names the ensemble
(``--preset`` or ``--model``) replaces both ``preset`` and ``members`` of the file. In ``members``, ``~``
is expanded; other relative paths are relative to the working directory. Everything is validated
once, by :func:`resolve_settings`, with the API's own range checks; an error names the option (the flag, or
the key and the file), the allowed values and the value given.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

from . import paths
from .api import SHARPEN_CHOICES, EnsembleConfig, validate_int, validate_sampling
from .errors import UsageError
from .policies import POLICIES
from .sources import Catalog, ModelSpec, parse_spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

OFF = "off"  # the value of --gate / --gate-entropy that turns that gate off


# -- value parsers: config (TOML) values -> Python values; ValueError says what was expected ----------------


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("an integer")
    return value


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("a number")
    return float(value)


def _float_or_off(value: Any) -> float | str:
    if isinstance(value, str) and value.strip().lower() == OFF:
        return OFF
    try:
        return _float(value)
    except ValueError:
        raise ValueError(f'a number or "{OFF}"') from None


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("a string")
    return value


def _names(value: Any) -> tuple[str, ...]:
    if not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
        raise ValueError("a non-empty list of model names or paths")
    return tuple(value)


def parse_weights(value: Any) -> tuple[float, ...]:
    """``"2,1"`` (the command line) or ``[2, 1]`` (TOML) -> ``(2.0, 1.0)``."""
    try:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not items:
            raise ValueError
        weights = tuple(float(v) if isinstance(v, str) else _float(v) for v in items)
        if not all(math.isfinite(w) for w in weights):
            raise ValueError
        return weights
    except ValueError:
        raise ValueError('one number per member, e.g. "2,1" or [2, 1]') from None


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return value

    return parse


@dataclass(frozen=True)
class Key:
    """One setting: its config key (the CLI flag is ``--`` + the key with dashes), how a config value is
    parsed, and the :class:`~edge_ensemble.api.EnsembleConfig` field it sets (None: not an ensemble field)."""

    name: str
    parse: Callable[[Any], Any]
    ensemble_field: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


KEYS: Mapping[str, Key] = MappingProxyType({k.name: k for k in (
    Key("preset", _str),
    Key("members", _names),
    Key("system", _str),
    Key("policy", _choice(tuple(POLICIES)), "policy"),
    Key("draft_len", _int, "draft_len"),
    Key("gate", _float_or_off, "gate"),
    Key("gate_entropy", _float_or_off, "gate_entropy"),
    Key("top_k_union", _int, "top_k"),
    Key("sharpen", _choice(SHARPEN_CHOICES), "sharpen"),
    Key("weights", parse_weights, "weights"),
    Key("n_ctx", _int, "n_ctx"),
    Key("threads", _int, "n_threads"),
    Key("gpu_layers", _int, "n_gpu_layers"),
    Key("flash_attn", _bool, "flash_attn"),
    Key("control_tokens_in_messages", _bool, "control_tokens_in_messages"),
    Key("max_tokens", _int),
    Key("temperature", _float),
    Key("top_p", _float),
    Key("top_k", _int),
    Key("seed", _int),
)})
_ENSEMBLE_KEY_OF_FIELD = {k.ensemble_field: k.name for k in KEYS.values() if k.ensemble_field}


# -- the result ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """Per-answer settings (passed to :meth:`Ensemble.stream`)."""

    max_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None

    def validate(self) -> "Generation":
        """The API's own checks, run before any model is loaded."""
        validate_int("max_tokens", self.max_tokens, 1, 1 << 20)
        validate_sampling(self.temperature, self.top_p, self.top_k, self.seed)
        return self


_GENERATION_KEYS = tuple(f.name for f in fields(Generation))


@dataclass(frozen=True)
class Settings:
    """Everything ``chat`` and ``run`` need: which models, how they combine, how each answer is made."""

    members: tuple[ModelSpec, ...]  # first = drafter
    preset: str | None  # the preset the members came from, if any
    system: str | None
    ensemble: EnsembleConfig
    generation: Generation


@dataclass(frozen=True)
class UserConfig:
    """The config file's settings (only the keys it sets, type-checked) and where it is."""

    path: Path
    values: Mapping[str, Any] = field(default_factory=dict)


def load_config(path: Path | None = None) -> UserConfig:
    """Read and type-check the user config file; a missing file is an empty config. Raises UsageError
    naming the file and the offending key (unknown key, wrong type, invalid TOML)."""
    path = path or paths.config_path()
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return UserConfig(path)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(f"config file {path}: unknown key {key!r}{hint}; known keys: {', '.join(KEYS)}")
        try:
            values[key] = KEYS[key].parse(value)
        except ValueError as e:
            raise UsageError(f"config file {path}: {key} must be {e}; got {value!r}") from None
    if "preset" in values and "members" in values:
        raise UsageError(f"config file {path}: set either preset or members, not both")
    return UserConfig(path, MappingProxyType(values))


def resolve_settings(flags: Mapping[str, Any], config: UserConfig, catalog: Any = None) -> Settings:
    """Merge command-line ``flags`` (None or () = not given) over ``config`` over the defaults, and
    validate the result once. ``catalog`` (a :class:`~edge_ensemble.sources.Catalog`) resolves presets."""
    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    unknown = set(given) - set(KEYS)
    if unknown:  # a programming error in the CLI, not a user error
        raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    if "preset" in given and "members" in given:
        raise UsageError("give either --preset or --model, not both")
    file_values = dict(config.values)
    if "preset" in given or "members" in given:  # the command line names the ensemble: the file's choice goes
        file_values.pop("preset", None)
        file_values.pop("members", None)
    values = {**file_values, **given}

    def origin(key: str) -> str:
        return KEYS[key].flag if key in given else f"config file {config.path}: {key}"

    members, preset = _members(values, catalog)
    ensemble = EnsembleConfig(**{
        k.ensemble_field: (None if values[k.name] == OFF else values[k.name])
        for k in KEYS.values() if k.ensemble_field and k.name in values
    })
    generation = Generation(**{k: values[k] for k in _GENERATION_KEYS if k in values})
    with _named(origin, _ENSEMBLE_KEY_OF_FIELD, values):
        ensemble.validate(len(members))
    with _named(origin, {k: k for k in _GENERATION_KEYS}, values):
        generation.validate()
    return Settings(members, preset, values.get("system"), ensemble, generation)


def _members(values: Mapping[str, Any], catalog: Any) -> tuple[tuple[ModelSpec, ...], str | None]:
    """The members parsed once (the API takes them as they are) and the preset they came from, if any."""
    catalog = catalog or Catalog.load()
    if "members" in values:
        return tuple(parse_spec(m, catalog) for m in values["members"]), None
    preset = catalog.preset(values["preset"]) if "preset" in values else catalog.default_preset
    return tuple(parse_spec(m, catalog) for m in preset.members), preset.name


@contextlib.contextmanager
def _named(origin: Callable[[str], str], key_of: Mapping[str, str], values: Mapping[str, Any]) -> Iterator[None]:
    """Re-raise the API's UsageError ("draft_len must be between 1 and 64; got 0") under the name the user
    wrote: the flag (``--draft-len``) or the config key and its file."""
    try:
        yield
    except UsageError as exc:
        message = str(exc)
        m = re.match(r"\w+", message)
        key = key_of.get(m.group(0)) if m else None
        if m is None or key is None or key not in values:
            raise
        rest = message[m.end():]
        if KEYS[key].parse is _float_or_off:
            rest = rest.replace("; got", f' or "{OFF}"; got', 1)
        raise UsageError(origin(key) + rest) from None
