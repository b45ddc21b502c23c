"""The provenance extension of an answer (``"edge_ensemble": {"provenance": true}`` in a request): who wrote each
token of a streamed chunk, where the ensemble overrode the drafter and with which candidates, and, at the end,
every branch or sample a branching or voting policy made. docs/web.md gives the wire format; the web page
(:mod:`.web`) draws it.

Plain Python: the engine's events in, JSON-ready dictionaries out.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..engine import Event, GenerationResult
    from ..policies import Piece


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


class Provenance:
    """One choice's tokens, matched to the text its events print: every character belongs to the token whose bytes
    hold its first byte (a character split over two tokens is the first one's), so that the ``tokens`` of a chunk
    put together are exactly its text. ``drafter``: the member a drafted token comes from."""

    def __init__(self, drafter: str) -> None:
        self.drafter = drafter
        # [piece, its bytes not printed yet, whether its token was sent (a piece printed over two chunks)]
        self.queue: collections.deque[list[Any]] = collections.deque()

    def tokens(self, event: "Event") -> list[dict[str, Any]]:
        """The ``tokens`` of the chunk that carries ``event``'s text: ``{"text", "member", "kind"}`` each, with
        ``override`` where the ensemble chose otherwise than the drafter and ``logprob`` / ``top`` when the
        policy scored it. A piece whose bytes all lie inside a character an earlier one started, and the
        ensemble's choice to end, are tokens with empty text."""
        # (a piece without text is shown only where it was the ensemble's choice: its choice to end the answer)
        self.queue.extend([p, len(p.data), False] for p in event.pieces if p.data or p.kind == "ensemble")
        out: list[dict[str, Any]] = []
        last: list[Any] | None = None  # the queue entry of out[-1]
        for char in event.text:
            out += self._empty()
            if not self.queue:  # text no piece accounts for (a branching policy's answer, printed whole)
                if last is not None or not out:
                    out.append(self._token(None, "", event))
                    last = None
                out[-1]["text"] += char
                continue
            entry, swallowed = self.queue[0], []
            size = len(char.encode("utf-8"))
            while size > 0 and self.queue:  # the character's bytes, from the front of the queue on
                used = min(size, self.queue[0][1])
                size -= used
                self.queue[0][1] -= used
                if self.queue[0][1] == 0:
                    done = self.queue.popleft()
                    if done is not entry:
                        swallowed.append(done)
            if entry is last:
                out[-1]["text"] += char
            else:
                out.append(self._token(entry, char, event))
                last = entry
            for other in swallowed:
                out.append(self._token(other, "", event))
                last = other
        return out + self._empty()

    def _empty(self) -> list[dict[str, Any]]:
        """The pieces without text at the front of the queue, as tokens with empty text."""
        out = []
        while self.queue and self.queue[0][1] == 0:
            out.append(self._token(self.queue.popleft(), "", None))
        return out

    def _token(self, entry: list[Any] | None, text: str, event: "Event | None") -> dict[str, Any]:
        if entry is None:
            return {"text": text, "member": (event.winner if event else None) or self.drafter,
                    "kind": event.kind if event else "draft"}
        piece: Piece = entry[0]
        token: dict[str, Any] = {"text": text, "member": piece.winner or self.drafter, "kind": piece.kind}
        if piece.end:
            token["end"] = True
        if entry[2]:
            return token
        entry[2] = True
        if piece.drafted is not None:
            token["override"] = {"drafted": _text(piece.drafted), "ended": not piece.drafted}
        if piece.logprob is not None:
            token["logprob"] = piece.logprob.logprob
            token["top"] = [[_text(t), lp] for t, lp in piece.logprob.top]
        return token


def final(result: "GenerationResult") -> dict[str, Any]:
    """What the last chunk adds: every branch or sample of a branching or voting policy, each with all its
    fields (a policy's own fields too), and the answer's provenance spans."""
    out: dict[str, Any] = {"provenance": [dataclasses.asdict(s) for s in result.provenance]}
    if result.branches:
        out["branches"] = [_fields(b) for b in result.branches]
    return out


def _fields(branch: Any) -> dict[str, Any]:
    """A branch's fields as JSON values, whatever dataclass (or mapping) the policy made it with."""
    fields = dataclasses.asdict(branch) if dataclasses.is_dataclass(branch) else dict(
        branch if isinstance(branch, dict) else vars(branch))
    return {str(k): _json(v) for k, v in fields.items()}


def _json(value: Any) -> Any:
    """``value`` as strict JSON can hold it (no NaN or infinity: a browser's JSON.parse refuses them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return _text(value)
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)
