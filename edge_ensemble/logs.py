"""The conversation log: every exchange of ``run``, ``chat`` and ``serve`` kept in one SQLite database.

Where: :func:`edge_ensemble.paths.logs_path` (``$EDGE_ENSEMBLE_LOGS``, else ``logs.db`` in the user data directory,
``~/.local/share/edge-ensemble/`` on Linux). One row per answer (:class:`Exchange`): when, which command, the
conversation it belongs to, the prompt (and the whole message list), the answer, the members, the policy and its
options, the statistics, the provenance (which member wrote which stretch) and a branching policy's answers.

Writing never holds up or breaks an answer: it happens after the answer is shown, and a database that is locked
(past :data:`BUSY_SECONDS`), read-only, damaged or newer than this code is one warning line, the answer stands
(:meth:`Logbook.record`). The database runs in WAL mode and each row is written by one statement (its own
transaction), so a process killed mid-write leaves the rows before it, readable; two processes writing at once
wait their turn (SQLite's busy timeout) and both land.

The schema has a version (``PRAGMA user_version``) and :data:`MIGRATIONS`, applied in order, each in one
transaction, when a database older than this code is opened; a newer one is left alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from . import paths
from .errors import UsageError, warn
from .options import GENERATION, Option
from .policies import registry

if TYPE_CHECKING:
    from .api import Ensemble
    from .engine import GenerationResult

# Declared once: the --log/--no-log flag of run, chat and serve and the config key ``log``.
LOG = Option("log", bool, True, "Keep each exchange in the conversation log (`edge-ensemble logs`; "
             "`logs path` says where).")

SOURCES = ("run", "chat", "serve")
# How long a write waits for another process's (SQLite's busy timeout); a row takes milliseconds to write.
BUSY_SECONDS = 5.0

# Migration i takes a database from version i to i + 1: statements run in one transaction (SQLite's DDL is
# transactional), so a killed migration leaves the old version whole. Append; never edit one that shipped.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the exchanges
    ("""CREATE TABLE exchanges (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,          -- UTC, ISO 8601
            source TEXT NOT NULL,        -- run | chat | serve
            conversation TEXT,           -- shared by the turns of one chat (and the choices of one request)
            prompt TEXT NOT NULL,        -- the last user message, or the raw text
            messages TEXT,               -- JSON: the whole message list sent (none for raw text)
            answer TEXT NOT NULL,
            finish_reason TEXT,
            members TEXT NOT NULL,       -- JSON: [{name, role, path, architecture}], the drafter first
            policy TEXT,
            options TEXT,                -- JSON: the policy's options and the generation options
            stats TEXT                   -- JSON: GenerationStats.to_dict()
        )""",),
    # 2: where each stretch of the answer came from, a branching policy's answers, the preset; a chat's turns
    ("ALTER TABLE exchanges ADD COLUMN provenance TEXT",  # JSON: [{kind, text, winner}]
     "ALTER TABLE exchanges ADD COLUMN branches TEXT",  # JSON: [BranchInfo], or NULL
     "ALTER TABLE exchanges ADD COLUMN preset TEXT",
     "CREATE INDEX exchanges_conversation ON exchanges (conversation)"),
)
SCHEMA_VERSION = len(MIGRATIONS)

_COLUMNS = ("time", "source", "conversation", "prompt", "messages", "answer", "finish_reason", "members", "policy",
            "options", "stats", "provenance", "branches", "preset")
_JSON = frozenset({"messages", "members", "options", "stats", "provenance", "branches"})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Exchange:
    """One logged answer (a row); ``id`` is None until it is written."""

    source: str
    prompt: str
    answer: str
    finish_reason: str | None
    members: list[dict[str, Any]]
    policy: str | None
    options: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    provenance: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] | None = None
    branches: list[dict[str, Any]] | None = None
    preset: str | None = None
    conversation: str | None = None
    time: str = field(default_factory=_now)
    id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as ``logs --json`` prints it (the id first)."""
        out = dataclasses.asdict(self)
        return {"id": out.pop("id"), **out}


def exchange(source: str, ensemble: "Ensemble", result: "GenerationResult", *,
             messages: Sequence[Mapping[str, Any]] | None = None, raw: str | None = None,
             call: Mapping[str, Any] | None = None, preset: str | None = None,
             conversation: str | None = None) -> Exchange:
    """The :class:`Exchange` of ``result``, answered by ``ensemble`` to ``messages`` (or the ``raw`` text) with
    the keyword arguments ``call`` of :meth:`~edge_ensemble.api.Ensemble.stream` (the generation options, and a
    policy and policy options in place of the ensemble's own)."""
    call = dict(call or {})
    prompt = raw if raw is not None else next(
        (m["content"] for m in reversed(messages or []) if m.get("role") == "user"), "")
    d = result.to_dict()
    return Exchange(
        source=source, prompt=prompt, answer=result.text, finish_reason=result.finish_reason,
        members=[{"name": m.name, "role": m.role, "path": str(m.path), "architecture": m.architecture}
                 for m in ensemble.members],
        policy=result.stats.policy, options=_options(ensemble, call), stats=d["stats"], provenance=d["provenance"],
        messages=None if messages is None else [dict(m) for m in messages], branches=d.get("branches"),
        preset=preset, conversation=conversation)


def _options(ensemble: "Ensemble", call: Mapping[str, Any]) -> dict[str, Any]:
    """The policy's options as the answer used them (the ensemble's, with the call's in their place), then the
    generation options."""
    generation = {name: call.get(name, o.default) for name, o in GENERATION.items()}
    overrides = {k: v for k, v in call.items() if k == "policy" or k in registry.policy_options()}
    try:
        config = dataclasses.replace(ensemble.config, **overrides)
        policy = dataclasses.asdict(config.policy_options())
    except Exception:  # noqa: BLE001 - the answer was made with these; a log keeps what it can
        policy = {k: v for k, v in overrides.items() if k != "policy"}
    return {**policy, **generation}


class LogError(UsageError):
    """The log cannot be read or written; one line naming the file and what to do (exit 2 in ``logs``).
    ``lasting``: trying again in this process would fail the same way (read-only, damaged, newer)."""

    def __init__(self, message: str, lasting: bool = True) -> None:
        super().__init__(message)
        self.lasting = lasting


def _damaged(path: Path, what: str) -> LogError:
    return LogError(f"the conversation log {path} {what}; move it away and a new one starts: mv {path} {path}.bad")


def _problem(path: Path, exc: BaseException) -> LogError:
    """``exc`` (from sqlite3 or the file system) as one line naming the file and what to do."""
    text = str(exc).lower()
    if isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
        return LogError(f"the conversation log {path} stayed locked by another process for {BUSY_SECONDS:g} s",
                        lasting=False)
    if isinstance(exc, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text
                                                   or "corrupt" in text):
        return _damaged(path, f"is damaged or not a SQLite database ({exc})")
    reason = getattr(exc, "strerror", None) or str(exc)
    return LogError(f"cannot write the conversation log {path} ({reason}); make it writable, or turn the log off "
                    f"with --no-log or `log = false` in the config file")


class Logbook:
    """The conversation log at ``path`` (default: :func:`~edge_ensemble.paths.logs_path`). Each call opens its
    own connection: a logbook may be used from any thread, and by several processes at once."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, busy_seconds: float = BUSY_SECONDS) -> None:
        self.path = Path(path) if path is not None else paths.logs_path()
        self.busy_seconds = busy_seconds
        self._failed: str | None = None  # a lasting failure, already reported once

    # -- writing ------------------------------------------------------------------------------------------------

    def add(self, entry: Exchange) -> int:
        """Write ``entry``; its id. The file (and its directory) is made on first use. Raises :class:`LogError`."""
        values = [_stored(name, getattr(entry, name)) for name in _COLUMNS]
        with self._connection(create=True) as conn:
            try:
                cursor = conn.execute(f"INSERT INTO exchanges ({', '.join(_COLUMNS)}) "
                                      f"VALUES ({', '.join('?' * len(_COLUMNS))})", values)
            except (sqlite3.Error, OSError) as exc:
                raise _problem(self.path, exc) from None
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def record(self, entry: Exchange | Callable[[], Exchange], report: Callable[[str], None] = warn) -> int | None:
        """Write ``entry`` (or the one it makes: a failure to make it is caught too) as :meth:`add` does, but
        never raise: a failure is one line to ``report`` (a warning) and None. A lasting failure (read-only,
        damaged) is reported once; later entries are dropped quietly."""
        if self._failed is not None:
            return None
        try:
            return self.add(entry if isinstance(entry, Exchange) else entry())
        except LogError as exc:
            if exc.lasting:
                self._failed = str(exc)
            report(f"{exc}; this answer was not logged")
        except Exception as exc:  # noqa: BLE001 - the log must never break an answer
            self._failed = str(exc)
            report(f"the conversation log {self.path} failed ({type(exc).__name__}: {exc}); this answer was not logged")
        return None

    # -- reading ------------------------------------------------------------------------------------------------

    def recent(self, n: int = 10, query: str | None = None, source: str | None = None) -> list[Exchange]:
        """The ``n`` most recent exchanges (0: all), oldest first, those whose prompt or answer holds ``query``
        (any case for ASCII) when given, from ``source`` when given. None yet: []."""
        where, args = [], []
        if query:
            pattern = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where.append("(prompt LIKE ? ESCAPE '\\' OR answer LIKE ? ESCAPE '\\')")
            args += [pattern, pattern]
        if source:
            where.append("source = ?")
            args.append(source)
        sql = ("SELECT * FROM exchanges" + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY id DESC" + (" LIMIT ?" if n else ""))
        rows = self._select(sql, [*args, n] if n else args)
        return list(reversed(rows))

    def get(self, exchange_id: int) -> Exchange | None:
        """The exchange ``exchange_id``, or None."""
        rows = self._select("SELECT * FROM exchanges WHERE id = ?", [exchange_id])
        return rows[0] if rows else None

    def conversation(self, conversation: str) -> list[Exchange]:
        """Every exchange of ``conversation``, in order."""
        return self._select("SELECT * FROM exchanges WHERE conversation = ? ORDER BY id", [conversation])

    def count(self) -> int:
        """How many exchanges the log holds."""
        if not self.path.exists():
            return 0
        with self._connection(create=False) as conn:
            try:
                return int(conn.execute("SELECT count(*) FROM exchanges").fetchone()[0])
            except sqlite3.Error as exc:
                raise _problem(self.path, exc) from None

    def _select(self, sql: str, args: Sequence[Any]) -> list[Exchange]:
        if not self.path.exists():  # reading never creates the file
            return []
        with self._connection(create=False) as conn:
            try:
                cursor = conn.execute(sql, list(args))
                names = [d[0] for d in cursor.description]
                return [_exchange(dict(zip(names, row)), self.path) for row in cursor.fetchall()]
            except sqlite3.Error as exc:
                raise _problem(self.path, exc) from None

    # -- the connection -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _connection(self, *, create: bool) -> Iterator[sqlite3.Connection]:
        """A connection to the log, migrated to :data:`SCHEMA_VERSION`, closed afterwards. ``create``: make the
        directory (owner only) and the file (owner read-write: conversations are private) if missing."""
        if self.path.is_dir():
            raise LogError(f"the conversation log {self.path} is a directory; remove it, or point "
                           f"${paths.LOGS_ENV} at a file")
        try:
            if create and not self.path.exists():
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            # isolation_level None: no implicit transactions; a row is one statement, a migration one BEGIN
            conn = sqlite3.connect(self.path, timeout=self.busy_seconds, isolation_level=None)
        except (sqlite3.Error, OSError) as exc:
            raise _problem(self.path, exc) from None
        try:
            try:
                _migrate(conn, self.path, wal=create)
            except (sqlite3.Error, OSError) as exc:
                raise _problem(self.path, exc) from None
            yield conn
        finally:
            conn.close()


def _migrate(conn: sqlite3.Connection, path: Path, *, wal: bool) -> None:
    """Bring the database to :data:`SCHEMA_VERSION` (WAL mode first, when writing); a newer one is refused."""
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")  # kept by the file: readers never block the writer, nor it them
        conn.execute("PRAGMA synchronous=NORMAL")  # with WAL: a killed process loses nothing committed
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise LogError(f"the conversation log {path} was written by a newer edge-ensemble (schema {version}; this "
                       f"one reads up to {SCHEMA_VERSION}); upgrade edge-ensemble, or move it away: mv {path} {path}.bad")
    conn.execute("BEGIN IMMEDIATE")  # one migrator at a time; another process waits, then finds it done
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for statements in MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _clean(text: str) -> str:
    """``text`` as SQLite can store it (a lone surrogate from undecodable input becomes U+FFFD)."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _stored(name: str, value: Any) -> Any:
    if name in _JSON:
        return None if value is None else _clean(json.dumps(value, ensure_ascii=False, default=str))
    return _clean(value) if isinstance(value, str) else value


def _exchange(row: dict[str, Any], path: Path) -> Exchange:
    """A row as an :class:`Exchange` (a row of an older schema has None where a newer column is)."""
    try:
        values = {k: (json.loads(v) if k in _JSON and v is not None else v) for k, v in row.items()}
    except ValueError as exc:
        raise _damaged(path, f"holds a damaged row {row.get('id')} ({exc})") from None
    for name in ("options", "stats"):
        values[name] = values.get(name) or {}
    values["provenance"] = values.get("provenance") or []
    known = {f.name for f in dataclasses.fields(Exchange)}
    return Exchange(**{k: v for k, v in values.items() if k in known})


class Writer:
    """Writes exchanges on a thread of its own, in order (the server: neither its event loop nor its decoding
    threads wait for the disk); :meth:`close` writes what is queued, then stops the thread."""

    def __init__(self, logbook: Logbook, report: Callable[[str], None] = warn) -> None:
        self.logbook, self.report = logbook, report
        self._queue: "queue.SimpleQueue[Callable[[], Sequence[Exchange]] | None]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="edge-ensemble-log", daemon=True)
        self._thread.start()

    def put(self, make: Callable[[], Sequence[Exchange]]) -> None:
        """Queue the exchanges ``make()`` returns (made on the writer's thread too)."""
        self._queue.put(make)

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            make = self._queue.get()
            if make is None:
                return
            try:
                entries = make()
            except Exception as exc:  # noqa: BLE001 - a bad record must not stop the log
                self.report(f"an answer could not be logged ({type(exc).__name__}: {exc})")
                continue
            for entry in entries:
                self.logbook.record(entry, self.report)
