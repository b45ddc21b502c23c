"""The server's own settings: its limits (:data:`SERVER_LIMITS`, from which the ``serve`` command's flags
derive) and :class:`ServerOptions`, how one server answers (limits, generation defaults, model id, key, system
prompt)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from ..options import GENERATION, Option, declarations, option


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
MAX_N = Option("max_n", int, 4, "Most choices (n) one request may ask for; each is an answer of its own on one of the "
               "--parallel lanes, beyond them waiting in the queue (all of a request's choices fit, or it gets 429).",
               range=(1, 128))
# The serve command's own settings (its flags derive from these).
SERVER_LIMITS = (MAX_QUEUE, TIME_LIMIT, MAX_BODY_BYTES, MAX_PROMPT_CHARS, BATCH, MAX_N)


@dataclass(frozen=True)
class ServerOptions:
    """How the server answers: its limits (:data:`SERVER_LIMITS`), the defaults of generation fields a request
    leaves out, its model id, key and system prompt."""

    max_queue: int = option(MAX_QUEUE)
    time_limit: float = option(TIME_LIMIT)
    max_body_bytes: int = option(MAX_BODY_BYTES)
    max_prompt_chars: int = option(MAX_PROMPT_CHARS)
    batch: bool = option(BATCH)
    max_n: int = option(MAX_N)
    max_tokens: int = option(GENERATION["max_tokens"])
    temperature: float = option(GENERATION["temperature"])
    top_p: float = option(GENERATION["top_p"])
    top_k: int = option(GENERATION["top_k"])
    seed: int | None = option(GENERATION["seed"])

    model_id: str = "edge-ensemble"
    api_key: str | None = None
    system: str | None = None  # system prompt for chat requests that bring none

    def validate(self) -> "ServerOptions":
        """Raise :class:`UsageError` naming the option, the allowed range and the value given."""
        for o in declarations(ServerOptions, every_field=False):
            o.check(getattr(self, o.name))
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("the API key is empty; give a non-blank --api-key, or none")
        if not self.model_id:
            raise UsageError("the served model name is empty")
        return self
