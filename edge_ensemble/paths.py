"""Where edge-ensemble keeps its files: one cache directory and one user config file."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

CACHE_ENV = "EDGE_ENSEMBLE_CACHE"
CONFIG_ENV = "EDGE_ENSEMBLE_CONFIG"


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path``: never a half file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
