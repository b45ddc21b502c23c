"""Where edge-ensemble keeps its files: one cache directory, one user config file and the conversation log."""

from __future__ import annotations

import errno
import os
import secrets
import stat
import sys
from pathlib import Path

from .errors import UsageError

CACHE_ENV = "EDGE_ENSEMBLE_CACHE"
CONFIG_ENV = "EDGE_ENSEMBLE_CONFIG"
LOGS_ENV = "EDGE_ENSEMBLE_LOGS"


def cache_dir() -> Path:
    """Cache root: $EDGE_ENSEMBLE_CACHE, else $XDG_CACHE_HOME/edge-ensemble, else ~/.cache/edge-ensemble."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "edge-ensemble"


def models_dir() -> Path:
    """Directory where offline bundles are assembled into GGUF files."""
    return cache_dir() / "models"


def config_path() -> Path:
    """User config: $EDGE_ENSEMBLE_CONFIG, else $XDG_CONFIG_HOME/edge-ensemble/config.toml."""
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "edge-ensemble" / "config.toml"


def data_dir() -> Path:
    """User data root (what is kept, not re-made): $XDG_DATA_HOME/edge-ensemble, else the platform's place:
    ~/.local/share/edge-ensemble, ~/Library/Application Support/edge-ensemble (macOS), %APPDATA%\\edge-ensemble."""
    if os.environ.get("XDG_DATA_HOME"):
        return Path(os.environ["XDG_DATA_HOME"]).expanduser() / "edge-ensemble"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "edge-ensemble"
    if sys.platform == "win32" and os.environ.get("APPDATA"):
        return Path(os.environ["APPDATA"]) / "edge-ensemble"
    return Path.home() / ".local" / "share" / "edge-ensemble"


def logs_path() -> Path:
    """The conversation log (SQLite): $EDGE_ENSEMBLE_LOGS, else logs.db in :func:`data_dir`."""
    if os.environ.get(LOGS_ENV):
        return Path(os.environ[LOGS_ENV]).expanduser()
    return data_dir() / "logs.db"


def check_out_dir(path: str | os.PathLike[str], flag: str = "--out") -> None:
    """Refuse, before any work (and without creating anything), an output directory that cannot be made or
    written: a :class:`UsageError` naming ``flag``, the path and the reason."""
    wanted = Path(path).expanduser()
    probe = wanted
    while not os.path.lexists(probe) and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        where = "is" if probe == wanted else f"is under {probe}, which is"
        raise UsageError(f"{flag} {path} {where} not a directory; pass another {flag}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write to {probe}; pass another {flag}")


def make_out_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """``path`` created if missing (parents too); an OS refusal is a :class:`UsageError` naming ``flag``."""
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot create it ({e.strerror or e}); pass another {flag}") from None
    return out


def read_only(path: Path) -> bool:
    """Whether the existing file ``path`` is not to be written: no write bit at all (root may write anything, so
    the bits are the owner's statement), or no write access."""
    return not path.stat().st_mode & 0o222 or not os.access(path, os.W_OK)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path``: never a half file.

    A symlink is written through (its target is replaced, the link stays a link), an existing file keeps its
    permission bits, and a read-only file is refused (PermissionError) instead of being silently replaced.
    """
    target = Path(os.path.realpath(path))
    try:
        st: os.stat_result | None = target.stat()
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "it is a directory; give a file name", str(path))
    if st is not None and read_only(target):
        raise PermissionError(errno.EACCES, "the file is read-only; choose another file or make it writable"
                              f" (chmod u+w {path})", str(path))
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if st is not None:
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
