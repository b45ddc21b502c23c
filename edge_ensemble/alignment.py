"""Cross-tokenizer bookkeeping: one shared text (bytes), one token list per member.

Facts this rests on (../shared/research/alignment.md): every token id maps to exact bytes; appending text
rewrites only the last few tokens of a canonical tokenization; a suffix is *usually*, not always, tokenized
like the same bytes inside the whole text. So a member re-tokenizes a short tail window from a stable point,
checks the window starts the way its old tokens did (else widens the window), and never re-tokenizes the
whole text per step.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Callable, Sequence

from .errors import IncompatibleMembersError

Tokenizer = Callable[[bytes], list[int]]


class TokenTrack:
    """A member's canonical tokenization of the generated text, maintained incrementally.

    ``tokens[i]`` covers bytes ``ends[i-1]:ends[i]`` of ``text``; ``ends`` are the member's token
    boundaries (byte offsets), which SAFE's boundary check looks up.
    """

    def __init__(self, tokenize: Tokenizer, token_bytes: Sequence[bytes], *, window: int = 4) -> None:
        self._tokenize = tokenize
        self._bytes = token_bytes
        self.follows_drafter = False
        self.window = window  # tokens re-tokenized behind the end before widening
        self.text = b""
        self.tokens: list[int] = []
        self.ends: list[int] = []

    def _retokenize_tail(self, text: bytes) -> tuple[int, list[int], list[int]]:
        """Re-tokenize ``text`` (which extends self.text) from a stable point.

        Returns (index of first replaced token, new tail tokens, their end offsets). A trailing incomplete
        UTF-8 character is left untokenized (tokenizers would replace it): it joins once it is whole."""
        text = text[: complete_utf8_len(text)]
        back = self.window
        while True:
            i = max(0, len(self.tokens) - back)
            # Never start inside a UTF-8 character (byte-level BPE tokens may split one).
            while i > 0 and self.ends[i - 1] < len(text) and text[self.ends[i - 1]] & 0xC0 == 0x80:
                i -= 1
            start = self.ends[i - 1] if i > 0 else 0
            tail = self._tokenize(text[start:])
            ends, pos = [], start
            for t in tail:
                pos += len(self._bytes[t])
                ends.append(pos)
            if pos != len(text):
                raise IncompatibleMembersError(
                    "a member's tokenizer does not reproduce the text byte for byte (a SentencePiece dummy prefix?)"
                )
            # Stable when the window's first token is unchanged (or the window reaches the start).
            if i == 0 or (tail and tail[0] == self.tokens[i]):
                return i, tail, ends
            back *= 2

    def preview(self, extra: bytes, drafter_tokens: Sequence[int] = ()) -> tuple[list[int], list[int]]:
        """Tokens and ends of ``text + extra`` without committing (for scoring a draft).
        ``drafter_tokens`` (the drafter's ids for ``extra``) are not used: this track re-tokenizes."""
        if not extra:
            return list(self.tokens), list(self.ends)
        i, tail, ends = self._retokenize_tail(self.text + extra)
        return self.tokens[:i] + tail, self.ends[:i] + ends

    def extend(self, extra: bytes, drafter_tokens: Sequence[int] = ()) -> None:
        """Append ``extra`` to the text and update the tokenization (``drafter_tokens`` unused, as in
        :meth:`preview`)."""
        if not extra:
            return
        new_text = self.text + extra
        i, tail, ends = self._retokenize_tail(new_text)
        self.text = new_text
        del self.tokens[i:]
        del self.ends[i:]
        self.tokens.extend(tail)
        self.ends.extend(ends)

    def copy(self) -> "TokenTrack":
        """An independent track with the same text (a branch's)."""
        other = TokenTrack(self._tokenize, self._bytes, window=self.window)
        other.text, other.tokens, other.ends = self.text, list(self.tokens), list(self.ends)
        return other


class SharedTrack:
    """The track of a member whose tokenizer is the drafter's own (same fingerprint): it holds the drafter's
    token ids as they were produced, so positions align one to one and nothing is ever re-tokenized.
    Same interface as :class:`TokenTrack`; the caller passes the drafter's ids with the bytes."""

    follows_drafter = True

    def __init__(self, token_bytes: Sequence[bytes]) -> None:
        self._bytes = token_bytes
        self.text = b""
        self.tokens: list[int] = []
        self.ends: list[int] = []

    def _ends_of(self, tokens: Sequence[int], start: int) -> list[int]:
        out, pos = [], start
        for t in tokens:
            pos += len(self._bytes[t])
            out.append(pos)
        return out

    def _check(self, extra: bytes, tokens: Sequence[int]) -> None:
        if b"".join(self._bytes[t] for t in tokens) != extra:
            raise ValueError("a shared-tokenizer track was given drafter tokens that do not spell the text")

    def preview(self, extra: bytes, drafter_tokens: Sequence[int] = ()) -> tuple[list[int], list[int]]:
        """Tokens and ends of ``text + extra`` without committing: the drafter's ids appended."""
        self._check(extra, drafter_tokens)
        return self.tokens + list(drafter_tokens), self.ends + self._ends_of(drafter_tokens, len(self.text))

    def extend(self, extra: bytes, drafter_tokens: Sequence[int] = ()) -> None:
        """Append the drafter's tokens ``drafter_tokens`` (which spell ``extra``)."""
        self._check(extra, drafter_tokens)
        self.ends.extend(self._ends_of(drafter_tokens, len(self.text)))
        self.tokens.extend(drafter_tokens)
        self.text += extra

    def copy(self) -> "SharedTrack":
        """An independent track with the same text (a branch's)."""
        other = SharedTrack(self._bytes)
        other.text, other.tokens, other.ends = self.text, list(self.tokens), list(self.ends)
        return other


def complete_utf8_len(data: bytes) -> int:
    """Length of ``data`` without a trailing, still incomplete UTF-8 character."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return n - back if need > back else n
    return n


def is_whole_text(data: bytes) -> bool:
    """True when ``data`` neither starts nor ends inside a UTF-8 character."""
    return bool(data) and data[0] & 0xC0 != 0x80 and complete_utf8_len(data) == len(data)


def is_char_boundary(text: bytes, offset: int) -> bool:
    """True when byte ``offset`` of ``text`` is not inside a UTF-8 character."""
    return offset <= 0 or offset >= len(text) or text[offset] & 0xC0 != 0x80


def reliable_view(ends: Sequence[int], text: bytes, offset: int, drafted_len: int, text_start: int = 0) -> bool:
    """Whether a re-tokenizing member can be asked about the drafted token at byte ``offset`` of ``text``.

    Reliable when the drafted piece is whole text (it starts and ends at character boundaries), its start
    is one of the member's token boundaries, and the member's own token starting there does not run past
    the drafted piece: if it does (the drafter wrote " " + "hello" where the member writes " hello"), the
    member would score the drafted piece by a tokenization it never produces itself, and its low
    probability says nothing about the text. ``text`` may be just the tail of the shared text that starts at
    byte ``text_start`` (the draft), as long as it covers ``offset``."""
    end = offset + drafted_len
    if not (is_char_boundary(text, offset - text_start) and is_char_boundary(text, end - text_start)
            and is_boundary(ends, offset)):
        return False
    nxt = bisect_right(ends, offset)  # the member's token that starts at offset, if any
    return nxt >= len(ends) or ends[nxt] <= end


def is_boundary(ends: Sequence[int], offset: int) -> bool:
    """True when ``offset`` (bytes into the text) falls between two tokens of a member."""
    if offset == 0:
        return True
    j = bisect_left(ends, offset)
    return j < len(ends) and ends[j] == offset


def token_ending_at(ends: Sequence[int], offset: int) -> int:
    """Index of the token that ends exactly at ``offset`` (-1 for offset 0 = before the first token)."""
    if offset == 0:
        return -1
    j = bisect_left(ends, offset)
    if j < len(ends) and ends[j] == offset:
        return j
    raise ValueError(f"offset {offset} is not a token boundary")
