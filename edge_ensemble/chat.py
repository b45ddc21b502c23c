"""Render one conversation for each member in its own chat template.

Each member must see the same conversation in the format it was trained on (ChatML for SmolLM2/Qwen,
``<start_of_turn>`` for Gemma instruct, ...). Base models without a template get a plain rendering.
:func:`render_messages` renders, marking which spans are message contents; :func:`prompt_tokens` tokenizes
the result, control tokens parsed in the template's markup only.
"""

from __future__ import annotations

import re
import secrets
from typing import Callable, Protocol, Sequence

from .errors import UsageError, warn

VALID_ROLES = ("system", "user", "assistant")


def clean_text(text: str, what: str) -> str:
    """``text`` with every lone surrogate replaced by U+FFFD, and one warning naming the first byte offset.

    Lone surrogates are how Python carries bytes that are not UTF-8 (command-line arguments and
    ``surrogateescape`` input: U+DC80-U+DCFF stand for the bytes 0x80-0xFF) and what a broken string from
    another API holds; UTF-8 cannot encode them. We replace rather than refuse (see docs/cli.md): the rest of
    the text is what the user meant, and a chat should not make them retype a line for one stray byte.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    out: list[str] = []
    offsets: list[int] = []
    pos = 0  # byte offset in the input: an escaped byte is 1 byte, another lone surrogate 3 (as in CESU-8)
    for ch in text:
        code = ord(ch)
        if 0xD800 <= code <= 0xDFFF:
            offsets.append(pos)
            out.append("\ufffd")
            pos += 1 if 0xDC80 <= code <= 0xDCFF else 3
        else:
            out.append(ch)
            pos += len(ch.encode("utf-8"))
    more = f" (and {len(offsets) - 1} more)" if len(offsets) > 1 else ""
    warn(f"{what} is not valid UTF-8 at byte {offsets[0]}{more}; replaced with U+FFFD"
         " (save the text as UTF-8 to keep those characters)")
    return "".join(out)


def validate_messages(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Check a conversation's shape once, with a one-line error for the user (invalid UTF-8 in a content
    is replaced, with a warning: :func:`clean_text`)."""
    out: list[dict[str, str]] = []
    if isinstance(messages, (str, bytes)) or not messages:
        raise UsageError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UsageError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in VALID_ROLES:
            raise UsageError(f"message {i} has role {m['role']!r}; allowed roles: {', '.join(VALID_ROLES)}")
        out.append({"role": m["role"], "content": clean_text(str(m["content"]), f"message {i}")})
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


class RenderedPrompt(str):
    """A rendered conversation: the text itself, plus ``parts`` — ``(text, is_content)`` spans in order that
    tell template markup (parsed for control tokens) from message contents (always plain text)."""

    parts: tuple[tuple[str, bool], ...]

    def __new__(cls, parts: Sequence[tuple[str, bool]]) -> "RenderedPrompt":
        self = super().__new__(cls, "".join(text for text, _ in parts))
        self.parts = tuple((text, is_content) for text, is_content in parts if text)
        return self


class TemplateModel(Protocol):
    """What rendering reads from a model (a :class:`~edge_ensemble.model_file.ModelFile` is one): chat.py never
    imports the runtime, so the dependency goes one way, runtime -> chat."""

    name: str
    chat_template: str | None
    bos_id: int
    eos_id: int

    def piece(self, token: int, *, special: bool = False) -> bytes: ...


class PromptModel(TemplateModel, Protocol):
    """What :func:`prompt_tokens` reads from a model's vocabulary besides :class:`TemplateModel`."""

    add_bos: bool

    def tokenize(self, text: bytes | str, *, add_bos: bool | None = None, special: bool = False) -> list[int]: ...

    def split_at_control_tokens(self, markup: bytes) -> list[tuple[bytes, int | None]]: ...


def render_messages(model: TemplateModel, messages: Sequence[dict[str, str]], *,
                    add_generation_prompt: bool = True) -> RenderedPrompt:
    """``messages`` rendered with ``model``'s GGUF chat template (or :func:`render_plain`), contents marked."""
    messages = validate_messages(messages)
    if not model.chat_template:
        return split_rendering(lambda msgs: render_plain(msgs, add_generation_prompt=add_generation_prompt), messages)
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    bos = model.piece(model.bos_id, special=True).decode("utf-8", "replace") if model.bos_id >= 0 else ""
    eos = model.piece(model.eos_id, special=True).decode("utf-8", "replace") if model.eos_id >= 0 else ""
    formatter = Jinja2ChatFormatter(
        template=model.chat_template, eos_token=eos, bos_token=bos, add_generation_prompt=add_generation_prompt
    )
    try:
        return split_rendering(lambda msgs: formatter(messages=list(msgs)).prompt, messages)
    except Exception as exc:  # a template that rejects the conversation (e.g. no system role)
        if any(m["role"] == "system" for m in messages):
            # Templates such as Gemma's refuse a system turn: fold it into the first user message.
            return render_messages(model, _fold_system(messages), add_generation_prompt=add_generation_prompt)
        raise UsageError(f"{model.name}'s chat template rejected the conversation: {exc}") from None


def prompt_tokens(model: PromptModel, rendered: str, *, control_tokens_in_messages: bool = False) -> list[int]:
    """Tokens of a rendered prompt, BOS added once as the GGUF asks.

    The template's markup is parsed for control tokens; the message contents that a :class:`RenderedPrompt`
    marks are plain text, so a user who types "<|im_start|>" gets those characters, not the control token
    (unless ``control_tokens_in_messages``). Text on both sides of a content boundary is tokenized in one piece,
    so tokens break only where they did before. A plain ``str`` is all markup.
    """
    parts = getattr(rendered, "parts", None)
    if parts is None or control_tokens_in_messages:
        parts = ((str(rendered), False),)
    bos_text = model.piece(model.bos_id, special=True) if model.bos_id >= 0 else b""
    add_bos = model.add_bos and not (bos_text and str(rendered).encode("utf-8").startswith(bos_text))
    out = [model.bos_id] if add_bos else []
    text = b""  # plain text not yet tokenized: content and the markup text around it
    for piece, is_content in parts:
        data = piece.encode("utf-8")
        if is_content:
            text += data
            continue
        for before, token in model.split_at_control_tokens(data):
            text += before
            if token is not None:
                out += model.tokenize(text, add_bos=False, special=False) if text else []
                out.append(token)
                text = b""
    return out + (model.tokenize(text, add_bos=False, special=False) if text else [])


def split_rendering(render: Callable[[list[dict[str, str]]], str], messages: list[dict[str, str]]) -> RenderedPrompt:
    """Render ``messages`` and mark which spans of the result are their contents.

    The template is rendered twice: with the real contents, and with a unique sentinel in place of each. The
    sentinel rendering cuts the markup apart; the real one tells what the template did to each content (some
    trim it). If the two cannot be matched (a template that rewrites contents), the markup of the sentinel
    rendering is kept around the raw contents: the prompt may then differ in whitespace, never in safety.
    """
    real = render(messages)
    tag = secrets.token_hex(6)
    marks = {f"\ue000{tag}-{i}\ue001": m["content"] for i, m in enumerate(messages)}
    skeleton = render([{**m, "content": mark} for m, mark in zip(messages, marks)])
    pieces = re.split("(" + "|".join(map(re.escape, marks)) + ")", skeleton)  # markup, mark, markup, ...
    parts: list[tuple[str, bool]] = []
    pos = 0
    for i in range(0, len(pieces), 2):
        markup, following = pieces[i], pieces[i + 2] if i + 2 < len(pieces) else None
        if not real.startswith(markup, pos):
            break
        parts.append((markup, False))
        pos += len(markup)
        if following is None:
            break
        content = marks[pieces[i + 1]]
        for shown in (content, content.strip(), content.lstrip(), content.rstrip()):
            if real.startswith(shown + following, pos):
                parts.append((shown, True))
                pos += len(shown)
                break
        else:
            break
    if pos == len(real) and "".join(t for t, _ in parts) == real:
        return RenderedPrompt(parts)
    return RenderedPrompt([(marks[p], True) if i % 2 else (p, False) for i, p in enumerate(pieces)])


def _fold_system(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    for m in rest:
        if m["role"] == "user":
            m["content"] = system + "\n\n" + m["content"]
            break
    return rest
