"""Accepted bytes into printable text, for the engine: whole UTF-8 characters only, stop strings cut (and the
tail held back while it could still become one), and the log-probability records that go with the text."""

from __future__ import annotations

import codecs
from typing import Sequence

from .policies import TokenLogprob


class TextStream:
    """Accepted bytes -> printable text: whole UTF-8 characters only, stop strings cut, tail held back
    while it could still become a stop string."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.data = bytearray()
        self.stops = [s.encode("utf-8") for s in stop if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.emitted = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stopped = False

    def push(self, data: bytes) -> str:
        self.data += data
        if self.stops:
            lo = max(0, self.emitted - self.hold - len(data))
            hits = [i for i in (self.data.find(s, lo) for s in self.stops) if i >= 0]
            if hits:
                del self.data[min(hits):]
                self.stopped = True
                return self._emit(len(self.data), final=True)
        return self._emit(max(self.emitted, len(self.data) - self.hold))

    def finish(self) -> str:
        return self._emit(len(self.data), final=True)

    def _emit(self, upto: int, final: bool = False) -> str:
        chunk = bytes(self.data[self.emitted:upto])
        self.emitted = max(self.emitted, upto)
        return self.decoder.decode(chunk, final=final)


class Scores:
    """The log-probability records of the accepted tokens, by the bytes of the text each one adds: handed out
    with the event that prints a token's text, cut where a stop string cut the text."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int, TokenLogprob]] = []  # (start, end) in the answer's bytes, the record
        self.sent = 0

    def add(self, start: int, size: int, record: TokenLogprob) -> None:
        self.items.append((start, start + size, record))

    def take(self, upto: int) -> list[TokenLogprob]:
        """The records not handed out yet whose whole text lies before byte ``upto`` (printed)."""
        i = self.sent
        while i < len(self.items) and self.items[i][1] <= upto:
            i += 1
        out = [r for _, _, r in self.items[self.sent:i]]
        self.sent = i
        return out

    def kept(self, length: int) -> list[TokenLogprob]:
        """Every record of a token with text in the final ``length`` bytes (a token a stop string cut into is
        kept; one wholly after the cut is not)."""
        return [r for start, end, r in self.items if start < length or end <= length]

    def rest(self, length: int) -> list[TokenLogprob]:
        """At the end: the kept records not handed out yet."""
        kept = self.kept(length)
        out, self.sent = kept[self.sent:], max(self.sent, len(kept))
        return out
