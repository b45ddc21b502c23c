"""The Starlette application: routes, authentication, the request body limit, streaming (server-sent events)
and JSON responses, error objects for every failure, and the worker's lifespan.

Starlette is imported inside :func:`create_app` only, so that the package loads without the ``server`` extra
(the CLI reads :data:`SERVER_LIMITS` for its flags).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from ..errors import EdgeEnsembleError
from ..logs import Exchange, Writer, exchange
from .requests import _INTERNAL, ApiError, _check_loaded_for, _library_error, ask_provenance_scores, parse_request
from .responses import _ClientGone, _collect, _event_stream, _first_item, _Items, _Reply
from . import pages
from .settings import ServerOptions
from .workers import Job, QueueFull, Worker

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from ..api import Ensemble
    from ..logs import Logbook

# The name the single module had: the server's log lines stay the same.
log = logging.getLogger("edge_ensemble.server")


def create_app(ensemble: "Ensemble", options: ServerOptions | None = None, *,
               close_ensemble: bool = False, logbook: "Logbook | None" = None) -> Any:
    """A Starlette application serving ``ensemble``; the worker thread starts and stops with the app's lifespan
    (``close_ensemble`` also closes the ensemble at shutdown). With ``logbook`` each finished answer (each choice)
    is kept in that conversation log, written on a thread of its own once the response has been made."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    opts = (options or ServerOptions()).validate()
    state: dict[str, Any] = {}
    started = int(time.time())

    def error_response(err: ApiError) -> "Response":
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    class EventStream(StreamingResponse):
        """Server-sent events of a request's answers: a disconnect cancels the body iterator whatever ASGI version the
        server speaks (Starlette listens for it only below ASGI spec 2.4), and however the response ends,
        the answer is stopped."""

        def __init__(self, items: _Items, content: AsyncIterator[bytes], done: Callable[[], None]) -> None:
            super().__init__(content, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.items, self.done = items, done

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": "2.3"}}
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.items.cancel()
                self.done()

    def guarded(handler: Callable[["Request"], Any]) -> Callable[["Request"], Any]:
        """Run ``handler``: authentication first; an :class:`ApiError` becomes its error object, anything
        unexpected a logged 500."""

        async def endpoint(request: "Request") -> "Response":
            try:
                if opts.api_key is not None and request.url.path != "/health" and request.url.path not in pages.FILES:
                    _authenticate(request, opts.api_key)
                return await handler(request)
            except ApiError as err:
                return error_response(err)
            except ClientDisconnect:
                return error_response(ApiError(400, "the client disconnected"))
            except Exception:  # noqa: BLE001
                log.exception("request failed")
                return error_response(_INTERNAL)

        return endpoint

    async def read_json(request: "Request") -> Any:
        length = request.headers.get("content-length")
        too_large = ApiError(413, f"the request body is larger than this server's limit of {opts.max_body_bytes} bytes",
                             code="request_too_large")
        if length is not None and (not length.isdigit() or int(length) > opts.max_body_bytes):
            raise too_large
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > opts.max_body_bytes:
                raise too_large
        try:
            return json.loads(bytes(data), parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {' '.join(str(exc).split())[:200]}",
                           code="invalid_json") from None

    async def answer(request: "Request", kind: str) -> "Response":
        call = parse_request(kind, await read_json(request), opts)
        _check_loaded_for(call, ensemble)
        ask_provenance_scores(call, ensemble)
        room = ensemble.config.parallel + opts.max_queue
        if call.n > room:
            raise ApiError(400, f"n={call.n} choices can never be made together here: this server makes {ensemble.config.parallel}"
                           f" answer(s) at once (--parallel) and queues {opts.max_queue} (--max-queue); ask for at"
                           f" most {room}", param="n", code="invalid_value")
        loop = asyncio.get_running_loop()
        jobs: list[Job] = []
        try:  # one answer per choice, each with its own seed (validated here; the work starts in the worker)
            for seed in _seeds(call.arguments["seed"], call.n):
                jobs.append(Job(ensemble.stream(**{**call.arguments, "seed": seed}), loop, seed=seed))
        except EdgeEnsembleError as exc:
            for job in jobs:
                job.events.close()
            raise _library_error(exc) from None
        try:
            state["worker"].submit_all(jobs)
        except QueueFull as full:
            for job in jobs:
                job.events.close()
            raise ApiError(429, f"the server is busy: its queue of {state['worker'].max_queue} waiting request(s)"
                           f" is full; retry in {full.retry_after} s", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(full.retry_after)}) from None
        reply = _Reply(call, opts.model_id, ensemble.members[0].name)
        items = _Items(jobs, request)
        try:
            first = await _first_item(items)
        except _ClientGone:
            items.cancel()
            return error_response(ApiError(400, "the client disconnected"))
        if first[1][0] == "error":
            items.cancel()
            raise first[1][1]

        def done() -> None:  # the request's answers to the log (the writer's thread builds and writes them)
            if "log" in state:
                state["log"].put(lambda: _logged(ensemble, call, reply.id, jobs))

        if call.stream:
            items.request = None  # the streaming response itself notices a disconnect (and cancels the answers)
            return EventStream(items, _event_stream(items, reply, first), done)
        try:
            results = await _collect(items, first)
        except _ClientGone:
            items.cancel()
            return error_response(ApiError(400, "the client disconnected"))
        response = JSONResponse(reply.whole(results, jobs))
        done()
        return response

    async def chat_completions(request: "Request") -> "Response":
        return await answer(request, "chat")

    async def completions(request: "Request") -> "Response":
        return await answer(request, "completion")

    def model_object() -> dict[str, Any]:
        return {"id": opts.model_id, "object": "model", "created": started, "owned_by": "edge-ensemble",
                "edge_ensemble": {"members": [{"name": m.name, "role": m.role, "architecture": m.architecture}
                                              for m in ensemble.members], "policy": ensemble.config.policy}}

    async def models(request: "Request") -> "Response":
        return JSONResponse({"object": "list", "data": [model_object()]})

    async def model(request: "Request") -> "Response":
        if request.path_params["model"] != opts.model_id:
            raise ApiError(404, f"the model {request.path_params['model']!r} does not exist; this server serves"
                           f" {opts.model_id!r}", param="model", code="model_not_found")
        return JSONResponse(model_object())

    async def page(request: "Request") -> "Response":
        data, media = pages.read(request.url.path)
        return Response(data, media_type=media, headers={"Cache-Control": "no-cache"})

    async def info(request: "Request") -> "Response":
        return JSONResponse(pages.describe(ensemble, opts.model_id))

    async def health(request: "Request") -> "Response":
        return JSONResponse({"status": "ok", "model": opts.model_id, **state["worker"].status()})

    async def http_error(request: "Request", exc: Exception) -> "Response":
        status = getattr(exc, "status_code", 500)
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(status, "request failed")
        return error_response(ApiError(status, message, code={404: "not_found", 405: "method_not_allowed"}.get(status)))

    async def server_error(request: "Request", exc: Exception) -> "Response":
        log.error("unhandled error", exc_info=exc)
        return error_response(_INTERNAL)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        together = opts.batch and ensemble.config.parallel > 1
        if logbook is not None:
            state["log"] = Writer(logbook, log.warning)
        with ensemble.decode_together() if together else contextlib.nullcontext() as rounds:
            state["worker"] = Worker(opts.max_queue, ensemble.config.parallel, rounds)
            try:
                yield
            finally:
                state["worker"].stop()
                if "log" in state:  # what the answers that finished left to write
                    state.pop("log").close()
        if close_ensemble:
            ensemble.close()

    routes = [
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/models/{model:path}", guarded(model), methods=["GET"]),
        Route("/health", guarded(health), methods=["GET"]),
        Route("/v1/edge_ensemble", guarded(info), methods=["GET"]),
        *(Route(path, guarded(page), methods=["GET"]) for path in pages.FILES),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})


def _logged(ensemble: "Ensemble", call: Any, reply_id: str, jobs: list[Job]) -> list[Exchange]:
    """The exchanges of a finished request, one per choice that finished (a choice stopped by a disconnect is
    not kept); its choices share the response's id as their conversation."""
    arguments = call.arguments
    return [exchange("serve", ensemble, job.result, messages=arguments.get("messages"), raw=arguments.get("raw"),
                     call={**arguments, "seed": job.seed}, conversation=reply_id)
            for job in jobs if job.result is not None]


def _seeds(seed: int | None, n: int) -> list[int]:
    """One sampling seed per choice: ``seed``, ``seed + 1``, ... when the request (or the server) gives one, else
    random ones; reported in the response, so that a single request with choice i's seed answers as it did."""
    if seed is None:
        return [secrets.randbelow(_SEED_LIMIT) for _ in range(n)]
    return [(seed + i) % _SEED_LIMIT for i in range(n)]


_SEED_LIMIT = 2**63  # seeds are 0 .. 2**63 - 1 (GENERATION["seed"])


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _authenticate(request: "Request", key: str) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    # compare_digest: the time taken does not tell how much of a guessed key was right
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
