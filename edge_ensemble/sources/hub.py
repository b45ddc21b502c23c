"""The Hugging Face hub: ``hf:<org>/<repo>/<path-in-repo>[@<revision>]`` references, fetched with
``huggingface_hub.hf_hub_download`` into huggingface-hub's own cache (imported only when the hub is used)."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import paths
from ..errors import ModelSourceError
from ..gguf import check_gguf
from ._common import first_line, marker_ok, remember_verified, sha256_with_progress

HUB_PREFIX = "hf:"


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


def _hub_error(
    exc: BaseException, ref: object, download: bool, endpoint: str | None
) -> ModelSourceError:
    """Translate a huggingface-hub / HTTP exception into one actionable line (``ref``: the HubRef or hub_repo's
    HubRepoRef asked for, only its text is used)."""
    from huggingface_hub import utils as hf_utils

    where = endpoint or "https://huggingface.co"
    if isinstance(exc, hf_utils.LocalEntryNotFoundError):
        if not download:
            return ModelSourceError(f"{ref} is not in the hub cache ({hub_cache_dir()}) and downloads are off")
        cause = exc.__cause__
        if isinstance(cause, hf_utils.OfflineModeIsEnabled):
            return ModelSourceError(f"{ref} is not in the hub cache ({hub_cache_dir()}) and HF_HUB_OFFLINE is set")
        reason = f" ({first_line(cause)})" if cause is not None else ""
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
    if isinstance(exc, hf_utils.EntryNotFoundError) and isinstance(ref, HubRef):
        return ModelSourceError(
            f"{ref}: file '{ref.filename}' not found in {ref.repo_id} at revision {ref.revision or 'main'}"
        )
    if isinstance(exc, hf_utils.HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        return ModelSourceError(f"{ref}: the hub at {where} answered HTTP {status}: {first_line(exc)}")
    if isinstance(exc, ValueError):
        return ModelSourceError(f"bad hub reference {ref}: {first_line(exc)}")
    # Transfer errors (connection reset, body cut short, size mismatch, disk full): huggingface-hub has
    # already retried and deleted its temporary file, so nothing partial is left in the cache.
    return ModelSourceError(
        f"download of {ref} from {where} failed ({type(exc).__name__}: {first_line(exc)});"
        " nothing was kept, run again to retry"
    )


def _remove_hub_file(pointer: Path) -> None:
    """Delete a hub cache file: the snapshot entry and the blob it points to, so the next call refetches."""
    blob = Path(os.path.realpath(pointer))
    for p in (pointer, blob):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def hub_marker(sha256: str) -> Path:
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
        marker = hub_marker(sha256)
        if not marker_ok(marker, path, sha256):
            actual = sha256_with_progress(path, f"verifying {ref.filename}", progress)
            if actual != sha256:
                _remove_hub_file(path)
                raise ModelSourceError(
                    f"{ref} failed verification: sha256 {actual[:12]}… != expected {sha256[:12]}…;"
                    " the file was removed from the hub cache (a wrong mirror, or the file changed on the hub)"
                )
            remember_verified(marker, path, sha256)
    else:
        check_gguf(path)
    return path


def cached_hub_path(ref: HubRef) -> Path | None:
    """The hub cache copy of ``ref`` if there is one, without any network access."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(ref.repo_id, ref.filename, cache_dir=str(hub_cache_dir()), revision=ref.revision)
    return Path(found) if isinstance(found, str) and os.path.isfile(found) else None

