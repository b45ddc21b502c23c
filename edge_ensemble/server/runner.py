"""Running the server process: the warning for an unguarded bind, the listening socket, malloc's arenas, and
uvicorn serving :func:`create_app`'s application until interrupted (:func:`serve`, behind ``edge-ensemble
serve``)."""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import logging
import socket
from typing import TYPE_CHECKING, Any, Callable

from ..errors import UsageError, warn
from .app import create_app
from .settings import ServerOptions

if TYPE_CHECKING:
    from ..api import Ensemble
    from ..logs import Logbook


def check_bind(host: str, api_key: str | None) -> None:
    """Warn when the server listens beyond this machine without a key."""
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        warn(f"serving on {host} without --api-key: anyone who can reach this port can use the models;"
             " give --api-key, or bind 127.0.0.1")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one); a one-line error when it cannot be had."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --host or --port") from None
    return sock


def _one_malloc_arena() -> None:
    """On glibc, one malloc arena for the whole process (before any thread starts). The answer threads of the
    batched mode would otherwise each get an arena: resident memory then grew by about a megabyte per round of
    requests at --parallel 8 (logits rows freed in one arena, allocated in another) and sat 38 MiB higher; with one
    arena it stays flat at the same speed (benchmarks/results/serve-load.md). The threads spend their time in
    llama.cpp or under the GIL, so they do not contend for it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-8, 1)  # M_ARENA_MAX; absent outside glibc (AttributeError) and then nothing to do
    except (OSError, AttributeError):
        pass


def log_config() -> dict[str, Any]:
    """uvicorn's logging with every line on stderr, the access log too (uvicorn writes that to stdout): the
    server's output is its log, and one stream keeps it in order."""
    import uvicorn.config

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return config


def serve(ensemble: "Ensemble | Callable[[], Ensemble]", options: ServerOptions, *, host: str = "127.0.0.1",
          port: int = 8080, log_level: str = "info", policy: str = "", logbook: "Logbook | None" = None) -> None:
    """Serve ``ensemble`` over HTTP until interrupted (Ctrl-C); the ensemble is closed at the end.

    ``ensemble`` may be a function that loads one: it is called once the options are checked and the port
    is bound, so that a wrong option or a busy port fails before any model loads. ``policy``: how the startup line
    names the policy of requests that ask for none (``single, calibrated 2026-12-02 (the first member alone)``).
    ``logbook``: the conversation log each answer is kept in (None: none)."""
    try:
        import uvicorn
    except ImportError:
        raise UsageError("serving needs the server extra: pip install 'edge-ensemble[server]'") from None
    options = options.validate()
    check_bind(host, options.api_key)
    sock = listen(host, port)
    _one_malloc_arena()
    try:
        loaded = ensemble() if callable(ensemble) else ensemble
    except BaseException:
        sock.close()
        raise
    app = create_app(loaded, options, close_ensemble=True, logbook=logbook)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,  # sets up uvicorn's logging
                            log_config=log_config())
    shown = f"[{host}]" if ":" in host else host
    answers = f"; policy {policy}, unless a request names another" if policy else ""
    logging.getLogger("uvicorn.error").info(
        "serving %r on http://%s:%d/v1 (Ctrl-C quits%s)", options.model_id, shown, sock.getsockname()[1], answers)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    # The server stops only on a signal (Ctrl-C, SIGTERM). uvicorn re-raises it after a clean shutdown, but
    # not always under load; report it the same way every time, as the interruption it was.
    raise KeyboardInterrupt
