"""Responses: the OpenAI-shaped JSON objects of one answer (whole, or as streamed chunks with ``usage`` and the
``edge_ensemble`` statistics), server-sent events, and reading a :class:`Job`'s items on the request's event
loop (a client that disconnects meanwhile cancels its answer).

Starlette is not imported here; the response classes themselves are made in :mod:`.app`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator

from .requests import _INTERNAL, Call
from .workers import Job

if TYPE_CHECKING:
    from starlette.requests import Request

    from ..engine import GenerationResult


def _usage(result: "GenerationResult") -> dict[str, int]:
    prompt = next(iter(result.stats.prompt_tokens.values()), 0)  # the drafter's count
    return {"prompt_tokens": prompt, "completion_tokens": result.stats.tokens,
            "total_tokens": prompt + result.stats.tokens}


def _extension_out(result: "GenerationResult", call: Call, job: Job) -> dict[str, Any]:
    timed_out = (result.finish_reason == "length" and result.stats.tokens < call.max_tokens
                 and result.stats.prompt_seconds + result.stats.generation_seconds >= call.time_limit)
    queue_seconds = (job.started or job.submitted) - job.submitted
    return {"stats": result.stats.to_dict(), "timed_out": timed_out, "queue_seconds": round(queue_seconds, 4)}


class _Reply:
    """The ids and shapes of one answer's response objects."""

    def __init__(self, call: Call, model_id: str) -> None:
        self.call, self.model = call, model_id
        chat = call.kind == "chat"
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = ("chat.completion" if chat else "text_completion")

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def whole(self, result: "GenerationResult", job: Job) -> dict[str, Any]:
        if self.call.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "logprobs": None, "finish_reason": result.finish_reason}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
        return {**self._envelope(self.object, [choice]), "usage": _usage(result),
                "edge_ensemble": _extension_out(result, self.call, job)}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, role: bool = False) -> dict[str, Any]:
        if self.call.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        return self._envelope("text_completion", [{"index": 0, "text": text or "", "logprobs": None,
                                                   "finish_reason": finish_reason}])

    def usage_chunk(self, result: "GenerationResult") -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.call.kind == "chat" else "text_completion"
        return {**self._envelope(obj, []), "usage": _usage(result)}


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode() + b"\n\n"


# -- reading an answer's items -----------------------------------------------------------------------------


class _ClientGone(Exception):
    """The client disconnected while its answer was made."""


async def _next_item(job: Job, request: "Request | None") -> tuple[str, Any]:
    """The job's next item; with ``request``, a client that disconnects meanwhile cancels the job."""
    if request is None:
        return await job.out.get()
    getter = asyncio.ensure_future(job.out.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=0.25)
            if done:
                return getter.result()
            if await request.is_disconnected():
                raise _ClientGone()
    finally:
        if not getter.done():
            getter.cancel()


async def _first_item(job: Job, request: "Request") -> tuple[str, Any]:
    """The first event (it comes once the prompt is read), or the error that ended the answer before it."""
    item = await _next_item(job, request)
    return ("error", _INTERNAL) if item[0] == "end" else item


async def _collect(job: Job, request: "Request", item: tuple[str, Any]) -> "GenerationResult":
    """The whole answer, from its first ``item`` on; an error of the answer is raised as its :class:`ApiError`."""
    result = None
    while item[0] != "end":
        if item[0] == "error":
            raise item[1]
        if item[0] == "event" and item[1].result is not None:
            result = item[1].result
        item = await _next_item(job, request)
    if result is None:
        raise _INTERNAL
    return result


async def _event_stream(job: Job, reply: _Reply, item: tuple[str, Any]) -> AsyncIterator[bytes]:
    """The answer as server-sent events, from its first ``item`` on, ending with ``data: [DONE]``."""
    try:
        if reply.call.kind == "chat":
            yield _sse(reply.chunk(None, role=True))
        while item[0] != "end":
            kind, value = item
            if kind == "error":
                yield _sse(value.body())
                break
            if kind == "event" and value.result is not None:
                result = value.result
                yield _sse({**reply.chunk(None if reply.call.kind == "chat" else "", result.finish_reason),
                            "edge_ensemble": _extension_out(result, reply.call, job)})
                if reply.call.include_usage:
                    yield _sse(reply.usage_chunk(result))
            elif kind == "event" and value.text:
                yield _sse(reply.chunk(value.text))
            item = await job.out.get()
        yield _sse("[DONE]")
    finally:  # a disconnect cancels this generator: stop the answer and free the turn
        job.cancelled.set()

