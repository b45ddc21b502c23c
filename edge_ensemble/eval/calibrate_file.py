"""Write a calibration's table into a TOML config file (:func:`write_calibration`), replacing an earlier table of
the same ensemble and keeping everything else of the file as it is."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Protocol, Sequence

from edge_ensemble import paths
from edge_ensemble.calibration import parse_calibrations, toml_key
from edge_ensemble.errors import EdgeEnsembleError, UsageError


class CalibrationTable(Protocol):
    """What a calibration writes (SAFE's :class:`~edge_ensemble.eval.calibrate_results.CalibrationResult`, the
    vote's :class:`~edge_ensemble.eval.calibrate_vote.VoteCalibration`): where, and the table."""

    key: tuple[str, str]

    def table(self) -> dict[str, Any]: ...

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


def plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists, dates strings): for comparisons."""
    return json.loads(json.dumps(value, default=str))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _table_text(header: str, table: dict[str, Any]) -> str:
    lines = [f"# {_MARK} {table.get('date', '')}: {table.get('dev_set', '')}", f"[{header}]"]
    for key, value in table.items():
        if key == "evidence":
            lines.append("evidence = [")
            lines += [f"  {_toml_value(row)}," for row in value]
            lines.append("]")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


_MARK = "written by edge-ensemble calibrate"


def _header_path(line: str) -> tuple[str, ...] | None:
    """The key path of a table header line (``[a.b."c d"]`` -> ("a", "b", "c d")), None for any other line."""
    stripped = line.strip()
    if not stripped.startswith("["):
        return None
    try:
        data = tomllib.loads(stripped)
    except tomllib.TOMLDecodeError:
        return None
    keys: list[str] = []
    while isinstance(data, dict) and len(data) == 1:
        key, data = next(iter(data.items()))
        keys.append(key)
        if isinstance(data, list):
            data = data[-1] if data else {}
    return tuple(keys)


def _without_table(text: str, path: tuple[str, ...]) -> str:
    """``text`` without the table at ``path`` (and its sub-tables, and the comment calibrate wrote above it)."""
    lines = text.splitlines()
    keep: list[str] = []
    dropped: list[str] = []
    dropping = False
    for line in lines:
        header = _header_path(line)
        if header is not None:
            now = header[:len(path)] == path
            if dropping and not now:  # comments (and blank lines) right above the next header are that table's
                tail = len(dropped)
                while tail and (not dropped[tail - 1].strip() or dropped[tail - 1].lstrip().startswith("#")):
                    tail -= 1
                keep += dropped[tail:]
            if now and not dropping and keep and keep[-1].startswith(f"# {_MARK}"):
                keep.pop()
            dropping, dropped = now, []
        (dropped if dropping else keep).append(line)
    while keep and not keep[-1].strip():
        keep.pop()
    return "\n".join(keep) + ("\n" if keep else "")


def write_calibration(result: CalibrationTable, path: str | os.PathLike[str] | None = None, *,
                      table: Sequence[str] | None = None) -> Path:
    """Write ``result``'s table into the user config file (default :func:`paths.config_path`), replacing an
    earlier calibration of the same ensemble and keeping everything else; atomic, and checked by reading it
    back before it replaces the file. ``table``: another key path (``("presets", "tiny", "calibrated")`` in
    models/presets.toml). Returns the path."""
    path = Path(path) if path is not None else paths.config_path()
    try:
        old = path.read_text("utf-8") if path.exists() else ""
        before = tomllib.loads(old)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML ({e}); fix it, then rerun calibrate") from None
    table_path = tuple(table) if table is not None else ("calibrated", *result.key)
    kept = _without_table(old, table_path)
    new = (kept + "\n" if kept else "") + _table_text(".".join(map(toml_key, table_path)), result.table())
    expected = plain(before)
    node = expected
    for key in table_path[:-1]:
        node = node.setdefault(key, {})
    node[table_path[-1]] = plain(result.table())
    try:
        after = tomllib.loads(new)
    except tomllib.TOMLDecodeError:
        after = None
    if after is None or plain(after) != expected:
        raise EdgeEnsembleError(f"cannot update {path} safely (its [{'.'.join(table_path[:-1])}] tables are written "
                                "in a way calibrate does not rewrite); remove them by hand and rerun calibrate")
    if table is None:
        parse_calibrations(after["calibrated"], f"config file {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        paths.write_text_atomic(path, new)
    except OSError as e:
        raise EdgeEnsembleError(f"cannot write config file {path}: {e.strerror or e}") from None
    return path


__all__ = ["CalibrationTable", "plain", "write_calibration"]
