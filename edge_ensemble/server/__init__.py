"""An OpenAI-compatible HTTP server over one loaded ensemble (``edge-ensemble serve``).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (raw text, no chat template), both plain
JSON or server-sent events ending with ``data: [DONE]``; ``GET /v1/models``, ``GET /v1/models/{id}`` and
``GET /health``; ``GET /v1/edge_ensemble`` describes the ensemble, and ``GET /`` is a web page that shows how each
answer was made (docs/web.md). Ensemble settings per request and statistics per answer travel in one extension
object, ``edge_ensemble`` (see :data:`EXTENSION_FIELDS` and docs/server.md); with its ``provenance`` field on, each
streamed chunk also says who wrote its tokens (:mod:`.provenance`; off, the responses are unchanged).

Up to the ensemble's ``parallel`` answers are made at once, each on its own sequences (lanes) of the members'
contexts; the others wait in arrival order. With ``batch`` (the default) each running answer has a thread of its
own and their decodes are batched: whatever they ask for at the same moment is one llama_decode per model
(:mod:`edge_ensemble.rounds`; llama.cpp contexts are never used by two threads at once). Without it one worker
thread advances them round-robin, one event (one policy step, its own llama_decode calls) each. Up to ``max_queue`` requests wait their turn; one more is refused with 429 and ``Retry-After``. A
client that goes away (a closed stream, or a dropped connection while a non-streaming answer is made) has its
answer stopped after the current policy step, which frees its lanes for the next request.

A request's ``n`` choices (up to ``max_n``) are ``n`` answers of their own, each with its own reported seed (the
request's seed + i), queued together; ``logprobs`` / ``top_logprobs`` ask each emitted token's log-probability as the
model that wrote it scored it, from a policy with the ``logprobs`` capability (docs/server.md says what an ensembled
position reports).

Every error a client sees is an OpenAI-style object ``{"error": {"message", "type", "param", "code"}}``
with its status code; an unexpected exception is logged here with its traceback and answered with a
generic 500, never the traceback.

Needs the ``server`` extra (starlette, uvicorn): ``pip install 'edge-ensemble[server]'``.

Modules (one job each; the ones above never import the ones below):

* :mod:`.settings`  the server's limits (:data:`SERVER_LIMITS`) and :class:`ServerOptions`
* :mod:`.requests`  request fields, their validation into a :class:`Call`, and the :class:`ApiError` answers
* :mod:`.workers`   the :class:`Worker` that makes the answers on the ensemble (batched with decode rounds)
* :mod:`.provenance` who wrote each token of a chunk, the branches of the last one (the provenance extension)
* :mod:`.responses` the answers' JSON objects and server-sent events
* :mod:`.pages`     the web page's files (``web/``) and the ensemble's description for it
* :mod:`.app`       the Starlette application (:func:`create_app`): routes, authentication, streaming
* :mod:`.runner`    :func:`serve`: the socket, the bind check and uvicorn

Every public name of the single module this package replaces is re-exported here, so ``from
edge_ensemble.server import ...`` works as before; the logger keeps that module's name, ``edge_ensemble.server``.
"""

from __future__ import annotations

from .app import create_app
from .requests import MAX_STOPS, ApiError, Call, extension_fields, parse_request, server_only
from .runner import check_bind, listen, serve
from .settings import (BATCH, MAX_BODY_BYTES, MAX_N, MAX_PROMPT_CHARS, MAX_QUEUE, SERVER_LIMITS, TIME_LIMIT,
                       ServerOptions)
from .workers import Job, QueueFull, Worker

__all__ = [
    "BATCH", "MAX_BODY_BYTES", "MAX_N", "MAX_PROMPT_CHARS", "MAX_QUEUE", "MAX_STOPS", "SERVER_LIMITS", "TIME_LIMIT", "ApiError",
    "Call", "Job", "QueueFull", "ServerOptions", "Worker", "check_bind", "create_app", "extension_fields", "listen",
    "parse_request", "serve", "server_only",
]


def __getattr__(name: str) -> object:
    # EXTENSION_FIELDS, SERVER_ONLY: the request tables by their old names, read from the registry when asked for
    from . import requests

    return getattr(requests, name)
