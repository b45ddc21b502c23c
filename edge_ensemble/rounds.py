"""Answers decoded together: several generations, each driven by its own thread, share one loaded ensemble, and
the decodes they ask for at the same time go to llama.cpp as one ``llama_decode`` per model.

Policies are unchanged. Each member's local backend is wrapped in a :class:`SharedBackend` whose decodes
(``feed``, ``feed_many``, ``step``) join the current *round*: a round closes when every thread taking part is
waiting for a decode, and its requests are then decoded in one batch per model (each sequence with logits only
at the rows it asked for); every thread goes on with its own rows. The other backend calls (sequences, cache
facts, tokenizing) are serialized with the rounds, so one llama.cpp context is never used by two threads at
once.

A member that is not local (``server:``) cannot join a round; its calls are serialized on a lock of its own
(:class:`LockedBackend`).

A greedy answer decoded in a round equals the same answer decoded alone up to the floating-point noise of a
larger batch (llama.cpp sums in a different order); the tests check that the answers themselves are equal.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

from .backends import LocalBackend, per_request
from .dist import Dist
from .errors import ContextOverflowError

T = TypeVar("T")
FeedRequest = tuple[int, Sequence[int], Sequence[int]]  # (seq, target tokens, rows wanted)
FeedResult = tuple[dict[int, Dist], int] | None


@dataclass
class _Waiting:
    """One thread's decode, waiting for its round."""

    backend: LocalBackend
    requests: Sequence[FeedRequest]
    temperatures: list[float]
    result: list[FeedResult] | None = None
    error: BaseException | None = None


class DecodeRounds:
    """The meeting point of the threads that decode together (see the module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._taking_part = 0  # threads inside taking_part()
        self._waiting: list[_Waiting] = []
        self._local = threading.local()
        self.rounds = 0  # rounds decoded
        self.batches = 0  # feed_many calls made for them (one per model per round)
        self.served = 0  # thread decodes those calls served; served / batches = answers per llama_decode

    @contextlib.contextmanager
    def taking_part(self) -> Iterator[None]:
        """Make the calling thread one of those a round waits for, until the block ends (nested blocks count
        once)."""
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                self._taking_part += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._cond:
                    self._taking_part -= 1
                    self._close_round()  # the others may have been waiting only for this thread
                    self._cond.notify_all()  # and wait_idle() for the last one

    @property
    def in_round(self) -> bool:
        """Whether the calling thread takes part (its decodes wait for the round)."""
        return getattr(self._local, "depth", 0) > 0

    def wait_idle(self) -> None:
        """Return once no thread takes part any more."""
        with self._cond:
            while self._taking_part:
                self._cond.wait()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` with no decode running (a backend call that is not a decode)."""
        with self._cond:
            return fn(*args, **kwargs)

    def decode(self, backend: LocalBackend, requests: Sequence[FeedRequest],
               temperatures: list[float]) -> list[FeedResult]:
        """``backend.feed_many(requests)``, in the next round when the calling thread takes part."""
        with self._cond:
            if not self.in_round:
                return backend.feed_many(requests, temperatures)
            me = _Waiting(backend, requests, temperatures)
            self._waiting.append(me)
            self._close_round()
            while me.result is None and me.error is None:
                self._cond.wait()
        if me.error is not None:
            raise me.error
        return me.result

    def _close_round(self) -> None:
        """With the lock held: when every thread taking part waits, decode their requests, one batch per model."""
        if not self._waiting or len(self._waiting) < self._taking_part:
            return
        waiting, self._waiting = self._waiting, []
        by_backend: dict[int, list[_Waiting]] = {}
        for w in waiting:
            by_backend.setdefault(id(w.backend), []).append(w)
        for group in by_backend.values():
            requests = [r for w in group for r in w.requests]
            temperatures = [t for w in group for t in w.temperatures]
            try:
                results = group[0].backend.feed_many(requests, temperatures)
            except Exception as exc:  # noqa: BLE001 - raised in the waiting thread(s)
                if len(group) == 1:
                    group[0].error = exc
                else:  # one thread's requests may have failed them all: each alone, the error lands where it belongs
                    self._decode_each_alone(group)
                continue
            except BaseException as exc:  # noqa: BLE001 - an interrupt: handed to every thread, raised there
                for w in group:
                    w.error = exc
                continue
            at = 0
            for w in group:
                w.result = results[at:at + len(w.requests)]
                at += len(w.requests)
            self.batches += 1
            self.served += len(group)
        self.rounds += 1
        self._cond.notify_all()

    def _decode_each_alone(self, group: list[_Waiting]) -> None:
        """After a failed batch: each thread's requests in a decode of their own. A failed llama_decode leaves no
        cells behind (the runtime drops them), and a request names its whole target, so this resumes cleanly."""
        for n, w in enumerate(group):
            try:
                w.result = w.backend.feed_many(w.requests, w.temperatures)
            except Exception as exc:  # noqa: BLE001 - raised in that thread
                w.error = exc
                continue
            except BaseException as exc:  # noqa: BLE001 - an interrupt: for every thread not yet served
                for rest in group[n:]:
                    rest.error = exc
                return
            self.batches += 1
            self.served += 1


class SharedBackend:
    """A :class:`LocalBackend` used by the threads of one :class:`DecodeRounds`: its decodes join the rounds,
    its other calls are serialized with them. Vocabulary facts are read straight from the wrapped backend."""

    def __init__(self, inner: LocalBackend, rounds: DecodeRounds) -> None:
        self.inner = inner
        self.rounds = rounds

    def __getattr__(self, name: str) -> Any:
        """Facts (name, n_vocab, n_ctx, token_bytes, eog_ids, model, ...) straight from the wrapped backend; any
        method not named below (e.g. the router's ``feed_hidden``) serialized with the rounds, not batched."""
        attr = getattr(self.inner, name)
        if callable(attr) and not isinstance(attr, type):
            return functools.partial(self.rounds.call, attr)
        return attr

    # -- serialized ------------------------------------------------------------------------------------------

    def tokenize(self, data: bytes) -> list[int]:
        return self.rounds.call(self.inner.tokenize, data)

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.rounds.call(self.inner.chat_prompt, messages)

    def raw_prompt(self, text: str) -> list[int]:
        return self.rounds.call(self.inner.raw_prompt, text)

    def open_seq(self) -> int:
        return self.rounds.call(self.inner.open_seq)

    def fork_seq(self, src: int) -> int:
        return self.rounds.call(self.inner.fork_seq, src)

    def close_seq(self, seq: int, *, keep_cache: bool = True) -> None:
        self.rounds.call(self.inner.close_seq, seq, keep_cache=keep_cache)

    def cached(self, seq: int) -> list[int]:
        return self.rounds.call(self.inner.cached, seq)

    def room(self, seq: int) -> int:
        return self.rounds.call(self.inner.room, seq)

    def reset(self) -> None:
        self.rounds.call(self.inner.reset)

    # -- decodes, in rounds ------------------------------------------------------------------------------------

    def feed_many(self, requests: Sequence[FeedRequest], temperature: float | Sequence[float]) -> list[FeedResult]:
        return self.rounds.decode(self.inner, requests, per_request(temperature, len(requests)))

    def feed(self, seq: int, target: Sequence[int], rows: Sequence[int], temperature: float) -> tuple[dict[int, Dist], int]:
        out = self.feed_many([(seq, target, rows)], temperature)[0]
        if out is None:
            raise ContextOverflowError(f"{self.inner.name}: context full ({len(target)} tokens); raise --n-ctx or "
                                       "shorten the prompt")
        return out

    def step(self, seq: int, token: int, temperature: float) -> Dist:
        target = [*self.cached(seq), token]
        return self.feed(seq, target, [len(target) - 1], temperature)[0][len(target) - 1]


class LockedBackend:
    """A backend that cannot join the rounds (a remote one: its decodes are HTTP requests, not llama_decode
    calls) used by the threads of one :class:`DecodeRounds`: every call is serialized on its own lock, so two
    threads never share its connection or its slot table at once. Facts are read straight through."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if callable(attr) and not isinstance(attr, type):
            return functools.partial(self._locked, attr)
        return attr

    def _locked(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self._lock:
            return fn(*args, **kwargs)
