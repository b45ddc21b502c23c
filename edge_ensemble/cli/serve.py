"""``edge-ensemble serve``: the ensemble behind an OpenAI-compatible HTTP API (the ``server`` extra)."""

from __future__ import annotations

import functools
from typing import Any

import click

from ..chat import clean_text
from ..config import Settings, describe_policy
from ..errors import UsageError
from ..logs import Logbook
from ..server import SERVER_LIMITS
from .common import open_ensemble
from .flags import _declared_flags, settings_options


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback without --api-key is warned about.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="TCP port.")
@click.option("--api-key", envvar="EDGE_ENSEMBLE_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* [env: EDGE_ENSEMBLE_API_KEY; default: none].")
@click.option("--served-model-name", metavar="NAME",
              help="The model id clients send [default: the preset's name, else the members' names joined by +].")
@_declared_flags(SERVER_LIMITS, "limits")
@settings_options
def serve(settings: Settings, host: str, port: int, api_key: str | None, served_model_name: str | None,
          limits: dict[str, Any]) -> None:
    """Serve the ensemble over an OpenAI-compatible HTTP API (needs the server extra).

    \b
    POST /v1/chat/completions, POST /v1/completions (raw text), GET /v1/models,
    GET /health. Up to --parallel answers are made at once, their decodes
    batched (--no-batch: interleaved), the others wait in arrival order. The generation
    options (--max-tokens, --temperature, ...) are the defaults of requests that
    leave them out; -s is the system prompt of chat requests that bring none.
    Each answer is kept in the conversation log (`edge-ensemble logs`) unless --no-log.
    """
    from ..server import ServerOptions, serve as run_server  # (starlette is imported when it starts)
    from ..sources import parse_spec

    try:
        import starlette  # noqa: F401
    except ImportError:
        raise UsageError("serve needs the server extra: pip install 'edge-ensemble[server]'") from None
    g = settings.generation
    name = served_model_name or settings.preset or "+".join(parse_spec(m).display_name for m in settings.members)
    options = ServerOptions(model_id=name, api_key=api_key, **limits, max_tokens=g.max_tokens,
                            temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, seed=g.seed,
                            system=clean_text(settings.system, "the system prompt") if settings.system else None)
    run_server(functools.partial(open_ensemble, settings, per_request_policy=True), options, host=host, port=port,
               policy=describe_policy(settings), logbook=Logbook() if settings.log else None)
