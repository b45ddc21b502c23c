"""Process-wide llama.cpp state: the backend, initialised once, and its log.

llama.cpp logs through one process-wide callback. We keep its recent error lines so that a failed load can say
*why* in one line (:func:`last_llama_error`), and stay silent unless ``EDGE_ENSEMBLE_VERBOSE`` is set.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import deque
from contextlib import ExitStack
from typing import TypeVar

import llama_cpp as L

_LOG_LEVEL_ERROR = 4  # GGML_LOG_LEVEL_ERROR
_LOG_LEVEL_WARN = 3
_recent_errors: deque[str] = deque(maxlen=8)
_log_lock = threading.Lock()


@L.llama_log_callback
def _log_callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", errors="replace") if text else ""
    if level in (_LOG_LEVEL_ERROR, _LOG_LEVEL_WARN) and message.strip():
        with _log_lock:
            _recent_errors.append(message.strip())
    if os.environ.get("EDGE_ENSEMBLE_VERBOSE"):
        os.write(2, message.encode("utf-8", errors="replace"))


_backend_ready = False


def init_backend() -> None:
    """Initialise llama.cpp's backend and route its log to :func:`_log_callback` (once per process)."""
    global _backend_ready
    if not _backend_ready:
        L.llama_backend_init()
        L.llama_log_set(_log_callback, ctypes.c_void_p(0))
        _backend_ready = True


def last_llama_error() -> str:
    """The latest error or warning llama.cpp logged since the last call ("" if none); clears the record."""
    with _log_lock:
        errors = [e for e in _recent_errors if e]
        _recent_errors.clear()
    return errors[-1] if errors else ""


_O = TypeVar("_O", bound="Owned")


class Owned:
    """A llama.cpp resource whose lifetime is the ExitStack ``self._stack`` (what it allocated, freed in reverse):
    ``close()`` unwinds it, safely twice; a context manager; ``__del__`` as a safety net (explicit close() is the
    contract). The model file, the context and the Model that chains them."""

    _stack: ExitStack

    def close(self) -> None:
        """Free what this object holds (in reverse order of allocation). Safe to call twice."""
        self._stack.close()

    def __enter__(self: _O) -> _O:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
