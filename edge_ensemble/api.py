"""The small Python API: :class:`Ensemble`.

>>> from edge_ensemble import Ensemble
>>> with Ensemble.from_preset("tiny") as ens:                       # doctest: +SKIP
...     result = ens.generate("Why is the sky blue?", max_tokens=200)
...     print(result.text, result.stats.tokens_per_second, result.stats.ensembled_fraction)
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .decisions import Sampling
from .engine import Event, GenerationOptions, GenerationResult, generate_events
from .chat import clean_text
from .errors import BusyError, IncompatibleMembersError, UsageError, warn
from .backends import LocalBackend
from .hashing import sha256_file as _sha256
from .member import Member
from .ensemble_config import CALL_OPTIONS, ENSEMBLE_OPTIONS, EnsembleConfig
from .memory import check_memory, estimate_memory_bytes
from .options import GENERATION, LOAD, check_names
from .policies import MemberFile, registry
from .remote import RemoteBackend, is_server_spec, parse_server_spec, server_model_path
from .rounds import DecodeRounds, LockedBackend, SharedBackend
from .runtime import LoadOptions, Model, usable_cores
from .sources import Catalog, ModelSpec, SpecLike, parse_spec, resolve

# (re-exported: the API's names for what an ensemble and a call may be given, and the memory estimate)
__all__ = ["CALL_OPTIONS", "ENSEMBLE_OPTIONS", "Ensemble", "EnsembleConfig", "MemberInfo", "estimate_memory_bytes"]


@dataclass
class MemberInfo:
    """What the ensemble knows about one member."""

    name: str
    path: Path
    role: str  # "drafter" or "verifier"
    architecture: str
    n_vocab: int
    chat_template: bool
    size_bytes: int = 0
    extra: dict = field(default_factory=dict)


class Ensemble:
    """Several GGUF models that write one answer together.

    ``members``: model specs — local paths, ``hf:<org>/<repo>/<file>[@revision]``, catalog names or
    ``server:http://HOST:PORT=MODEL`` (a model in a running llama-server, :mod:`edge_ensemble.remote`) (one
    spec alone is a one-member ensemble); the first member drafts (and is the model of the ``single``
    policy). The ensemble owns its models: use it as a context manager or call :meth:`close`.

    One thread at a time: a call from a second thread waits until every answer the first one streams is
    finished or closed (llama.cpp contexts are not thread-safe). One thread may stream up to ``parallel``
    answers at once (default 1), each on its own sequences of the members' contexts, advancing them in any
    order (the server's worker interleaves them); one more stream opened by that thread raises
    :class:`~edge_ensemble.errors.BusyError` at once instead of waiting for itself.

    ``options`` (:data:`ENSEMBLE_OPTIONS`, by their Python names): the policy, the policies' options (a call
    may override those) and the load options, e.g. ``Ensemble(specs, gate=None, union_k=8, n_ctx=2048)``.
    ``loading(name, path)``: a context manager each local model loads inside (the CLI's loading line).
    """

    def __init__(self, members: Sequence[SpecLike] | SpecLike, *,
                 config: EnsembleConfig | None = None, download: bool = True, progress: bool = False,
                 loading: Callable[[str, Path], contextlib.AbstractContextManager[object]] | None = None,
                 **options: object) -> None:
        self._members: list[Member] = []
        self._turn_cond = threading.Condition()
        self._turn_owner: object = None  # thread id of the answers in progress (or the decode rounds, see _owner)
        self._rounds: DecodeRounds | None = None  # while decode_together() runs
        self._open_streams: list[weakref.ref[Iterator[Event]]] = []  # and their generators
        if isinstance(members, (str, os.PathLike, ModelSpec)):
            members = [members]
        elif isinstance(members, bytes) or not all(isinstance(m, (str, os.PathLike, ModelSpec)) for m in members or ()):
            raise UsageError(f"members must be a model spec or a list of them (paths, hf:... or catalog names); got {members!r}")
        if not members:
            raise UsageError("give at least one model (a path, hf:org/repo/file or a catalog name)")
        check_names(options, ENSEMBLE_OPTIONS, elsewhere=GENERATION, hint="set per answer; give it to generate() or stream()")
        self.config = cfg = dataclasses.replace(config or EnsembleConfig(), **options).validate(len(members))
        if cfg.n_threads is not None and cfg.n_threads > usable_cores():
            warn(f"{cfg.n_threads} threads (--threads / n_threads) is more than the {usable_cores()} CPU cores this"
                 f" process may use: llama.cpp's spinning threads then slow each other down; use {usable_cores()}"
                 " or fewer")
        policy = registry.get(cfg.policy)
        # A server member (server:URL[=MODEL]) is resolved to the local GGUF its tokenizer is read from.
        servers = {i: parse_server_spec(str(s)) for i, s in enumerate(members) if is_server_spec(_spec_text(s))}
        if servers and policy.local_only:  # (before a server is asked for its model)
            raise UsageError(f"policy {policy.name} runs local models only ({policy.local_only}); give the members"
                             " as files or catalog names")
        specs = [(servers[i].model or server_model_path(servers[i])) if i in servers else s for i, s in enumerate(members)]
        paths, names = self._resolve(specs, download=download, progress=progress)
        self._files = [MemberFile(name, path, remote=i in servers) for i, (path, name) in enumerate(zip(paths, names))]
        # What the policy reads once (a route head, checked against the files), before any model loads.
        options_ = cfg.policy_options()
        prepared = policy.prepare(options_, self._files)
        self._prepared: dict[tuple[str, Any], Any] = {(cfg.policy, options_): prepared} if prepared is not None else {}
        self._needs = needs = policy.load_needs(options_, len(paths), prepared)
        hidden_paths = [paths[i] for i in needs.hidden_states]
        if cfg.check_memory:
            check_memory([p for i, p in enumerate(paths) if i not in servers], hidden_paths, cfg.n_ctx, cfg.parallel)
        loaded: list[tuple[Path, LocalBackend]] = []
        remote: dict[str, RemoteBackend] = {}
        try:
            for i, (path, name) in enumerate(zip(paths, names)):
                # The same weights listed twice are loaded once: both members then read one model's logits
                # (identical by construction, where two loads would differ by batch-split noise).
                backend = None if i in servers else next((b for p, b in loaded if same_file(p, path)), None)
                if i in servers:  # one backend per server, whichever members name it
                    url = servers[i].url
                    backend = remote.get(url) or RemoteBackend(servers[i], path, n_probs=cfg.union_k, declared=specs[i])
                    remote[url] = backend
                elif backend is None:
                    # parallel answers: each its own sequences and n_ctx cells, positions capped at n_ctx
                    with loading(name, path) if loading else contextlib.nullcontext():
                        backend = LocalBackend(Model(path, LoadOptions(
                            n_ctx=cfg.n_ctx * cfg.parallel, n_threads=cfg.n_threads, n_gpu_layers=cfg.n_gpu_layers,
                            flash_attn=cfg.flash_attn, control_tokens_in_messages=cfg.control_tokens_in_messages,
                            n_seq_max=cfg.parallel * needs.sequences,
                            hidden_states=any(same_file(path, h) for h in hidden_paths))), seq_ctx=cfg.n_ctx)
                    loaded.append((path, backend))
                model = backend.model
                self._members.append(Member(backend, name=_unique(name, [m.name for m in self._members])))
                _check_combinable(self._members[-1])
                # (Several sequences share one context: positions are per sequence, so the sum may pass the
                # trained context.)
                if i not in servers and 0 < model.n_ctx_train < cfg.n_ctx and needs.sequences == 1:
                    warn(f"n_ctx {cfg.n_ctx} (--n-ctx) is more than {self._members[-1].name}'s trained context of"
                         f" {model.n_ctx_train} tokens: text past {model.n_ctx_train} tokens will be poor; use"
                         f" --n-ctx {model.n_ctx_train} or less")
        except BaseException:
            self.close()
            raise

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str | None = None, **kwargs: object) -> "Ensemble":
        """An ensemble from a named preset in the catalog (``tiny`` when ``name`` is None), with the settings
        the preset ships calibrated (``[presets.<name>.calibrated]`` in models/presets.toml) under any option
        given here; an explicit ``config=`` is taken as it is."""
        from .calibration import OPTIONS as CONFIG_KEYS, parse_calibration

        catalog = Catalog.load()
        preset = catalog.preset(name) if name else catalog.default_preset
        calibrated: dict[str, object] = {}
        if preset.calibrated and "config" not in kwargs:
            table = parse_calibration(dict(preset.calibrated), f"presets.toml [presets.{preset.name}.calibrated]")
            calibrated = {CONFIG_KEYS[k].name: v for k, v in table.values.items()}
        return cls(list(preset.members), **{**calibrated, **kwargs})  # type: ignore[arg-type]

    @staticmethod
    def _resolve(specs: Sequence[SpecLike], *, download: bool, progress: bool) -> tuple[list[Path], list[str]]:
        catalog = Catalog.load()
        parsed = [parse_spec(spec, catalog) for spec in specs]  # every spec checked before anything downloads
        paths = [resolve(spec, download=download, progress=progress) for spec in parsed]
        return paths, [spec.display_name for spec in parsed]

    # -- use -----------------------------------------------------------------------------------------------

    @property
    def members(self) -> list[MemberInfo]:
        """Name, path, role and tokenizer facts of each member (first = drafter)."""
        return [
            MemberInfo(m.name, m.model.path, "drafter" if i == 0 else "verifier", m.model.architecture,
                       m.model.n_vocab, bool(m.model.chat_template), m.model.path.stat().st_size,
                       {"server": m.backend.spec.url} if isinstance(m.backend, RemoteBackend) else {})
            for i, m in enumerate(self._members)
        ]

    def stream(self, prompt: str | None = None, *, messages: Sequence[dict[str, str]] | None = None,
               system: str | None = None, raw: str | None = None, time_limit: float | None = None,
               extract: Callable[[str], str | None] | None = None, keep_cache: bool = True,
               logprobs: int | None = None, preview: bool = False, **options: Any) -> Iterator[Event]:
        """Stream an answer as :class:`Event` objects; the last one carries the :class:`GenerationResult`.

        Give either ``prompt`` (one user turn, optional ``system``), a full ``messages`` list, or ``raw`` text
        to complete without any chat template (each member tokenizes it itself, with its own BOS convention).
        ``options`` (:data:`CALL_OPTIONS`): the generation options ``max_tokens`` (default 512), ``stop``,
        ``temperature``, ``top_p``, ``top_k``, ``seed``, and for this call only ``policy`` and any policy option
        (``gate=0.3, draft_len=3``) in place of the ensemble's own. ``time_limit`` (seconds, prompt included)
        ends the answer with finish_reason ``"length"`` when it runs out. ``extract`` (eager): the answer of a
        branch's text (e.g. a number), which the branches vote on; without it the likeliest branch is chosen.
        ``keep_cache=False`` frees the answer's cells when it ends, so the next answer prefills its whole prompt
        (as after :meth:`reset_cache`, but for this answer's sequences only: others may be running beside it).
        ``logprobs`` (0 to 20; a policy with the ``logprobs`` capability, e.g. the baseline's): each token's
        log-probability as the model that wrote it scored it, with that many alternatives, on the events that
        print it and in :attr:`GenerationResult.logprobs`. ``preview`` (a terminal): a vote's first answer streams
        as it is written (events with ``provisional`` set) and its progress as ``kind == "status"`` events, before
        the voted answer; without it, only the answer returned streams.
        """
        if not self._members:
            raise UsageError("this ensemble is closed")
        msgs, raw_text = (None, _raw_text(raw, prompt, messages, system)) if raw is not None else (
            _messages(prompt, messages, system), None)
        if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, (int, float))
                                       or not 0.001 <= time_limit <= 1e9):
            raise UsageError(f"time_limit must be a number of seconds between 0.001 and 1e9; got {time_limit!r}")
        check_names(options, CALL_OPTIONS, elsewhere=LOAD, hint="fixed when the models load; give it to Ensemble(...)")
        gen = {name: o.check(options.get(name, o.default)) for name, o in GENERATION.items()}
        sampling = Sampling(**{f.name: gen[f.name] for f in dataclasses.fields(Sampling)})
        opts = GenerationOptions(max_tokens=gen["max_tokens"], stop=_stops(gen["stop"]), sampling=sampling,
                                 time_limit=time_limit, extract=extract, keep_cache=bool(keep_cache),
                                 logprobs=logprobs, preview=bool(preview))
        overrides = {k: v for k, v in options.items() if k not in GENERATION}
        cfg = dataclasses.replace(self.config, **overrides).validate(len(self._members)) if overrides else self.config
        _check_logprobs(logprobs, cfg.policy)
        policy_options, prepared = self._prepare_call(cfg)
        stream: list[Iterator[Event]] = []
        stream.append(self._one_at_a_time(lambda: generate_events(
            self._members, msgs, raw=raw_text, policy=cfg.policy, policy_options=policy_options, prepared=prepared,
            options=opts), stream))
        return stream[0]

    def _prepare_call(self, cfg: EnsembleConfig) -> tuple[Any, Any]:
        """The policy's options for a call and what the policy prepared for them; refused in one line when these
        models were not loaded for what they need."""
        options = cfg.policy_options()
        prepared, reason = self._prepared_for(cfg.policy, options)
        if reason:
            raise UsageError(f"policy {cfg.policy} with these options needs {reason}: create the Ensemble with "
                             f"policy={cfg.policy!r} and these options")
        return options, prepared

    def unmet_needs(self, config: EnsembleConfig) -> str:
        """What a call with ``config`` (the policy and its options) needs that these models were not loaded with,
        in words ("" when they serve it)."""
        return self._prepared_for(config.policy, config.policy_options())[1]

    def _prepared_for(self, name: str, options: Any) -> tuple[Any, str]:
        """What policy ``name`` prepares for ``options`` (read once: kept when there is something to keep, so a
        server's per-request option values do not pile up) and what of its load needs is unmet ("" for nothing)."""
        policy, key = registry.get(name), (name, options)
        prepared = self._prepared[key] if key in self._prepared else policy.prepare(options, self._files)
        needs, have = policy.load_needs(options, len(self._files), prepared), self._needs
        if needs.sequences > have.sequences:
            return prepared, (f"{needs.sequences} sequences per member context (these models were loaded with "
                              f"{have.sequences})")
        if not needs.hidden_states <= have.hidden_states:
            return prepared, "a member loaded with hidden states"
        if prepared is not None:
            self._prepared[key] = prepared
        return prepared, ""

    def complete(self, text: str, **kwargs: object) -> GenerationResult:
        """Complete raw ``text`` (no chat template) and return the whole result; ``stream(raw=text)`` streams it.
        The other arguments are those of :meth:`stream`."""
        return self.generate(raw=text, **kwargs)

    def _one_at_a_time(self, events: Callable[[], Iterator[Event]], me: list[Iterator[Event]]) -> Iterator[Event]:
        """``events()`` streamed while this thread holds the ensemble (with up to ``parallel`` streams of its
        own); released when its last stream ends or is closed. ``me`` holds this generator, so that
        :meth:`close` can end it."""
        ref = weakref.ref(me.pop())
        with self._turn(ref):
            if not self._members:
                raise UsageError("this ensemble was closed while the answer waited for its turn")
            yield from events()

    @contextlib.contextmanager
    def decode_together(self) -> Iterator[DecodeRounds]:
        """Several threads streaming answers at once, their decodes batched (the server's ``--parallel``).

        While the block runs, threads inside ``rounds.taking_part()`` hold the ensemble as one: together they may
        have up to ``parallel`` streams open, and the decodes they ask for at the same moment go to llama.cpp as
        one ``llama_decode`` per model (:mod:`edge_ensemble.rounds`); a remote member's calls are serialized instead.
        On leaving the block it waits for the threads still taking part."""
        rounds = DecodeRounds()
        with self._turn_cond:
            if self._rounds is not None:
                raise BusyError("this ensemble already decodes answers together (one decode_together at a time)")
            if self._turn_owner == threading.get_ident():
                raise BusyError("this thread is streaming answers of this ensemble; close them before "
                                "decode_together()")
            while self._turn_owner is not None:
                self._turn_cond.wait()
            self._rounds = rounds
            originals = [m.backend for m in self._members]
            wrapped: dict[int, object] = {}  # one wrapper per backend: twins stay twins
            for m in self._members:
                wrap = (lambda b: SharedBackend(b, rounds)) if isinstance(m.backend, LocalBackend) else LockedBackend
                m.backend = wrapped.setdefault(id(m.backend), wrap(m.backend))  # type: ignore[assignment]
        try:
            yield rounds
        finally:
            rounds.wait_idle()  # the threads of the rounds are done before their backends change under them
            with self._turn_cond:
                for m, backend in zip(self._members, originals):
                    m.backend = backend
                self._rounds = None

    def _refuse_in_rounds(self) -> None:
        """A call on the whole ensemble (reset, close) from a thread of the decode rounds: the others hold it too."""
        if isinstance(self._owner(), DecodeRounds):
            raise BusyError("a thread of decode_together() cannot reset or close the whole ensemble while the "
                            "others may use it; do it after the with block")

    def _owner(self) -> object:
        """Who asks for the ensemble: the decode rounds the calling thread takes part in, else the thread."""
        rounds = self._rounds
        return rounds if rounds is not None and rounds.in_round else threading.get_ident()

    @contextlib.contextmanager
    def _turn(self, stream: "weakref.ref[Iterator[Event]] | None" = None) -> Iterator[None]:
        """Hold the ensemble for this thread: wait while another thread holds it. ``stream``: one more open
        stream of this thread (up to ``parallel``); None: the whole ensemble (no stream of this thread open)."""
        me = self._owner()
        if stream is None:
            self._refuse_in_rounds()
        with self._turn_cond:
            # (A thread of the decode rounds may find the ensemble taken by another thread of the same rounds
            # while it waited: then it is its own.)
            while self._turn_owner is not None and self._turn_owner != me:
                self._turn_cond.wait()
            if self._turn_owner == me:
                limit = self.config.parallel if stream is not None else 0
                if len(self._open_streams) >= limit:
                    raise BusyError(_busy_message(self.config.parallel))
            else:
                self._turn_owner = me
            if stream is not None:
                self._open_streams.append(stream)
        try:
            yield
        finally:
            with self._turn_cond:
                if stream is not None:
                    self._open_streams.remove(stream)
                if not self._open_streams:
                    self._turn_owner = None
                    self._turn_cond.notify_all()

    def generate(self, prompt: str | None = None, **kwargs: object) -> GenerationResult:
        """Generate a whole answer (same arguments as :meth:`stream`)."""
        result = None
        for event in self.stream(prompt, **kwargs):  # type: ignore[arg-type]
            if event.result is not None:
                result = event.result
        assert result is not None
        return result

    def reset_cache(self) -> None:
        """Forget every member's cached context, so the next answer pays for its whole prompt.

        Answers normally reuse the cached prefix they share with the previous one (a chat's history, a
        system prompt); benchmarks call this so that no configuration inherits another's prefill.
        """
        with self._turn():
            for m in self._members:
                m.backend.reset()

    def close(self) -> None:
        """Free every model. The ensemble cannot be used afterwards.

        This thread's own open streams are closed first; another thread's answers are waited for."""
        self._refuse_in_rounds()  # before closing any stream: the rounds' streams are all the threads' own
        if self._turn_owner == self._owner():
            for ref in list(self._open_streams):
                open_stream = ref()
                if open_stream is not None:
                    open_stream.close()  # type: ignore[attr-defined]
        with self._turn():
            for m in self._members:
                m.backend.close()
            self._members = []

    def __enter__(self) -> "Ensemble":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def same_file(a: Path, b: Path) -> bool:
    """True when two paths hold the same bytes: the same file, or equal size and equal sha256."""
    try:
        if os.path.samefile(a, b):
            return True
        if a.stat().st_size != b.stat().st_size:
            return False
    except OSError:
        return False
    return _sha256(a) == _sha256(b)


def _unique(name: str, taken: list[str]) -> str:
    if name not in taken:
        return name
    i = 2
    while f"{name}#{i}" in taken:
        i += 1
    return f"{name}#{i}"


def _spec_text(spec: SpecLike) -> str:
    return spec.text if isinstance(spec, ModelSpec) else os.fspath(spec)


def _busy_message(parallel: int) -> str:
    if parallel == 1:
        return ("this thread is still streaming an answer from this ensemble; finish it or close() that stream"
                " before asking for another")
    return (f"this thread is already streaming {parallel} answers from this ensemble (parallel={parallel});"
            " finish or close() one of them before asking for another")


def _check_combinable(member: Member) -> None:
    """Refuse a member whose tokenizer cannot share text with others (with the reason)."""
    model = member.model
    probe = "Hello world, 12 + 30 = 42."
    toks = model.tokenize(probe, add_bos=False, special=False)
    if model.detokenize(toks) != probe.encode():
        raise IncompatibleMembersError(
            f"{member.name}: its tokenizer does not reproduce text byte for byte (a SentencePiece dummy space "
            "prefix?), so it cannot share one text with other members"
        )


MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs


def _check_logprobs(logprobs: object, policy: str) -> None:
    """Refuse a ``logprobs`` value that is not 0..MAX_LOGPROBS, or a policy that cannot give them."""
    if logprobs is None:
        return
    if isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_LOGPROBS:
        raise UsageError(f"logprobs must be a whole number between 0 and {MAX_LOGPROBS} (alternatives per token) or"
                         f" None; got {logprobs!r}")
    if not registry.get(policy).logprobs:
        able = ", ".join(n for n in registry.names() if registry.get(n).logprobs) or "none"
        raise UsageError(f"logprobs: policy {policy} does not report log-probabilities (an ensembled token has no one"
                         f" model that wrote it); policies that do: {able}")


def _stops(stop: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(clean_text(s, f"stop string {i}") for i, s in enumerate(stop) if s)


def _messages(prompt: str | None, messages: Sequence[dict[str, str]] | None, system: str | None) -> list[dict[str, str]]:
    if (prompt is None) == (messages is None):
        raise UsageError("give either a prompt or messages, not both and not neither")
    if prompt is not None and not isinstance(prompt, str):
        raise UsageError(f"prompt must be a string; got {type(prompt).__name__}")
    if system is not None and not isinstance(system, str):
        raise UsageError(f"system must be a string; got {type(system).__name__}")
    if messages is not None:
        from .chat import validate_messages

        msgs = validate_messages(messages)
    else:
        msgs = [{"role": "user", "content": clean_text(prompt, "the prompt")}]  # type: ignore[arg-type]
    if system:
        msgs = [{"role": "system", "content": clean_text(system, "the system prompt")}] + [
            m for m in msgs if m.get("role") != "system"]
    return msgs


def _raw_text(raw: object, prompt: str | None, messages: object, system: str | None) -> str:
    if prompt is not None or messages is not None or system is not None:
        raise UsageError("give raw text alone: no prompt, messages or system with raw (it is the whole prompt)")
    if not isinstance(raw, str):
        raise UsageError(f"raw must be a string; got {type(raw).__name__}")
    if not raw:
        raise UsageError("the raw prompt is empty; give the text to continue")
    return clean_text(raw, "the prompt")
