"""Test doubles shared by the CLI tests, and :class:`LaneLog`: the lanes a generation opened, for the tests that
inspect them."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest

from edge_ensemble.api import Ensemble
from edge_ensemble.member import Lane, Member


def ctrl_c_in_first_answer(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """The user's Ctrl-C (a test double of the keypress): the first answer streamed is interrupted after
    ``after`` events; later answers run normally."""
    real_stream = Ensemble.stream
    calls: list[int] = []

    def stream_with_ctrl_c(self: Ensemble, *args: Any, **kwargs: Any) -> Iterator[Any]:
        events = real_stream(self, *args, **kwargs)
        calls.append(1)
        if len(calls) > 1:
            return events

        def interrupted() -> Iterator[Any]:
            for i, event in enumerate(events):
                if i == after:
                    events.close()
                    raise KeyboardInterrupt
                yield event

        return interrupted()

    monkeypatch.setattr(Ensemble, "stream", stream_with_ctrl_c)


class LaneLog:
    """Records every lane the members open (:meth:`Member.open_lane`) while the patch holds: what a test inspects
    of a generation (its sequence, prompt, track and counters), also after the generation is over."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened: list[Lane] = []
        real_open_lane = Member.open_lane

        def open_lane(member: Member, *args: Any, **kwargs: Any) -> Lane:
            lane = real_open_lane(member, *args, **kwargs)
            self.opened.append(lane)
            return lane

        monkeypatch.setattr(Member, "open_lane", open_lane)

    def last(self, member: Member) -> Lane:
        """The lane ``member`` opened last."""
        return next(lane for lane in reversed(self.opened) if lane.member is member)


@contextlib.contextmanager
def recording_lanes() -> Iterator[LaneLog]:
    """A :class:`LaneLog` outside a test's own monkeypatch (in a helper function)."""
    with pytest.MonkeyPatch.context() as mp:
        yield LaneLog(mp)
