"""Parsing a ``server:http://HOST:PORT[=MODEL]`` member spec: a model served by llama.cpp's ``llama-server``
(:mod:`edge_ensemble.remote` talks to it). Here, below both :mod:`edge_ensemble.remote` and the catalog, so that
the catalog reads a preset's server members without importing the runtime."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import UsageError

SERVER_PREFIX = "server:"


@dataclass(frozen=True)
class ServerSpec:
    """A parsed ``server:`` member spec."""

    url: str  # http://host:port (no path)
    host: str
    port: int
    model: str | None  # the declared model spec, or None (use the server's model_path)


def is_server_spec(spec: object) -> bool:
    """True for a ``server:...`` member spec."""
    return isinstance(spec, str) and spec.startswith(SERVER_PREFIX)


def parse_server_spec(spec: str) -> ServerSpec:
    """``server:http://host:port[=MODEL]`` -> :class:`ServerSpec`; a malformed spec is a UsageError."""
    rest = spec[len(SERVER_PREFIX):]
    url, sep, model = rest.partition("=")
    hint = "; write server:http://HOST:PORT or server:http://HOST:PORT=MODEL (a catalog name or a GGUF path)"
    try:
        parts = urlsplit(url)
    except ValueError as e:  # e.g. an unclosed IPv6 bracket
        raise UsageError(f"member {spec!r}: not a valid address ({e}){hint}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise UsageError(f"member {spec!r}: the server address must be http://HOST:PORT{hint}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(f"member {spec!r}: give the server's address only, without a path{hint}")
    try:
        port = parts.port or 80
    except ValueError:
        raise UsageError(f"member {spec!r}: the port is not a number from 1 to 65535{hint}") from None
    if sep and not model.strip():
        raise UsageError(f"member {spec!r}: nothing after '='{hint}")
    return ServerSpec(f"http://{parts.hostname}:{port}", parts.hostname, port, model.strip() or None)


def declared_model(member: str) -> str | None:
    """The model a member spec stands for: a ``server:`` spec's declared model (None when it declares none),
    else the spec itself (how presets, which list catalog keys, read server members)."""
    return parse_server_spec(member).model if is_server_spec(member) else member


__all__ = ["SERVER_PREFIX", "ServerSpec", "declared_model", "is_server_spec", "parse_server_spec"]
