"""Responses: the OpenAI-shaped JSON objects of one answer (whole, or as streamed chunks with ``usage`` and the
``edge_ensemble`` statistics), server-sent events, and reading a :class:`Job`'s items on the request's event
loop (a client that disconnects meanwhile cancels its answer).

Starlette is not imported here; the response classes themselves are made in :mod:`.app`.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator

from . import provenance
from .requests import _INTERNAL, Call
from .workers import Job

if TYPE_CHECKING:
    from starlette.requests import Request

    from ..engine import GenerationResult
    from ..policies import TokenLogprob


def _usage(results: "list[GenerationResult]") -> dict[str, int]:
    prompt = next(iter(results[0].stats.prompt_tokens.values()), 0)  # the drafter's count, once for every choice
    completion = sum(r.stats.tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _extension_out(result: "GenerationResult", call: Call, job: Job) -> dict[str, Any]:
    timed_out = (result.finish_reason == "length" and result.stats.tokens < call.max_tokens
                 and result.stats.prompt_seconds + result.stats.generation_seconds >= call.time_limit)
    queue_seconds = (job.started or job.submitted) - job.submitted
    return {"stats": result.stats.to_dict(), "timed_out": timed_out, "queue_seconds": round(queue_seconds, 4),
            "seed": job.seed}


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


class _Logprobs:
    """One choice's log-probabilities in OpenAI's shapes: chat's ``{"content": [...]}`` or the completions API's
    ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (offsets in characters, counted from the end
    of the prompt as llama-cpp-python does)."""

    def __init__(self, chat: bool, offset: int) -> None:
        self.chat = chat
        self.offset = offset
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")

    def shape(self, records: "list[TokenLogprob] | None") -> dict[str, Any] | None:
        if records is None:
            return None
        if self.chat:
            return {"content": [{"token": _text(r.token), "logprob": r.logprob, "bytes": list(r.token),
                                 "top_logprobs": [{"token": _text(t), "logprob": lp, "bytes": list(t)}
                                                  for t, lp in r.top]} for r in records], "refusal": None}
        offsets = []
        for r in records:
            offsets.append(self.offset)
            self.offset += len(self.decoder.decode(r.token))
        return {"tokens": [_text(r.token) for r in records], "token_logprobs": [r.logprob for r in records],
                "top_logprobs": [{**{_text(t): lp for t, lp in r.top}, _text(r.token): r.logprob} for r in records],
                "text_offset": offsets}


class _Reply:
    """The ids and shapes of one answer's response objects (its ``n`` choices)."""

    def __init__(self, call: Call, model_id: str, drafter: str = "") -> None:
        self.call, self.model = call, model_id
        chat = call.kind == "chat"
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = ("chat.completion" if chat else "text_completion")
        offset = 0 if chat else len(call.arguments.get("raw", ""))
        self.logprobs = [_Logprobs(chat, offset) for _ in range(call.n)]
        # (the provenance extension) each choice's tokens, matched to its chunks' text
        self.provenance = [provenance.Provenance(drafter) for _ in range(call.n)] if call.provenance else None

    def shown(self, records: "list[TokenLogprob] | None") -> "list[TokenLogprob] | None":
        """The log-probabilities that OpenAI's fields show: none when only the provenance asked for them."""
        return None if self.call.hidden_logprobs else records

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def whole(self, results: "list[GenerationResult]", jobs: list[Job]) -> dict[str, Any]:
        choices = []
        for i, result in enumerate(results):
            logprobs = self.logprobs[i].shape(self.shown(result.logprobs))
            if self.call.kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": result.text},
                                "logprobs": logprobs, "finish_reason": result.finish_reason})
            else:
                choices.append({"index": i, "text": result.text, "logprobs": logprobs,
                                "finish_reason": result.finish_reason})
        each = [_extension_out(r, self.call, j) for r, j in zip(results, jobs)]
        if self.call.provenance:
            each = [{**e, **provenance.final(r)} for e, r in zip(each, results)]
        ext = {**each[0], "seeds": [j.seed for j in jobs]}
        if len(each) > 1:
            ext["choices"] = each
        return {**self._envelope(self.object, choices), "usage": _usage(results), "edge_ensemble": ext}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, role: bool = False, index: int = 0,
              logprobs: "list[TokenLogprob] | None" = None) -> dict[str, Any]:
        shaped = self.logprobs[index].shape(logprobs) if logprobs else None
        if self.call.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "logprobs": shaped, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        return self._envelope("text_completion", [{"index": index, "text": text or "", "logprobs": shaped,
                                                   "finish_reason": finish_reason}])

    def usage_chunk(self, results: "list[GenerationResult]") -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.call.kind == "chat" else "text_completion"
        return {**self._envelope(obj, []), "usage": _usage(results)}


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode() + b"\n\n"


# -- reading an answer's items -----------------------------------------------------------------------------


class _ClientGone(Exception):
    """The client disconnected while its answer was made."""


class _Items:
    """The items of a request's jobs (its choices) as they come, each with its choice's index; with ``request``,
    a client that disconnects meanwhile cancels the answers."""

    def __init__(self, jobs: list[Job], request: "Request | None") -> None:
        self.jobs, self.request = jobs, request
        self.getters: dict[int, asyncio.Future[tuple[str, Any]]] = {}
        self.ended: set[int] = set()

    async def next(self) -> tuple[int, tuple[str, Any]]:
        """The next item of any choice (the lowest index first when several are ready)."""
        for i, job in enumerate(self.jobs):
            if i not in self.getters and i not in self.ended:
                self.getters[i] = asyncio.ensure_future(job.out.get())
        while True:
            done, _ = await asyncio.wait(set(self.getters.values()), timeout=0.25,
                                         return_when=asyncio.FIRST_COMPLETED)
            if done:
                i = min(i for i, g in self.getters.items() if g.done())
                item = self.getters.pop(i).result()
                if item[0] == "end":
                    self.ended.add(i)
                return i, item
            if self.request is not None and await self.request.is_disconnected():
                raise _ClientGone()

    @property
    def over(self) -> bool:
        return len(self.ended) == len(self.jobs)

    def cancel(self) -> None:
        """Stop every answer and stop waiting for them."""
        for job in self.jobs:
            job.cancelled.set()
        for getter in self.getters.values():
            getter.cancel()
        self.getters.clear()


async def _first_item(items: _Items) -> tuple[int, tuple[str, Any]]:
    """The first event of any choice (it comes once the prompt is read), or the error that ended one before it."""
    i, item = await items.next()
    return i, (("error", _INTERNAL) if item[0] == "end" else item)


async def _collect(items: _Items, first: tuple[int, tuple[str, Any]]) -> "list[GenerationResult]":
    """Every choice's whole answer, from the ``first`` item on; an error of any is raised as its
    :class:`ApiError` (the others are stopped)."""
    results: dict[int, GenerationResult] = {}
    i, item = first
    while True:
        if item[0] == "error":
            items.cancel()
            raise item[1]
        if item[0] == "event" and item[1].result is not None:
            results[i] = item[1].result
        if item[0] == "end" and i not in results:
            items.cancel()
            raise _INTERNAL
        if items.over:
            break
        i, item = await items.next()
    return [results[k] for k in range(len(items.jobs))]


async def _event_stream(items: _Items, reply: _Reply, first: tuple[int, tuple[str, Any]]) -> AsyncIterator[bytes]:
    """The answer as server-sent events, from the ``first`` item on, each chunk with its choice's index, ending
    with ``data: [DONE]`` (an error of any choice: its error object, the others stopped)."""
    chat = reply.call.kind == "chat"
    results: dict[int, GenerationResult] = {}
    try:
        if chat:
            for k in range(len(items.jobs)):
                yield _sse(reply.chunk(None, role=True, index=k))
        i, item = first
        while True:
            kind, value = item
            if kind == "error":
                items.cancel()
                yield _sse(value.body())
                break
            if kind == "event" and value.result is not None:
                result = results[i] = value.result
                ext = _extension_out(result, reply.call, items.jobs[i])
                if reply.provenance is not None:
                    ext.update(provenance.final(result), tokens=reply.provenance[i].tokens(value))
                yield _sse({**reply.chunk(None if chat else "", result.finish_reason, index=i,
                                          logprobs=reply.shown(value.logprobs)), "edge_ensemble": ext})
            elif kind == "event" and reply.provenance is not None:
                if value.text or reply.shown(value.logprobs):
                    yield _sse({**reply.chunk(value.text, index=i, logprobs=reply.shown(value.logprobs)),
                                "edge_ensemble": {"tokens": reply.provenance[i].tokens(value)}})
            elif kind == "event" and (value.text or value.logprobs):
                yield _sse(reply.chunk(value.text, index=i, logprobs=value.logprobs))
            if items.over:
                if reply.call.include_usage and len(results) == len(items.jobs):
                    yield _sse(reply.usage_chunk([results[k] for k in range(len(items.jobs))]))
                break
            i, item = await items.next()
        yield _sse("[DONE]")
    finally:  # a disconnect cancels this generator: stop the answers and free their lanes
        items.cancel()
