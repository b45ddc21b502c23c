"""What a policy may ask of a member's model, and the local llama.cpp implementation.

A :class:`Backend` is one loaded model seen through sequences ("seqs"): each generation (a lane) opens one,
feeds it the tokens it should hold, and reads distributions at chosen rows. The local backend is a
llama.cpp model and context (:class:`~edge_ensemble.runtime.Model`); a scripted fake backend
(tests/fake_backend.py) replays given distributions; a remote one (:mod:`edge_ensemble.remote`) wraps a
server. Policies never see which.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from .context import Context
from .dist import Dist, FullDist
from .errors import BusyError, ContextOverflowError
from .runtime import Model, SeqRequest, common_prefix_len


def per_request(temperature: float | Sequence[float], n: int) -> list[float]:
    """``feed_many``'s temperature argument as one temperature per request."""
    return [float(temperature)] * n if isinstance(temperature, (int, float)) else [float(t) for t in temperature]


class Backend(Protocol):
    """The operations a member's model offers an ensemble.

    Vocabulary facts: ``name``, ``n_vocab``, ``n_ctx``, ``token_bytes`` (each token's text; b"" for control
    tokens), ``eog_ids``, ``tokenizer_fingerprint`` (equal fingerprints = the ids mean the same).
    Sequences: ``open_seq`` / ``fork_seq`` / ``close_seq``; ``feed`` makes a sequence hold ``target`` and
    returns distributions at absolute positions ``rows`` (the distribution of the token after that
    position); ``step`` appends one token and returns the next distribution."""

    name: str
    n_vocab: int
    n_ctx: int
    token_bytes: list[bytes]
    eog_ids: np.ndarray
    tokenizer_fingerprint: str

    def is_eog(self, token: int) -> bool: ...

    def tokenize(self, data: bytes) -> list[int]:
        """Text tokens of ``data`` (no BOS, no control tokens parsed)."""
        ...

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Tokens of a conversation rendered in this model's template, ready for its answer."""
        ...

    def raw_prompt(self, text: str) -> list[int]:
        """Tokens of raw text to be continued (BOS as the model asks, no template)."""
        ...

    def open_seq(self) -> int: ...

    def fork_seq(self, src: int) -> int: ...

    def close_seq(self, seq: int, *, keep_cache: bool = True) -> None: ...

    def cached(self, seq: int) -> list[int]:
        """The tokens ``seq`` holds now."""
        ...

    def room(self, seq: int) -> int:
        """Positions ``seq`` may still grow by."""
        ...

    def feed(self, seq: int, target: Sequence[int], rows: Sequence[int], temperature: float) -> tuple[dict[int, Dist], int]:
        """Make ``seq`` hold ``target``; distributions at ``rows``; and how many tokens were decoded."""
        ...

    def feed_many(self, requests: Sequence[tuple[int, Sequence[int], Sequence[int]]],
                  temperature: float | Sequence[float]) -> list[tuple[dict[int, Dist], int] | None]:
        """:meth:`feed` for several sequences at once (one batch where the backend can), at one temperature or
        one per request; ``None`` for a sequence whose tokens no longer fit (it ends with finish_reason
        "length", the others go on)."""
        ...

    def step(self, seq: int, token: int, temperature: float) -> Dist:
        """Append one token to ``seq``; the distribution of the token after it."""
        ...


class ModelVocabulary:
    """The vocabulary half of a backend, read from a llama.cpp :class:`Model` in ``self.model`` (a loaded one,
    or a vocab-only copy for a model that runs elsewhere)."""

    model: Model

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.model.tokenizer_fingerprint

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token)

    def tokenize(self, data: bytes) -> list[int]:
        return self.model.tokenize(data, add_bos=False, special=False)

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.model.prompt_tokens(self.model.render_chat(messages))

    def raw_prompt(self, text: str) -> list[int]:
        # As llama-server and llama-cpp-python's create_completion do: control-token markup in raw text is parsed.
        return self.model.tokenize(text.encode("utf-8"), add_bos=None, special=True)


class LocalBackend(ModelVocabulary):
    """A llama.cpp model in this process (:class:`Model`): full logits rows, sequences of one context.

    Decodes and the reads made at every step go straight to ``model.context`` (no delegation in the hot loop);
    changes to a sequence's cache (trim, fork, drop, reconcile) go through the :class:`Model`, the handle
    callers hold and may wrap."""

    def __init__(self, model: Model, *, seq_ctx: int | None = None) -> None:
        """``seq_ctx``: the most positions one sequence may hold (default: the whole context), for a context
        sized to hold several answers side by side."""
        self.model = model
        self.context: Context = model.context  # type: ignore[assignment]  # a loaded model's: never _NoContext
        self._seq_ctx = min(seq_ctx or model.n_ctx, model.n_ctx)
        self.name = model.name
        self.n_vocab = model.n_vocab
        self.token_bytes = model.token_bytes
        self.eog_ids = model.eog_ids
        self._free = list(range(max(1, model.options.n_seq_max)))

    @property
    def n_ctx(self) -> int:
        """Positions one sequence (one answer) may hold."""
        return self._seq_ctx

    # -- sequences -----------------------------------------------------------------------------------------

    def open_seq(self) -> int:
        """The lowest free sequence. Its cells are kept from its last use, so a new generation that shares a
        prefix with the previous one (a chat's history) reuses it."""
        if not self._free:
            raise BusyError(f"{self.name}: all {self.model.options.n_seq_max} sequences of its context are in use")
        seq = min(self._free)
        self._free.remove(seq)
        self.model.reconcile(seq)  # an earlier generation may have been interrupted mid-decode
        return seq

    def fork_seq(self, src: int) -> int:
        """A new sequence holding ``src``'s tokens (shared cells: no re-prefill)."""
        seq = self.open_seq()
        self.model.fork(src, seq)
        return seq

    def close_seq(self, seq: int, *, keep_cache: bool = True) -> None:
        """Give ``seq`` back. Its cells stay (prefix reuse) unless ``keep_cache`` is False or it is a branch
        that other sequences do not need."""
        if not keep_cache:
            self.model.drop(seq)
        if seq not in self._free:
            self._free.append(seq)

    def _evict_idle(self, need: int) -> None:
        """Free the cells idle sequences keep for prefix reuse, until ``need`` cells are free (or none is left):
        with several sequences, one answer's kept cache must not shorten another's room."""
        for seq in sorted(self._free, reverse=True):
            if self.context.free_cells() >= need:
                return
            if self.context.n_past(seq):
                self.model.drop(seq)

    def cached(self, seq: int) -> list[int]:
        return self.context.tokens(seq)

    # -- decoding ------------------------------------------------------------------------------------------

    def _plan(self, seq: int, target: Sequence[int], rows: Sequence[int]) -> tuple[int, list[int]]:
        """Roll ``seq`` back to where ``target`` must be fed from: the longest common prefix with what is
        cached, or the earliest row whose logits are wanted. Returns (start, rows relative to start)."""
        common = common_prefix_len(self.context.tokens(seq), target)
        start = min([common, *rows]) if rows else common
        if start == len(target) and rows:  # logits wanted for the last cached token: re-feed it
            start -= 1
        self.model.trim(start, seq)
        return start, [r - start for r in sorted(rows)]

    def feed(self, seq: int, target: Sequence[int], rows: Sequence[int], temperature: float) -> tuple[dict[int, Dist], int]:
        start, want = self._plan(seq, target, rows)
        if start == len(target):
            return {}, 0
        self._evict_idle(len(target) - start)
        out = self.context.decode(target[start:], want=want or None, seq=seq)
        return {r: FullDist(out[i], temperature) for i, r in enumerate(sorted(rows))}, len(target) - start

    def feed_many(self, requests: Sequence[tuple[int, Sequence[int], Sequence[int]]],
                  temperature: float | Sequence[float]) -> list[tuple[dict[int, Dist], int] | None]:
        temps = per_request(temperature, len(requests))
        plans = [self._plan(seq, target, rows) for seq, target, rows in requests]
        self._evict_idle(sum(len(target) - start for (_, target, _), (start, _) in zip(requests, plans)))
        batch = [SeqRequest(seq, target[start:], want or None)
                 for (seq, target, _), (start, want) in zip(requests, plans) if start < len(target)]
        result = self.context.decode_many(batch)
        out: list[tuple[dict[int, Dist], int] | None] = []
        for (seq, target, rows), (start, _), temperature in zip(requests, plans, temps):
            if seq in result.full:
                out.append(None)
            elif start == len(target):
                out.append(({}, 0))
            else:
                logits = result.logits.get(seq)
                dists = {r: FullDist(logits[i], temperature) for i, r in enumerate(sorted(rows))} if rows else {}
                out.append((dists, len(target) - start))
        return out

    @property
    def hidden_states(self) -> bool:
        """Whether this model's context gives last hidden states (a router's does: LoadOptions.hidden_states)."""
        return self.model.options.hidden_states

    def feed_hidden(self, seq: int, target: Sequence[int], temperature: float) -> tuple[Dist, np.ndarray, int]:
        """:meth:`feed` with the last row's distribution and the last hidden state there (a router reads it);
        and how many tokens were decoded."""
        row = len(target) - 1
        start, want = self._plan(seq, target, [row])
        self._evict_idle(len(target) - start)
        result = self.context.decode_many([SeqRequest(seq, target[start:], want)])
        if seq in result.full:
            raise ContextOverflowError(f"{self.name}: context full ({len(target)} tokens); raise --n-ctx or shorten")
        return FullDist(result.logits[seq][-1], temperature), result.hidden[seq][-1].copy(), len(target) - start

    def step(self, seq: int, token: int, temperature: float) -> Dist:
        self._evict_idle(1)
        return FullDist(self.context.decode([token], want="last", seq=seq)[0], temperature)

    def room(self, seq: int) -> int:
        """Positions ``seq`` may still grow by."""
        left = self._seq_ctx - self.context.n_past(seq)
        free = self.context.free_cells()
        if free < left and self._free:  # idle sequences' kept cells are freed when a decode needs them
            free += self.context.cells_only_in(self._free)
        return min(left, free)

    def reset(self) -> None:
        """Empty every sequence's cache."""
        self.model.reset()

    def close(self) -> None:
        """Free the model (safe to call twice)."""
        self.model.close()

