"""What a model spec names, parsed once (:func:`parse_spec`), and the file it resolves to (:func:`resolve`).

A spec is what the user typed after ``-m``, in ``members = [...]`` or in ``Ensemble([...])``:

- ``hf:<org>/<repo>/<path-in-repo>[@<revision>]``: a hub file;
- ``hf:<org>/<repo>[:<quant>][@<revision>]`` (or ollama's ``hf.co/<org>/<repo>[:<quant>]``): the repository's
  GGUF model with that quantization tag (:mod:`.hub_repo`);
- a catalog name (key or display name, any case): a catalog model; a name wins over a same-named file in the
  working directory unless it looks like a path;
- anything else: a path to a .gguf file.

Parsing needs no network and reads no model file; resolving may download, assemble and verify.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union

from .. import paths
from ..errors import ModelSourceError
from ..gguf import check_local_file
from ._common import marker_ok
from .bundles import assemble_bundle, assembled_marker, assembled_ok
from .catalog import Catalog, ModelEntry
from .hub import HUB_PREFIX, HubRef, cached_hub_path, fetch_hub, hub_marker, parse_hub_spec
from .hub_repo import HubRepoRef, fetch_hub_repo, is_hub_spec, parse_hub_ref
from .server import SERVER_PREFIX

# "server": a member behind a llama-server URL (server:URL[=MODEL]); edge_ensemble.remote parses the rest.
SpecKind = Literal["path", "catalog", "hub", "server"]


@dataclass(frozen=True)
class ModelSpec:
    """A model spec parsed once: which kind of source it names and what is known before anything is fetched.

    ``path`` is set for kind "path", ``ref`` for kind "hub" (a file, or a repository's model by tag), ``entry`` for kind "catalog". ``display_name``
    is the member's name in stats and output: the catalog's name, else the file's stem.
    """

    text: str  # the spec as given
    kind: SpecKind
    display_name: str
    path: Path | None = None
    ref: HubRef | HubRepoRef | None = None
    entry: ModelEntry | None = None

    def __str__(self) -> str:
        return self.text


SpecLike = Union[str, "os.PathLike[str]", ModelSpec]


def _looks_like_path(spec: str) -> bool:
    return (
        "/" in spec or os.sep in spec or spec.startswith(("~", "."))
        or spec.lower().endswith(".gguf")
    )


def parse_spec(spec: SpecLike, catalog: Catalog | None = None) -> ModelSpec:
    """Parse a model spec (see the module docstring) into a :class:`ModelSpec`; a ModelSpec is returned as it is.

    ``catalog`` is loaded when needed and not given. Raises ModelSourceError with one line for a malformed hub
    reference or a name that is neither a file nor in the catalog; whether a path holds a GGUF file is
    checked by :func:`resolve`.
    """
    if isinstance(spec, ModelSpec):
        return spec
    text = os.fspath(spec)
    if not text.strip():
        raise ModelSourceError("an empty model name; give a GGUF path, hf:org/repo[:QUANT], hf:org/repo/file.gguf"
                               " or a catalog name "
                               "(see `edge-ensemble models list`)")
    if text.startswith(SERVER_PREFIX):  # a member served by llama-server: edge_ensemble.remote reads the rest
        return ModelSpec(text, "server", text[len(SERVER_PREFIX):])
    # hf.co/... is ollama's spelling; a local file of that name stays a file
    if is_hub_spec(text) and (text.startswith(HUB_PREFIX) or not Path(text).exists()):
        ref = parse_hub_ref(text)
        name = Path(ref.filename).stem if isinstance(ref, HubRef) else ref.display_name
        return ModelSpec(text, "hub", name, ref=ref)
    if not _looks_like_path(text):
        catalog = catalog or Catalog.load()
        entry = catalog.find(text)
        if entry is not None:
            return ModelSpec(text, "catalog", entry.name, entry=entry)
        if not Path(text).exists():
            catalog.model(text)  # raises the "unknown model ... (known: ...)" error
    path = Path(text).expanduser()
    return ModelSpec(text, "path", path.stem, path=path)


def resolve(spec: ModelSpec, *, download: bool = True, progress: bool = True) -> Path:
    """The GGUF file on disk that ``spec`` names: a checked local path, a hub file (fetched into
    huggingface-hub's cache) or a catalog model (assembled from its bundle, or from the hub, and verified).

    ``download=False`` only uses what is already on disk; ``progress`` shows progress on stderr. Raises
    ModelSourceError / ModelLoadError with a one-line message.
    """
    if spec.kind == "server":
        raise ModelSourceError(f"{spec.text} is a server member: its local vocabulary file is resolved from the model "
                               "it declares (server:URL=MODEL)")
    if spec.kind == "hub":
        assert spec.ref is not None
        if isinstance(spec.ref, HubRepoRef):
            return fetch_hub_repo(spec.ref, download=download, progress=progress)
        return fetch_hub(spec.ref, download=download, progress=progress)
    if spec.kind == "catalog":
        assert spec.entry is not None
        return _resolve_entry(spec.entry, download=download, progress=progress)
    assert spec.path is not None
    return check_local_file(spec.path)


def resolve_model(
    spec: SpecLike, *, catalog: Catalog | None = None, download: bool = True, progress: bool = True
) -> Path:
    """``resolve(parse_spec(spec, catalog), ...)``: a model spec straight to the path of its GGUF file."""
    return resolve(parse_spec(spec, catalog), download=download, progress=progress)


def _resolve_entry(entry: ModelEntry, *, download: bool, progress: bool) -> Path:
    dest = paths.models_dir() / entry.file
    if assembled_ok(entry, dest, progress):
        return dest
    hub = parse_hub_spec(entry.hub) if entry.hub else None
    if entry.has_bundle and download:
        return assemble_bundle(entry, progress=progress)
    if hub is not None and (download or cached_hub_path(hub) is not None):
        # Catalog content is pinned by the catalog, so a cached copy is used without asking the hub.
        return fetch_hub(hub, sha256=entry.hub_sha256 or None, download=download, progress=progress,
                         prefer_cache=True)
    if not download:
        raise ModelSourceError(
            f"model '{entry.key}' is not in the cache ({dest}) and downloads are disabled;"
            " run once with downloads enabled to fetch it"
        )
    raise ModelSourceError(f"model '{entry.key}' has no source in the catalog (neither a bundle nor a hub file)")


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
            verified = bool(entry.sha256) and marker_ok(assembled_marker(dest), dest, entry.sha256)
            return ModelStatus(entry.key, True, dest, size, "bundle", verified, available)
    if entry.hub:
        cached = cached_hub_path(parse_hub_spec(entry.hub))
        if cached is not None:
            verified = bool(entry.hub_sha256) and marker_ok(hub_marker(entry.hub_sha256), cached, entry.hub_sha256)
            return ModelStatus(entry.key, True, cached, cached.stat().st_size, "hub", verified, available)
    return ModelStatus(entry.key, False, dest, None, None, False, available)
