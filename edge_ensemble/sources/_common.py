"""What the model sources share: one-line errors about the cache, a progress counter, sha256 and the markers
that remember a verified file. Public names: the other modules of :mod:`edge_ensemble.sources` import them."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

from .. import paths
from ..errors import ModelSourceError, warn
from ..hashing import sha256_file

CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough to keep memory flat


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def unwritable(directory: Path, e: OSError) -> ModelSourceError:
    """The one-line error for a part of the cache we cannot write (a cache made with sudo, a read-only mount)."""
    if e.errno == errno.EROFS:
        fix = f"it is on a read-only file system; set {paths.CACHE_ENV} to a writable directory"
    else:
        fix = (f"make it writable (e.g. sudo chown -R $USER {paths.cache_dir()}) or set {paths.CACHE_ENV} to a"
               " writable directory")
    return ModelSourceError(f"cannot write to {directory} ({e.strerror or first_line(e)}); {fix}")


def check_writable(directory: Path) -> None:
    """Create and remove a file in ``directory`` (permission bits alone say nothing for root or a read-only
    mount), so that a pull fails before it downloads anything."""
    probe = directory / f".write-test.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as e:
        raise unwritable(directory, e) from None


def disk_full(directory: Path, what: str, need: int) -> ModelSourceError:
    free = shutil.disk_usage(directory).free
    return ModelSourceError(
        f"not enough disk space in {directory} to {what}: needs about {mb(need)}, {mb(free)} free;"
        f" free some space or set {paths.CACHE_ENV} to a directory on another disk"
    )



class Progress:
    """A byte counter on stderr: a rewritten line on a terminal, start/end lines otherwise."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled, self.done = label, total, enabled, 0
        self.tty = enabled and sys.stderr.isatty()
        self._last = 0.0
        if enabled and not self.tty:
            print(f"{label}: {mb(total) if total else 'size unknown'} ...", file=sys.stderr, flush=True)

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty and now - self._last >= 0.1:
            self._last = now
            pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            total = f"/{mb(self.total)}" if self.total else ""
            print(f"\r{self.label}: {mb(self.done)}{total}{pct}", end="", file=sys.stderr, flush=True)

    def close(self, ok: bool = True) -> None:
        if not self.enabled:
            return
        status = "done" if ok else "failed"
        prefix = "\r" if self.tty else ""
        print(f"{prefix}{self.label}: {mb(self.done)} {status}" + " " * 10, file=sys.stderr, flush=True)


def sha256_with_progress(path: Path, label: str, progress: bool) -> str:
    """The sha256 of ``path`` (:func:`edge_ensemble.hashing.sha256_file`), with a byte counter labelled ``label``."""
    bar = Progress(label, path.stat().st_size, progress)
    sha = sha256_file(path, bar.update, CHUNK)
    bar.close()
    return sha


# A marker records "<sha256> <size> <mtime_ns>" of a file whose hash was verified, so later runs trust it
# without rehashing hundreds of MB; any change of size or mtime invalidates it.
def marker_ok(marker: Path, path: Path, sha256: str) -> bool:
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


def remember_verified(marker: Path, path: Path, sha256: str) -> None:
    """Write the marker of a file whose hash was just verified; a read-only cache only costs a rehash next time."""
    try:
        _write_marker(marker, path, sha256)
    except OSError as e:
        warn(f"cannot record that {path.name} was verified ({marker}: {e.strerror or first_line(e)}), so every"
             f" run verifies it again; make {marker.parent} writable to avoid that")

