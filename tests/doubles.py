"""Test doubles shared by the CLI tests."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from edge_ensemble.api import Ensemble


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
