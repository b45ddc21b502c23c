"""Render one conversation for each member in its own chat template.

Each member must see the same conversation in the format it was trained on (ChatML for SmolLM2/Qwen,
``<start_of_turn>`` for Gemma instruct, ...). Base models without a template get a plain rendering.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .errors import UsageError

if TYPE_CHECKING:
    from .runtime import Model

VALID_ROLES = ("system", "user", "assistant")


def validate_messages(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Check a conversation's shape once, with a one-line error for the user."""
    out: list[dict[str, str]] = []
    if isinstance(messages, (str, bytes)) or not messages:
        raise UsageError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UsageError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in VALID_ROLES:
            raise UsageError(f"message {i} has role {m['role']!r}; allowed roles: {', '.join(VALID_ROLES)}")
        out.append({"role": m["role"], "content": str(m["content"])})
    return out


def render_plain(messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
    """A neutral transcript for base models: the answer starts on a fresh line after 'Assistant:'."""
    parts: list[str] = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"].strip() + "\n\n")
        elif m["role"] == "user":
            parts.append("User: " + m["content"].strip() + "\n\n")
        else:
            parts.append("Assistant:\n" + m["content"].strip() + "\n\n")
    if add_generation_prompt:
        parts.append("Assistant:\n")
    return "".join(parts)


def render_messages(model: "Model", messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
    """``messages`` rendered with ``model``'s GGUF chat template (or :func:`render_plain`)."""
    messages = validate_messages(messages)
    if not model.chat_template:
        return render_plain(messages, add_generation_prompt=add_generation_prompt)
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    bos = model.piece(model.bos_id, special=True).decode("utf-8", "replace") if model.bos_id >= 0 else ""
    eos = model.piece(model.eos_id, special=True).decode("utf-8", "replace") if model.eos_id >= 0 else ""
    formatter = Jinja2ChatFormatter(
        template=model.chat_template, eos_token=eos, bos_token=bos, add_generation_prompt=add_generation_prompt
    )
    try:
        return formatter(messages=list(messages)).prompt
    except Exception as exc:  # a template that rejects the conversation (e.g. no system role)
        if any(m["role"] == "system" for m in messages):
            # Templates such as Gemma's refuse a system turn: fold it into the first user message.
            return render_messages(model, _fold_system(messages), add_generation_prompt=add_generation_prompt)
        raise UsageError(f"{model.name}'s chat template rejected the conversation: {exc}") from None


def _fold_system(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    for m in rest:
        if m["role"] == "user":
            m["content"] = system + "\n\n" + m["content"]
            break
    return rest
