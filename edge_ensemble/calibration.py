"""The calibration tables: ``[calibrated.presets.<name>]`` / ``[calibrated.members."<member set>"]`` in the user
config file and ``[presets.<name>.calibrated]`` in models/presets.toml, written by ``edge-ensemble calibrate``
(:mod:`edge_ensemble.eval.calibrate`) and read by :mod:`edge_ensemble.config` and
:meth:`edge_ensemble.api.Ensemble.from_preset`: where an ensemble's table is kept (:func:`calibration_key`), how
one is parsed and checked (:func:`parse_calibration`), and the option keys a table (like the config file) may set
(:data:`OPTIONS`).

This module imports neither :mod:`edge_ensemble.api` nor :mod:`edge_ensemble.config`, so both can import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from .errors import UsageError
from .options import GENERATION_OPTIONS, LiveOptions, Option
from .ensemble_config import ENSEMBLE_OPTIONS
from .sources import ModelSpec


# The options a user sets by a config key (``threads`` -> n_threads): the ensemble's options (its policy, every
# registered policy's options, the load options) and the generation options, each with a flag.
OPTIONS: Mapping[str, Option] = LiveOptions(
    lambda: {o.key: o for o in (*ENSEMBLE_OPTIONS.values(), *GENERATION_OPTIONS) if o.cli})


@dataclass(frozen=True)
class Calibration:
    """The settings a calibration chose for one ensemble, where they are written and what they rest on."""

    source: str  # the file and table, e.g. "~/.config/edge-ensemble/config.toml [calibrated.presets.tiny]"
    values: Mapping[str, Any]  # config key -> checked value (policy, weights, gate, ...)
    date: str = ""
    dev_set: str = ""
    items: int = 0
    applied: tuple[str, ...] = ()  # the keys a run took from it (a flag overrides the others)

    def describe(self) -> dict[str, Any]:
        """What ``run --json`` shows under ``config.calibrated``."""
        return {"source": self.source, "date": self.date, "dev_set": self.dev_set, "items": self.items,
                "settings": {k: self.values[k] for k in self.applied},
                "overridden": [k for k in self.values if k not in self.applied]}


# The keys of a calibration table that are evidence, not settings: written by calibrate, shown by run --json.
_EVIDENCE: Mapping[str, Callable[[Any], bool]] = MappingProxyType({
    "date": lambda v: isinstance(v, str), "dev_set": lambda v: isinstance(v, str),
    "items": lambda v: isinstance(v, int) and not isinstance(v, bool), "records": lambda v: isinstance(v, str),
    "rule": lambda v: isinstance(v, str), "evidence": lambda v: isinstance(v, list)})


def calibration_key(preset: str | None, members: Sequence[ModelSpec]) -> tuple[str, str]:
    """Where the calibration of an ensemble is kept: ``("presets", name)`` for a preset, else ``("members",
    "<m1> + <m2> ...")`` with each member as a catalog key, an absolute path or its hf: spec."""
    if preset is not None:
        return "presets", preset.lower()
    return "members", " + ".join(_member_id(m) for m in members)


def _member_id(spec: ModelSpec) -> str:
    if spec.kind == "catalog" and spec.entry is not None:
        return spec.entry.key
    if spec.kind == "path" and spec.path is not None:
        return str(spec.path.expanduser().resolve())
    return spec.text


def parse_calibrations(data: Any, where: str) -> dict[tuple[str, str], Calibration]:
    """The ``[calibrated]`` table of a config file by :func:`calibration_key`; a UsageError naming the table
    and key otherwise. ``where`` names the file."""
    if not isinstance(data, dict) or set(data) - {"presets", "members"}:
        raise UsageError(f"{where}: calibrated must hold only the tables presets and members")
    out: dict[tuple[str, str], Calibration] = {}
    for kind, tables in data.items():
        if not isinstance(tables, dict):
            raise UsageError(f"{where}: calibrated.{kind} must be a table of tables")
        for name, table in tables.items():
            key = (kind, name.lower() if kind == "presets" else name)
            out[key] = parse_calibration(table, f"{where} [calibrated.{kind}.{toml_key(name)}]")
    return out


def parse_calibration(table: Any, source: str) -> Calibration:
    """One calibration table, every setting checked by its declaration; ``source`` names the table."""
    if not isinstance(table, dict):
        raise UsageError(f"{source} must be a table")
    values = {}
    for key, value in table.items():
        if key in OPTIONS:
            values[key] = OPTIONS[key].from_config(value, f"{source}: {key}")
        elif key in _EVIDENCE:
            if not _EVIDENCE[key](value):
                raise UsageError(f"{source}: {key} has the wrong type; got {value!r}")
        else:
            raise UsageError(f"{source}: unknown key {key!r}; a calibration holds options "
                             f"(e.g. policy, weights, gate) and {', '.join(_EVIDENCE)}")
    return Calibration(source, MappingProxyType(values), table.get("date", ""), table.get("dev_set", ""),
                       table.get("items", 0))


def toml_key(name: str) -> str:
    """``name`` as a TOML key: bare when it can be, else quoted."""
    return name if name and all(c.isalnum() or c in "-_" for c in name) and name.isascii() else json.dumps(name)


__all__ = ["OPTIONS", "Calibration", "calibration_key", "parse_calibration", "parse_calibrations", "toml_key"]
