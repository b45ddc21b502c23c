"""Requests: what a request body may hold, its validation into a :class:`Call`, and the OpenAI-style error
answers (:class:`ApiError`, mostly 4xx) that name the field at fault.

Everything here is plain Python: no Starlette, no threads.
"""

from __future__ import annotations

import json
import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import ContextOverflowError, EdgeEnsembleError, UsageError
from ..policies import registry
from .settings import ServerOptions


def server_only() -> frozenset[str]:
    """Policy options a request may not set: those fixed when the models load (a route head is the server's own,
    --head: a request must not make the server open a file it names)."""
    return frozenset(name for name, o in registry.policy_options().items() if not o.per_call)


def extension_fields() -> tuple[str, ...]:
    """Keys of the request's "edge_ensemble" object: the policy and any policy option a call may set (as
    Ensemble.stream takes them per answer); top_k is sampling top-k (OpenAI has no such field); time_limit may
    shorten the server's own limit. Read from the registry: a plugin's policy options are fields too."""
    own = server_only()
    return ("policy", *(o for o in registry.policy_options() if o not in own), "top_k", "time_limit", PROVENANCE)


# The field that asks, per request, who wrote each token (the web page's view; docs/web.md has its wire format).
PROVENANCE = "provenance"
# Alternatives per token the provenance shows, asked of a policy with the logprobs capability when the request
# asked none itself (they then stay out of OpenAI's logprobs fields).
PROVENANCE_TOP = 5


def __getattr__(name: str) -> Any:
    # the tables by their old constant names (computed now: plugins may have registered policies since import)
    if name == "SERVER_ONLY":
        return server_only()
    if name == "EXTENSION_FIELDS":
        return extension_fields()
    raise AttributeError(name)

# OpenAI fields accepted and ignored (they do not change the answer), and those refused with a 400.
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "stream_options"})
_UNSUPPORTED = {  # field -> what it asks for
    "tools": "tool calls are", "tool_choice": "tool calls are", "functions": "function calls are",
    "function_call": "function calls are", "audio": "audio output is", "prediction": "predicted outputs are", "suffix": "insertion (suffix) is",
    "echo": "echoing the prompt is", "best_of": "best_of is", "logit_bias": "logit_bias is",
    "response_format": "response formats other than text are", "frequency_penalty": "frequency_penalty is",
    "presence_penalty": "presence_penalty is",
    "modalities": "modalities other than text are", "reasoning_effort": "reasoning_effort is",
    "web_search_options": "web search is",
}
# Values of those fields that ask for nothing, and are therefore accepted (besides null, false, [], {} and "").
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (1,), "frequency_penalty": (0,),
    "presence_penalty": (0,), "tool_choice": ("none",), "response_format": ({"type": "text"},),
    "modalities": (["text"],),
}
_COMMON = frozenset({"model", "stream", "max_tokens", "temperature", "top_p", "stop", "seed", "edge_ensemble", "n",
                     "logprobs"})
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
_COMPLETION_FIELDS = _COMMON | {"prompt"}
MAX_LOGPROBS = 20  # top_logprobs (chat) and logprobs (completions) at most, as OpenAI's chat API
MAX_STOPS = 16


# -- error answers -----------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered to the client as an OpenAI error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body answered: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _library_error(exc: EdgeEnsembleError) -> ApiError:
    """A library error as an API error: bad input is a 400, anything else the server's fault (500)."""
    message = " ".join(str(exc).split())
    if isinstance(exc, ContextOverflowError):
        return ApiError(400, message, code="context_length_exceeded")
    if isinstance(exc, UsageError):  # its message starts with the option's name ("top_p must be ...")
        name = message.split(" ", 1)[0].rstrip(":")
        return ApiError(400, message, param=_param(name), code="invalid_value")
    return ApiError(500, message, type="server_error")


# Library option names -> the request field they come from.
_PARAMS = {"max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
           "logprobs": "logprobs"}


def _param(name: str) -> str | None:
    """The request field a library option name comes from."""
    return _PARAMS.get(name) or (f"edge_ensemble.{name}" if name in extension_fields() else None)
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
    n: int = 1  # choices: n answers to the same prompt, each its own seed (seed, seed + 1, ...)
    provenance: bool = False  # each chunk says who wrote its tokens (edge_ensemble.provenance)
    hidden_logprobs: bool = False  # log-probabilities asked for the provenance only, not shown in OpenAI's fields


def _get(body: dict[str, Any], name: str, types: tuple[type, ...], what: str, default: Any = None, *,
         param: str | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        param = param or name
        raise ApiError(400, f"{param} must be {what}; got {json.dumps(value)[:80]}", param=param, code="invalid_type")
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
    own = sorted(set(ext) & server_only())
    if own:
        raise ApiError(400, f"edge_ensemble.{own[0]} is set by the server (serve --{own[0]}), not per request",
                       param=f"edge_ensemble.{own[0]}", code="unknown_parameter")
    known = extension_fields()
    unknown = sorted(set(ext) - set(known))
    if unknown:
        raise ApiError(400, f"unknown edge_ensemble field(s) {', '.join(unknown)}; known: {', '.join(known)}",
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
    n = _get(body, "n", (int,), "a whole number", 1)
    if not 1 <= n <= options.max_n:
        raise ApiError(400, f"n must be between 1 and {options.max_n} (this server's --max-n); got {n}", param="n",
                       code="invalid_value")
    logprobs = _logprobs(body, kind)
    if logprobs is not None:
        arguments["logprobs"] = logprobs
    provenance = _get(ext, PROVENANCE, (bool,), "true or false", False, param=f"edge_ensemble.{PROVENANCE}")
    if "policy" in ext:
        arguments["policy"] = _get(ext, "policy", (str,), "a policy name", None)
    for key, option in registry.policy_options().items():
        if key in ext:  # "off" switches an option off, as in the config file; Ensemble.stream checks the value
            off = option.off and isinstance(ext[key], str) and ext[key].strip().lower() == "off"
            arguments[key] = None if off else (tuple(ext[key]) if isinstance(ext[key], list) else ext[key])
    if kind == "chat":
        arguments["messages"] = _messages(body, options)
    else:
        arguments["raw"] = _prompt(body, options)
    return Call(kind, stream, include_usage, arguments, time_limit, max_tokens, n, provenance)


def _logprobs(body: dict[str, Any], kind: str) -> int | None:
    """The alternatives per token asked for (None: no log-probabilities): chat's ``logprobs: true`` with
    ``top_logprobs``, or the completions API's ``logprobs`` count."""
    if kind == "chat":
        wanted = _get(body, "logprobs", (bool,), "true or false", False)
        top = _get(body, "top_logprobs", (int,), "a whole number", None)
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}; got {top}", param="top_logprobs",
                           code="invalid_value")
        if top and not wanted:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return (top or 0) if wanted else None
    count = _get(body, "logprobs", (int,), "a whole number", None)
    if count is not None and not 0 <= count <= MAX_LOGPROBS:
        raise ApiError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}; got {count}", param="logprobs",
                       code="invalid_value")
    return count


def served_policies(ensemble: Any) -> list[str]:
    """The policies a request may name on this server (its own, and those its loaded models can run too)."""
    return [name for name in registry.names() if name == ensemble.config.policy or not _unmet(ensemble, name)]


def _unmet(ensemble: Any, policy: str) -> str:
    """What ``policy`` would need that the loaded models lack (empty: nothing)."""
    try:
        return ensemble.unmet_needs(dataclasses.replace(ensemble.config, policy=policy).validate(len(ensemble.members)))
    except UsageError:  # a policy this server cannot set up per request (e.g. route without the server's head)
        return "its own load"


def ask_provenance_scores(call: Call, ensemble: Any) -> None:
    """With the provenance on, ask the candidates of every token of a policy that can score them (the logprobs
    capability), when the request did not ask log-probabilities itself: they go to the provenance only."""
    policy = call.arguments.get("policy", ensemble.config.policy)
    if call.provenance and "logprobs" not in call.arguments and policy in registry.names() and registry.get(policy).logprobs:
        call.arguments["logprobs"] = PROVENANCE_TOP
        call.hidden_logprobs = True


def _check_loaded_for(call: Call, ensemble: Any) -> None:
    """Refuse, with advice a client can act on, a request for a policy (or option values, e.g. more branches) that
    needs models loaded another way than this server's (the library's own message addresses a Python caller)."""
    config = ensemble.config
    running = config.policy
    asked = call.arguments.get("policy", running)
    n = len(ensemble.members)
    given = {k: v for k, v in call.arguments.items() if k in registry.policy_options()}
    try:
        switched = dataclasses.replace(config, policy=asked).validate(n)
        unmet = ensemble.unmet_needs(switched)
    except UsageError:  # a policy this server cannot set up per request (e.g. route without the server's head)
        unmet = "its own load" if asked != running else ""
    if unmet and asked != running:
        raise ApiError(400, f"edge_ensemble.policy {asked!r} needs a server started with --policy {asked} (its models"
                       f" are loaded for it); this server runs {running!r}", param="edge_ensemble.policy",
                       code="invalid_value")
    for key, value in given.items():  # the first option whose value asks for more than the models were loaded with
        try:
            unmet = ensemble.unmet_needs(dataclasses.replace(switched, **{key: value}).validate(n))
        except UsageError:
            continue  # a bad value: Ensemble.stream refuses it, naming it
        if unmet:
            option = registry.policy_options()[key]
            raise ApiError(400, f"edge_ensemble.{key} {value!r} asks for more than this server was started with "
                           f"({option.flag} {getattr(config, key)!r}: {unmet}); ask for at most that",
                           param=f"edge_ensemble.{key}", code="invalid_value")
