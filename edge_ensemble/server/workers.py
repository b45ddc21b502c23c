"""The worker: makes up to ``parallel`` answers on the ensemble at once, in arrival order, and queues or refuses
(:class:`QueueFull`) the rest.

Without decode rounds one thread advances the running answers round-robin, a policy step each; with the rounds
of :meth:`Ensemble.decode_together` each running answer has a thread of its own and their decodes are batched.
Each answer's events go back to the request's event loop through its :class:`Job`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import EdgeEnsembleError
from .requests import _INTERNAL, ApiError, _library_error

if TYPE_CHECKING:
    from ..engine import Event, GenerationResult
    from ..rounds import DecodeRounds

# One logger for the whole server package, under the name the single module had: its log lines stay the same.
log = logging.getLogger("edge_ensemble.server")


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
    seed: int | None = None  # the sampling seed of this answer (reported: the same request with it answers the same)
    result: "GenerationResult | None" = None  # the finished answer (set before its event is posted)

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

    def submit_all(self, jobs: list[Job]) -> None:
        """Queue the ``jobs`` of one request (its n choices) together, in order: all of them, or none and
        :class:`QueueFull` when more than ``max_queue`` requests would then wait beyond the free lanes."""
        if len(jobs) == 1:
            return self.submit(jobs[0])
        with self._cond:
            if self._stopping:
                raise QueueFull(5)
            free = max(0, self.parallel - len(self._active))
            if len(self._waiting) + len(jobs) - free > self.max_queue:
                ahead = (len(self._waiting) + len(jobs)) / self.parallel
                raise QueueFull(max(1, min(3600, math.ceil(self._seconds * ahead))))
            self._waiting.extend(jobs)
            self._cond.notify_all()

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
        job.result = event.result or job.result
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
