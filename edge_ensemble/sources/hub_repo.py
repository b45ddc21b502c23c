"""A hub repository named by a quantization tag, as llama.cpp's ``-hf ORG/REPO:QUANT`` and ollama's
``hf.co/ORG/REPO:QUANT`` name it: ``hf:<org>/<repo>[:<quant>][@<revision>]`` (or ``hf.co/...``), resolved to
the repository's GGUF file with that tag.

The rules (:func:`choose_gguf`):

- the model files are the ``.gguf`` files of the repository, any folder, except ``mmproj`` (vision projector) and
  ``imatrix`` files; a split model ``<name>-00001-of-0000N.gguf`` … is one model of N parts, all downloaded, the
  first part's path returned (llama.cpp loads a split GGUF from its first part);
- a model's tag is what ends its name (without ``.gguf`` and the split suffix) after a ``-``, ``.`` or ``/``:
  ``*-Q4_K_M.gguf``, ``*.Q4_K_M.gguf``, ``Q4_K_M/*-Q4_K_M-00001-of-00002.gguf`` all have the tag Q4_K_M, and a tag
  may span separators (``UD-Q4_K_XL``); tags match case-insensitively. A tag that ends no name may be the start
  of the last component's quant (``:Q4`` → Q4_K_M, else the one Q4_*);
- no tag (or ollama's ``latest``): the only model, else the Q4_K_M one, else the first in name order;
- several models with the tag (e.g. two sizes in one repository) or none: a one-line error that lists them or the
  tags there are.

The repository is listed with one hub API call (``model_info``: its files and the commit); each part is fetched
with :func:`.hub.fetch_hub` at the same revision. The listing is remembered per commit (in edge-ensemble's cache,
``hub-listings/``), so that without the hub (downloads off, HF_HUB_OFFLINE, no network) the same choice is made
and then looked up in huggingface-hub's cache; a revision listed never before is chosen among its cached files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..errors import EdgeEnsembleError, ModelSourceError
from ..gguf import check_gguf
from ._common import first_line
from .hub import (
    HUB_PREFIX,
    HubRef,
    _http_error_types,
    _hub_endpoint,
    _hub_error,
    _import_hub,
    _remove_hub_file,
    cached_hub_path,
    fetch_hub,
    hub_cache_dir,
    parse_hub_spec,
)

# ollama's spelling of a hub reference (it accepts both hosts); read as hf:
HUB_HOSTS = ("hf.co/", "huggingface.co/")
DEFAULT_QUANT = "Q4_K_M"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_QUANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<idx>\d{5})-of-(?P<n>\d{5})$")
_NOT_MODELS = ("mmproj", "imatrix")
_FORMS = "hf:<org>/<repo>[:<quant>][@<revision>] or hf:<org>/<repo>/<file>.gguf[@<revision>]"


@dataclass(frozen=True)
class HubRepoRef:
    """A repository's GGUF model picked by tag: ``hf:<org>/<repo>[:<quant>][@<revision>]`` (quant None: the
    default choice)."""

    repo_id: str
    quant: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        tag = f":{self.quant}" if self.quant else ""
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HUB_PREFIX}{self.repo_id}{tag}{rev}"

    @property
    def display_name(self) -> str:
        """The member's name before anything is fetched: the repository's name without ``-GGUF``, and the tag."""
        name = re.sub(r"[-_.]gguf$", "", self.repo_id.split("/")[1], flags=re.IGNORECASE) or self.repo_id
        return f"{name}-{self.quant}" if self.quant else name


def is_hub_spec(text: str) -> bool:
    """Whether ``text`` is a hub reference (``hf:`` or ollama's ``hf.co/``, ``huggingface.co/``)."""
    return text.startswith(HUB_PREFIX) or text.lower().startswith(HUB_HOSTS)


def parse_hub_ref(spec: str) -> HubRef | HubRepoRef:
    """Parse a hub reference: ``<org>/<repo>/<path-in-repo>`` is a file (:class:`HubRef`), ``<org>/<repo>`` with
    an optional ``:<quant>`` a repository's model by tag (:class:`HubRepoRef`), after ``hf:``, ``hf.co/`` or
    ``huggingface.co/``. The revision follows the last ``@``; the tag goes before it (``:Q8_0@v1``), and since a
    git ref cannot hold ``:`` the other order (``@v1:Q8_0``) is read the same way."""
    lowered = spec.lower()
    host = next((h for h in HUB_HOSTS if lowered.startswith(h)), None)
    body = spec[len(host):] if host else spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else spec
    bad = ModelSourceError(f"bad hub reference '{spec}': expected {_FORMS}")
    revision: str | None = None
    quant: str | None = None
    if "@" in body:
        body, _, revision = body.rpartition("@")
        if ":" in revision:
            revision, _, quant = revision.partition(":")
    parts = body.split("/")
    if len(parts) >= 3 and quant is None:
        try:
            return parse_hub_spec(HUB_PREFIX + body + (f"@{revision}" if revision is not None else ""))
        except ModelSourceError:
            raise bad from None
    if len(parts) != 2:
        raise bad
    org, repo = parts
    if ":" in repo:
        if quant is not None:
            raise bad
        repo, _, quant = repo.partition(":")
        if not quant:
            raise bad
    if not (_NAME.match(org) and _NAME.match(repo)) or ".." in org + repo or revision == "":
        raise bad
    if quant is not None and not _QUANT.match(quant):
        raise bad
    if quant is not None and quant.lower() == "latest":  # ollama's name for the default tag
        quant = None
    return HubRepoRef(f"{org}/{repo}", quant, revision)


# ---- choosing the file ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFModel:
    """One model of a repository: its name (path without ``.gguf`` and split suffix) and its parts in order."""

    name: str
    parts: tuple[str, ...]
    expected_parts: int = 1

    @property
    def tag(self) -> str:
        """The tag shown in listings: the name's last ``-``/``.``/``/`` component, upper case."""
        return re.split(r"[-./]", self.name)[-1].upper()

    @property
    def complete(self) -> bool:
        return len(self.parts) == self.expected_parts


def gguf_models(files: list[str]) -> list[GGUFModel]:
    """The models among a repository's files (see the module docstring), in name order."""
    singles: list[GGUFModel] = []
    splits: dict[tuple[str, int], dict[int, str]] = {}
    for path in files:
        base = path.rsplit("/", 1)[-1].lower()
        if not base.endswith(".gguf") or any(word in base for word in _NOT_MODELS):
            continue
        name = path[: -len(".gguf")]
        m = _SPLIT.match(name)
        if m and int(m["n"]) > 1:
            splits.setdefault((m["stem"], int(m["n"])), {})[int(m["idx"])] = path
        else:
            singles.append(GGUFModel(name, (path,)))
    for (stem, n), parts in splits.items():
        ordered = tuple(parts[i] for i in sorted(parts) if 1 <= i <= n)
        singles.append(GGUFModel(stem, ordered, n))
    return sorted(singles, key=lambda g: (g.name.lower(), g.name))


def _tag_matches(name: str, tag: str) -> bool:
    name, tag = name.lower(), tag.lower()
    return name == tag or name.endswith(("-" + tag, "." + tag, "/" + tag))


def _tag_prefix_matches(name: str, tag: str) -> bool:
    return re.split(r"[-./]", name)[-1].lower().startswith(tag.lower() + "_")


def _tags(models: list[GGUFModel]) -> str:
    return ", ".join(dict.fromkeys(g.tag for g in models))


class NoSuchTag(ModelSourceError):
    """No model with the tag asked for (``tags`` lists those there are)."""

    def __init__(self, message: str, tags: str) -> None:
        super().__init__(message)
        self.tags = tags


def choose_gguf(ref: HubRepoRef, files: list[str], where: str = "") -> GGUFModel:
    """The model ``ref`` names among ``files`` (a repository's paths); raises a one-line ModelSourceError when
    there is none, the tag is absent, it matches several, or a split model lacks parts. ``where`` says where the
    files were listed (e.g. "in the hub cache"), for the messages."""
    rev = ref.revision or "main"
    at = f"{ref.repo_id} at revision {rev}{where}"
    models = gguf_models(files)
    if not models:
        others = f" ({len(files)} other files)" if files else ""
        raise NoSuchTag(f"{ref}: no GGUF model file in {at}{others}; a repository of safetensors needs converting "
                        "first, or name a file with hf:<org>/<repo>/<file>.gguf", "")
    tag = ref.quant
    if tag is None:
        chosen = ([models[0]] if len(models) == 1
                  else [g for g in models if _tag_matches(g.name, DEFAULT_QUANT)] or [models[0]])
    else:
        chosen = [g for g in models if _tag_matches(g.name, tag)]
        if not chosen:
            chosen = [g for g in models if _tag_prefix_matches(g.name, tag)]
            if len(chosen) > 1:
                chosen = [g for g in chosen if _tag_matches(g.name, DEFAULT_QUANT)] or chosen
        if not chosen:
            example = next((g.tag for g in models if g.tag == DEFAULT_QUANT), models[0].tag)
            raise NoSuchTag(f"{ref}: no GGUF file with tag {tag} in {at} (tags: {_tags(models)});"
                            f" pick one, e.g. hf:{ref.repo_id}:{example}", _tags(models))
    if len(chosen) > 1:
        names = ", ".join(g.parts[0] for g in chosen)
        raise ModelSourceError(f"{ref}: {len(chosen)} GGUF files in {at} have tag {tag or DEFAULT_QUANT} ({names});"
                               f" name one with hf:{ref.repo_id}/<file>")
    model = chosen[0]
    if not model.complete:
        raise ModelSourceError(f"{ref}: split model {model.name} has {len(model.parts)} of its {model.expected_parts}"
                               f" parts in {at}; it cannot be loaded")
    return model


# ---- fetching ------------------------------------------------------------------------------------------------


def _list_repo(ref: HubRepoRef, endpoint: str | None) -> tuple[str | None, list[str]]:
    """The commit and the file paths of ``ref``'s repository at its revision, asked of the hub."""
    hf = _import_hub()
    info = hf.HfApi(endpoint=endpoint).model_info(ref.repo_id, revision=ref.revision)
    return info.sha, [s.rfilename for s in (info.siblings or [])]


def _listing_file(repo_id: str, commit: str) -> Path:
    return paths.cache_dir() / "hub-listings" / repo_id.replace("/", "--") / f"{commit}.json"


def _remember_listing(repo_id: str, commit: str | None, files: list[str]) -> None:
    """Keep a commit's file list for offline choices; a cache that cannot be written only loses that."""
    if not commit or not re.fullmatch(r"[0-9a-f]{40}", commit):
        return
    target = _listing_file(repo_id, commit)
    with contextlib.suppress(OSError):
        if target.is_file():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        tmp.write_text(json.dumps(files))
        os.replace(tmp, target)


def _remembered_listing(repo_id: str, commit: str) -> list[str] | None:
    try:
        files = json.loads(_listing_file(repo_id, commit).read_text())
    except (OSError, ValueError):
        return None
    return files if isinstance(files, list) and all(isinstance(f, str) for f in files) else None


def _cached_files(ref: HubRepoRef) -> tuple[Path, list[str], list[str] | None] | None:
    """The snapshot folder of ``ref``'s revision in huggingface-hub's cache, the files in it and the remembered
    listing of that commit (None if never listed), or None."""
    repo_dir = hub_cache_dir() / ("models--" + ref.repo_id.replace("/", "--"))
    rev = ref.revision or "main"
    commit = rev
    with_ref = repo_dir / "refs" / rev
    if with_ref.is_file():
        commit = with_ref.read_text().strip()
    snapshot = repo_dir / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    files = [str(p.relative_to(snapshot)).replace(os.sep, "/") for p in snapshot.rglob("*") if p.is_file()]
    return snapshot, files, _remembered_listing(ref.repo_id, commit)


def _from_cache(ref: HubRepoRef, why_not_hub: str) -> Path:
    cached = _cached_files(ref)
    if cached is None:
        raise ModelSourceError(f"{ref} is not in the hub cache ({hub_cache_dir()}) and {why_not_hub}")
    snapshot, files, listing = cached
    have = _tags([g for g in gguf_models(files) if g.complete])
    missing = ModelSourceError(f"{ref} is not in the hub cache ({hub_cache_dir()}){f' (cached: {have})' if have else ''}"
                               f" and {why_not_hub}")
    if listing is not None:  # this commit was listed before: the choice made online (a tag it lacks: that error)
        model = choose_gguf(ref, listing)
    else:
        try:
            model = choose_gguf(ref, files, " in the hub cache")
        except NoSuchTag:
            raise missing from None
    if not all((snapshot / part).is_file() for part in model.parts):
        raise missing
    first = snapshot / model.parts[0]
    check_gguf(first)
    return first


def _is_unreachable(exc: BaseException) -> bool:
    """A listing that failed for want of the hub (offline mode, no connection), not an answer from it."""
    from huggingface_hub import utils as hf_utils

    if isinstance(exc, hf_utils.HfHubHTTPError):
        return False
    return isinstance(exc, (OSError, *_http_error_types()))


def fetch_hub_repo(ref: HubRepoRef, *, download: bool = True, progress: bool = True) -> Path:
    """Resolve ``ref`` to its GGUF model (see the module docstring), fetch every part into huggingface-hub's
    cache, and return the path of the (first) part. ``download=False`` chooses among cached files without the
    network; an unreachable hub falls back to the cache too. A failure removes the parts this call fetched.
    Errors -> one-line ModelSourceError."""
    if not download:
        return _from_cache(ref, "downloads are off")
    _import_hub()
    endpoint = _hub_endpoint()
    where = endpoint or "https://huggingface.co"
    try:
        commit, files = _list_repo(ref, endpoint)
    except (OSError, ValueError, KeyError, TypeError, *_http_error_types()) as e:
        if _is_unreachable(e):
            reason = f"cannot reach the hub at {where} ({first_line(e)}); check the network and HF_ENDPOINT"
            if type(e).__name__ == "OfflineModeIsEnabled":
                reason = "HF_HUB_OFFLINE is set"
            return _from_cache(ref, reason)
        if isinstance(e, (OSError, ValueError)) and type(e).__module__.startswith("huggingface_hub"):
            raise _hub_error(e, ref, download, endpoint) from None
        # a page that is not JSON, or JSON without the fields of a repository: not the hub's API
        raise ModelSourceError(f"{ref}: the hub at {where} did not answer with a repository listing"
                               f" ({type(e).__name__}: {first_line(e)}); check HF_ENDPOINT") from None
    _remember_listing(ref.repo_id, commit, files)
    model = choose_gguf(ref, files)
    fetched: list[Path] = []
    got: list[Path] = []
    try:
        for part in model.parts:
            part_ref = HubRef(ref.repo_id, part, ref.revision)
            was_cached = cached_hub_path(part_ref) is not None
            path = fetch_hub(part_ref, download=True, progress=progress)
            got.append(path)
            if not was_cached:
                fetched.append(path)
        # every part from the commit listed, so that a split model's parts lie side by side in one snapshot
        if commit and any(commit not in p.parts for p in got):
            raise ModelSourceError(f"{ref}: {ref.repo_id} changed on the hub while its files were downloading;"
                                   " run again")
    except (EdgeEnsembleError, KeyboardInterrupt):
        for p in fetched:
            _remove_hub_file(p)
        raise
    return got[0]
