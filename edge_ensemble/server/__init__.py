"""An OpenAI-compatible HTTP server over one loaded ensemble (``edge-ensemble serve``).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (raw text, no chat template), both plain
JSON or server-sent events ending with ``data: [DONE]``; ``GET /v1/models``, ``GET /v1/models/{id}`` and
``GET /health``. Ensemble settings per request and statistics per answer travel in one extension object,
``edge_ensemble`` (see :data:`EXTENSION_FIELDS` and the README).

Up to the ensemble's ``parallel`` answers are made at once, each on its own sequences (lanes) of the members'
contexts; the others wait in arrival order. With ``batch`` (the default) each running answer has a thread of its
own and their decodes are batched: whatever they ask for at the same moment is one llama_decode per model
(:mod:`edge_ensemble.rounds`; llama.cpp contexts are never used by two threads at once). Without it one worker
thread advances them round-robin, one event (one policy step, its own llama_decode calls) each. Up to ``max_queue`` requests wait their turn; one more is refused with 429 and ``Retry-After``. A
client that goes away (a closed stream, or a dropped connection while a non-streaming answer is made) has its
answer stopped after the current policy step, which frees its lanes for the next request.

Every error a client sees is an OpenAI-style object ``{"error": {"message", "type", "param", "code"}}``
with its status code; an unexpected exception is logged here with its traceback and answered with a
generic 500, never the traceback.

Needs the ``server`` extra (starlette, uvicorn): ``pip install 'edge-ensemble[server]'``.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import hmac
import json
import logging
import math
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator

from ..errors import ContextOverflowError, EdgeEnsembleError, UsageError, warn
from ..options import GENERATION, Option, with_options
from ..policies import POLICY_OPTIONS

if TYPE_CHECKING:  # starlette is imported in create_app: the module itself loads without the extra
    from starlette.requests import Request
    from starlette.responses import Response

    from ..api import Ensemble
    from ..engine import Event, GenerationResult
    from ..rounds import DecodeRounds

log = logging.getLogger("edge_ensemble.server")

SERVER_ONLY = frozenset({"head", "overlap"})  # policy options a request may not set
# Keys of the request's "edge_ensemble" object: the policy and any policy option (as Ensemble.stream takes them
# per answer); top_k is sampling top-k (OpenAI has no such field); time_limit may shorten the server's own limit.
# A route head is the server's own (--head): a request must not make the server open a file it names.
EXTENSION_FIELDS = ("policy", *(o for o in POLICY_OPTIONS if o not in SERVER_ONLY), "top_k", "time_limit")
# OpenAI fields accepted and ignored (they do not change the answer), and those refused with a 400.
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"})
_UNSUPPORTED = {  # field -> what it asks for
    "tools": "tool calls are", "tool_choice": "tool calls are", "functions": "function calls are",
    "function_call": "function calls are", "logprobs": "logprobs are", "top_logprobs": "logprobs are",
    "audio": "audio output is", "prediction": "predicted outputs are", "suffix": "insertion (suffix) is",
    "echo": "echoing the prompt is", "best_of": "best_of is", "logit_bias": "logit_bias is",
    "response_format": "response formats other than text are", "frequency_penalty": "frequency_penalty is",
    "presence_penalty": "presence_penalty is", "n": "several choices (n > 1) are",
    "modalities": "modalities other than text are", "reasoning_effort": "reasoning_effort is",
    "web_search_options": "web search is",
}
# Values of those fields that ask for nothing, and are therefore accepted (besides null, false, [], {} and "").
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,), "logprobs": (0,), "top_logprobs": (0,), "best_of": (1,), "frequency_penalty": (0,),
    "presence_penalty": (0,), "tool_choice": ("none",), "response_format": ({"type": "text"},),
    "modalities": (["text"],),
}
_COMMON = frozenset({"model", "stream", "max_tokens", "temperature", "top_p", "stop", "seed", "edge_ensemble"})
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"}
_COMPLETION_FIELDS = _COMMON | {"prompt"}
MAX_STOPS = 16


# The server's own limits, declared once: the serve command's flags and the checks derive from these.
MAX_QUEUE = Option("max_queue", int, 8, "Requests that may wait beyond the --parallel answers being made; one more gets 429 with "
                   "Retry-After.", range=(0, 100_000))
TIME_LIMIT = Option("time_limit", float, 300.0, "Seconds per answer (prompt included); then it ends with "
                    "finish_reason 'length'.", range=(0.0, 1e6), above=True)
MAX_BODY_BYTES = Option("max_body_bytes", int, 1 << 20, "Largest request body.", range=(1024, 1 << 30))
MAX_PROMPT_CHARS = Option("max_prompt_chars", int, 100_000, "Longest prompt (all messages together), in characters.",
                          range=(1, 1 << 30))
BATCH = Option("batch", bool, True, "Decode the --parallel answers together: one llama_decode per model for all "
               "of them each round (off: one after another, a policy step each).")
# The serve command's own settings (its flags derive from these).
SERVER_LIMITS = (MAX_QUEUE, TIME_LIMIT, MAX_BODY_BYTES, MAX_PROMPT_CHARS, BATCH)


@with_options(*SERVER_LIMITS, *(GENERATION[n] for n in ("max_tokens", "temperature", "top_p", "top_k", "seed")))
class ServerOptions:
    """How the server answers: its limits (:data:`SERVER_LIMITS`), the defaults of generation fields a request
    leaves out, its model id, key and system prompt."""

    model_id: str = "edge-ensemble"
    api_key: str | None = None
    system: str | None = None  # system prompt for chat requests that bring none

    def validate(self) -> "ServerOptions":
        """Raise :class:`UsageError` naming the option, the allowed range and the value given."""
        for o in (*SERVER_LIMITS, *(GENERATION[n] for n in ("max_tokens", "temperature", "top_p", "top_k", "seed"))):
            o.check(getattr(self, o.name))
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("the API key is empty; give a non-blank --api-key, or none")
        if not self.model_id:
            raise UsageError("the served model name is empty")
        return self


class ApiError(Exception):
    """An error answered to the client as an OpenAI error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _library_error(exc: EdgeEnsembleError) -> ApiError:
    """A library error as an API error: bad input is a 400, anything else the server's fault (500)."""
    message = " ".join(str(exc).split())
    if isinstance(exc, ContextOverflowError):
        return ApiError(400, message, code="context_length_exceeded")
    if isinstance(exc, UsageError):  # its message starts with the option's name ("top_p must be ...")
        name = message.split(" ", 1)[0]
        return ApiError(400, message, param=_PARAMS.get(name), code="invalid_value")
    return ApiError(500, message, type="server_error")


# Library option names -> the request field they come from.
_PARAMS = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
           **{name: f"edge_ensemble.{name}" for name in EXTENSION_FIELDS}}
LOADED_FOR = ("eager", "route")  # policies whose contexts are set up at load: a request cannot switch to them
_INTERNAL = ApiError(500, "internal server error (logged on the server)", type="server_error")


# -- request parsing ----------------------------------------------------------------------------------------


@dataclass
class Call:
    """One validated request: the keyword arguments of :meth:`Ensemble.stream` and how to answer."""

    kind: str  # "chat" | "completion"
    stream: bool
    include_usage: bool
    arguments: dict[str, Any]
    time_limit: float
    max_tokens: int


def _get(body: dict[str, Any], name: str, types: tuple[type, ...], what: str, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ApiError(400, f"{name} must be {what}; got {json.dumps(value)[:80]}", param=name, code="invalid_type")
    return value


def _asks_for_nothing(name: str, value: Any) -> bool:
    if value is None or value is False or (not isinstance(value, (int, float)) and value in ([], {}, "")):
        return True
    return not isinstance(value, bool) and value in _NEUTRAL.get(name, ())


def _check_fields(body: dict[str, Any], allowed: frozenset[str]) -> None:
    for name, value in body.items():
        if name in allowed or name in _IGNORED:
            continue
        if name in _UNSUPPORTED:
            if _asks_for_nothing(name, value):
                continue
            raise ApiError(400, f"{name}: {_UNSUPPORTED[name]} not supported by edge-ensemble", param=name,
                           code="unsupported_parameter")
        raise ApiError(400, f"unrecognized request argument: {name}", param=name, code="unknown_parameter")


def _content(message: dict[str, Any], i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text ones
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"messages[{i}].content: only text parts are supported; got {kind!r}",
                               param=f"messages[{i}].content", code="unsupported_parameter")
            texts.append(part["text"])
        return "".join(texts)
    if content is None and message.get("role") == "assistant":
        raise ApiError(400, f"messages[{i}]: assistant messages without content (tool calls) are not supported",
                       param=f"messages[{i}].content", code="unsupported_parameter")
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                   param=f"messages[{i}].content", code="invalid_type")


def _messages(body: dict[str, Any], options: ServerOptions) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages",
                       code="invalid_type" if body.get("messages") is not None else "missing_required_parameter")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with role and content", param=f"messages[{i}]",
                           code="invalid_type")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, developer, user or assistant; got {role!r}"
                           " (tool messages are not supported)", param=f"messages[{i}].role",
                           code="unsupported_parameter" if role in ("tool", "function") else "invalid_value")
        if m.get("tool_calls") or m.get("function_call"):
            raise ApiError(400, f"messages[{i}]: tool calls are not supported", param=f"messages[{i}].tool_calls",
                           code="unsupported_parameter")
        out.append({"role": role, "content": _content(m, i)})
    if options.system and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": options.system})
    if sum(len(m["content"]) for m in out) > options.max_prompt_chars:
        raise ApiError(400, f"the messages are longer than this server's limit of {options.max_prompt_chars} characters",
                       param="messages", code="context_length_exceeded")
    return out


def _prompt(body: dict[str, Any], options: ServerOptions) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        raise ApiError(400, "token-id prompts are not supported: the members have different tokenizers; send text",
                       param="prompt", code="unsupported_parameter")
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(400, "several prompts in one request are not supported; send one string", param="prompt",
                       code="unsupported_parameter")
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string", param="prompt",
                       code="invalid_type" if body.get("prompt") is not None else "missing_required_parameter")
    if not prompt:
        raise ApiError(400, "prompt is empty; give the text to continue", param="prompt", code="invalid_value")
    if len(prompt) > options.max_prompt_chars:
        raise ApiError(400, f"the prompt is longer than this server's limit of {options.max_prompt_chars} characters",
                       param="prompt", code="context_length_exceeded")
    return prompt


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of strings", param="stop", code="invalid_type")
    if len(stop) > MAX_STOPS:
        raise ApiError(400, f"stop takes at most {MAX_STOPS} strings; got {len(stop)}", param="stop", code="invalid_value")
    return stop


def _extension(body: dict[str, Any]) -> dict[str, Any]:
    ext = body.get("edge_ensemble")
    if ext is None:
        return {}
    if not isinstance(ext, dict):
        raise ApiError(400, "edge_ensemble must be an object", param="edge_ensemble", code="invalid_type")
    own = sorted(set(ext) & SERVER_ONLY)
    if own:
        raise ApiError(400, f"edge_ensemble.{own[0]} is set by the server (serve --{own[0]}), not per request",
                       param=f"edge_ensemble.{own[0]}", code="unknown_parameter")
    unknown = sorted(set(ext) - set(EXTENSION_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown edge_ensemble field(s) {', '.join(unknown)}; known: {', '.join(EXTENSION_FIELDS)}",
                       param="edge_ensemble", code="unknown_parameter")
    return ext


def parse_request(kind: str, body: Any, options: ServerOptions) -> Call:
    """Check a request body once; raise :class:`ApiError` naming the field. ``kind``: "chat" or "completion"."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    _check_fields(body, _CHAT_FIELDS if kind == "chat" else _COMPLETION_FIELDS)
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model must be a string (see GET /v1/models)", param="model",
                       code="invalid_type" if body.get("model") is not None else "missing_required_parameter")
    if model != options.model_id:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {options.model_id!r}",
                       param="model", code="model_not_found")
    stream = _get(body, "stream", (bool,), "true or false", False)
    stream_options = _get(body, "stream_options", (dict,), "an object", {})
    include_usage = stream_options.get("include_usage") or False
    if not isinstance(include_usage, bool):
        raise ApiError(400, "stream_options.include_usage must be true or false", param="stream_options.include_usage",
                       code="invalid_type")
    max_tokens = _get(body, "max_tokens", (int,), "a whole number", None)
    if kind == "chat":
        max_tokens = _get(body, "max_completion_tokens", (int,), "a whole number", max_tokens)
    max_tokens = options.max_tokens if max_tokens is None else max_tokens
    ext = _extension(body)
    time_limit = _get(ext, "time_limit", (int, float), "a number of seconds", options.time_limit)
    if not 0 < time_limit:
        raise ApiError(400, f"edge_ensemble.time_limit must be > 0 seconds; got {time_limit}",
                       param="edge_ensemble.time_limit", code="invalid_value")
    time_limit = min(float(time_limit), options.time_limit)  # a request may shorten the server's limit only
    arguments: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": _get(body, "temperature", (int, float), "a number", options.temperature),
        "top_p": _get(body, "top_p", (int, float), "a number", options.top_p),
        "top_k": _get(ext, "top_k", (int,), "a whole number", options.top_k),
        "seed": _get(body, "seed", (int,), "a whole number", options.seed),
        "stop": _stop(body),
        "time_limit": time_limit,
    }
    if "policy" in ext:
        arguments["policy"] = _get(ext, "policy", (str,), "a policy name", None)
    for key, option in POLICY_OPTIONS.items():
        if key in ext:  # "off" switches an option off, as in the config file; Ensemble.stream checks the value
            off = option.off and isinstance(ext[key], str) and ext[key].strip().lower() == "off"
            arguments[key] = None if off else (tuple(ext[key]) if isinstance(ext[key], list) else ext[key])
    if kind == "chat":
        arguments["messages"] = _messages(body, options)
    else:
        arguments["raw"] = _prompt(body, options)
    return Call(kind, stream, include_usage, arguments, time_limit, max_tokens)


def _check_loaded_for(call: Call, config: Any) -> None:
    """Refuse, with advice a client can act on, a request for a policy (or more branches) that needs models
    loaded another way than this server's (the library's own message addresses a Python caller)."""
    running = config.policy
    asked = call.arguments.get("policy", running)
    if asked in LOADED_FOR and asked != running:
        raise ApiError(400, f"edge_ensemble.policy {asked!r} needs a server started with --policy {asked} (its models"
                       f" are loaded for it); this server runs {running!r}", param="edge_ensemble.policy",
                       code="invalid_value")
    branches = call.arguments.get("max_branches")
    if asked == "eager" and isinstance(branches, int) and not isinstance(branches, bool) and branches > config.max_branches:
        raise ApiError(400, f"edge_ensemble.max_branches {branches} is more than this server's --max-branches "
                       f"{config.max_branches}; ask for at most that many", param="edge_ensemble.max_branches",
                       code="invalid_value")


# -- the worker: up to `parallel` answers, interleaved, in arrival order -------------------------------------


class QueueFull(Exception):
    """The worker's queue has no room; ``retry_after`` is a guess in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    """One answer: its (not yet started) event stream, and the channel its events go back through."""

    events: Iterator["Event"]
    loop: asyncio.AbstractEventLoop
    out: "asyncio.Queue[tuple[str, Any]]" = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None

    def post(self, kind: str, value: Any = None) -> None:
        """Hand an item to the request's event loop (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            self.cancelled.set()


class Worker:
    """Makes the answers: up to ``parallel`` at once, in the order they were submitted.

    Without ``rounds`` one thread advances them round-robin, one event (one policy step) each (the ensemble's own
    rule: one thread, up to ``parallel`` open streams). With ``rounds`` (from :meth:`Ensemble.decode_together`)
    ``parallel`` long-lived threads each take the next request and make it while taking part in the rounds, so
    that the running answers' decodes are batched."""

    def __init__(self, max_queue: int, parallel: int = 1, rounds: "DecodeRounds | None" = None) -> None:
        self.max_queue = max_queue
        self.parallel = parallel
        self.rounds = rounds
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._active: list[Job] = []
        self._stopping = False
        self._seconds = 5.0  # a running mean of answer times, for Retry-After
        self.served = 0
        self.cancelled = 0
        if rounds is None:
            self._threads = [threading.Thread(target=self._loop, name="edge-ensemble-worker", daemon=True)]
        else:
            self._threads = [threading.Thread(target=self._drive, name=f"edge-ensemble-answer-{i}", daemon=True)
                             for i in range(parallel)]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; raise :class:`QueueFull` when every lane is busy and ``max_queue`` requests already
        wait."""
        with self._cond:
            if self._stopping:
                raise QueueFull(5)
            busy = len(self._active) >= self.parallel or bool(self._waiting)
            if busy and len(self._waiting) >= self.max_queue:
                ahead = (len(self._waiting) + 1) / self.parallel
                raise QueueFull(max(1, min(3600, math.ceil(self._seconds * ahead))))
            self._waiting.append(job)
            self._cond.notify()

    def status(self) -> dict[str, Any]:
        """Figures for ``/health``."""
        with self._cond:
            out = {"running": len(self._active), "queued": len(self._waiting), "parallel": self.parallel,
                   "max_queue": self.max_queue, "served": self.served, "cancelled": self.cancelled}
        if self.rounds is not None:  # answers_served / llama_decodes: answers per batched decode, on average
            out["batched"] = {"rounds": self.rounds.rounds, "llama_decodes": self.rounds.batches,
                              "answers_served": self.rounds.served}
        return out

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every queued and running answer and end the threads."""
        with self._cond:
            self._stopping = True
            for job in [*self._waiting, *self._active]:
                job.cancelled.set()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _refuse_waiting(self) -> None:
        """With the lock held, at shutdown: answer every queued request 503."""
        for job in self._waiting:
            job.events.close()
            job.post("error", ApiError(503, "the server is shutting down", type="server_error"))
        self._waiting.clear()

    def _loop(self) -> None:
        """The one thread of the interleaved mode."""
        while True:
            with self._cond:
                while not self._waiting and not self._active and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    self._refuse_waiting()
                    stopping, self._active = self._active, []
                    break
                while self._waiting and len(self._active) < self.parallel:
                    job = self._waiting.popleft()
                    job.started = time.monotonic()
                    self._active.append(job)
                jobs = list(self._active)
            for job in jobs:  # one round: one event of each active answer (a finished one leaves _active)
                self._step(job)
        for job in stopping:  # their generators are closed here, in the thread that runs them
            self._finish(job, finished=False)

    def _drive(self) -> None:
        """One of the threads of the batched mode: the next request, made from start to end in the rounds."""
        assert self.rounds is not None
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    self._refuse_waiting()
                    return
                job = self._waiting.popleft()
                job.started = time.monotonic()
                self._active.append(job)
            with self.rounds.taking_part():  # only while it makes an answer: the rounds never wait for an idle one
                while self._step(job):  # (a finished answer leaves _active)
                    pass

    def _step(self, job: Job) -> bool:
        """Advance ``job`` by one event; False once it is over (finished, failed or cancelled)."""
        if job.cancelled.is_set():  # the client left (while waiting, or since its last event)
            self._finish(job, finished=False)
            return False
        try:
            event = next(job.events)  # the ensemble's work happens here, in this thread
        except StopIteration:
            self._finish(job, finished=True)
            return False
        except EdgeEnsembleError as exc:
            job.post("error", _library_error(exc))
            self._finish(job, finished=True)
            return False
        except Exception:  # noqa: BLE001 - the server must go on; the traceback stays in the log
            log.exception("generation failed")
            job.post("error", _INTERNAL)
            self._finish(job, finished=True)
            return False
        job.post("event", event)
        if event.result is not None:
            self._finish(job, finished=True)
            return False
        return True

    def _finish(self, job: Job, *, finished: bool) -> None:
        """Close ``job``'s stream (which gives its lanes back) and count it."""
        try:
            job.events.close()
        except Exception:  # noqa: BLE001
            log.exception("closing a generation failed")
        seconds = time.monotonic() - (job.started or job.submitted)
        with self._cond:
            if finished:
                self._seconds = 0.8 * self._seconds + 0.2 * seconds
                self.served += 1
            else:
                self.cancelled += 1
            if job in self._active:  # its lane is free before its client hears the end (and may ask again)
                self._active.remove(job)
            self._cond.notify_all()
        job.post("end")


# -- responses ---------------------------------------------------------------------------------------------


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


# -- the application ---------------------------------------------------------------------------------------


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


def create_app(ensemble: "Ensemble", options: ServerOptions | None = None, *,
               close_ensemble: bool = False) -> Any:
    """A Starlette application serving ``ensemble``; the worker thread starts and stops with the app's lifespan
    (``close_ensemble`` also closes the ensemble at shutdown)."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    opts = (options or ServerOptions()).validate()
    state: dict[str, Worker] = {}
    started = int(time.time())

    def error_response(err: ApiError) -> "Response":
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    class EventStream(StreamingResponse):
        """Server-sent events of ``job``: a disconnect cancels the body iterator whatever ASGI version the
        server speaks (Starlette listens for it only below ASGI spec 2.4), and however the response ends,
        the answer is stopped."""

        def __init__(self, job: Job, content: AsyncIterator[bytes]) -> None:
            super().__init__(content, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.job = job

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": "2.3"}}
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.job.cancelled.set()

    def guarded(handler: Callable[["Request"], Any]) -> Callable[["Request"], Any]:
        """Run ``handler``: authentication first; an :class:`ApiError` becomes its error object, anything
        unexpected a logged 500."""

        async def endpoint(request: "Request") -> "Response":
            try:
                if opts.api_key is not None and request.url.path != "/health":
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
        _check_loaded_for(call, ensemble.config)
        try:
            events = ensemble.stream(**call.arguments)  # validates the values; the work starts in the worker
        except EdgeEnsembleError as exc:
            raise _library_error(exc) from None
        job = Job(events, asyncio.get_running_loop())
        try:
            state["worker"].submit(job)
        except QueueFull as full:
            events.close()
            raise ApiError(429, f"the server is busy: its queue of {state['worker'].max_queue} waiting request(s)"
                           f" is full; retry in {full.retry_after} s", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(full.retry_after)}) from None
        reply = _Reply(call, opts.model_id)
        try:
            first = await _first_item(job, request)
        except _ClientGone:
            job.cancelled.set()
            return error_response(ApiError(400, "the client disconnected"))
        if first[0] == "error":
            raise first[1]
        if call.stream:
            return EventStream(job, _event_stream(job, reply, first))
        try:
            result = await _collect(job, request, first)
        except _ClientGone:
            job.cancelled.set()
            return error_response(ApiError(400, "the client disconnected"))
        return JSONResponse(reply.whole(result, job))

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
        with ensemble.decode_together() if together else contextlib.nullcontext() as rounds:
            state["worker"] = Worker(opts.max_queue, ensemble.config.parallel, rounds)
            try:
                yield
            finally:
                state["worker"].stop()
        if close_ensemble:
            ensemble.close()

    routes = [
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/models/{model:path}", guarded(model), methods=["GET"]),
        Route("/health", guarded(health), methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _authenticate(request: "Request", key: str) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    # compare_digest: the time taken does not tell how much of a guessed key was right
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


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


def serve(ensemble: "Ensemble | Callable[[], Ensemble]", options: ServerOptions, *, host: str = "127.0.0.1",
          port: int = 8080, log_level: str = "info") -> None:
    """Serve ``ensemble`` over HTTP until interrupted (Ctrl-C); the ensemble is closed at the end.

    ``ensemble`` may be a function that loads one: it is called once the options are checked and the port
    is bound, so that a wrong option or a busy port fails before any model loads."""
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
    app = create_app(loaded, options, close_ensemble=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)  # sets up uvicorn's logging
    shown = f"[{host}]" if ":" in host else host
    logging.getLogger("uvicorn.error").info(
        "serving %r on http://%s:%d/v1 (Ctrl-C quits)", options.model_id, shown, sock.getsockname()[1])
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    # The server stops only on a signal (Ctrl-C, SIGTERM). uvicorn re-raises it after a clean shutdown, but
    # not always under load; report it the same way every time, as the interruption it was.
    raise KeyboardInterrupt
