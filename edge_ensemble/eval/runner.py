"""Run a task over several generation configs and append one JSONL record per (item, config).

The results file is the checkpoint: a rerun reads it, skips the pairs already recorded and appends the
rest, so a killed run loses at most the record being written.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import typing
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, TextIO

from edge_ensemble import paths
from edge_ensemble.errors import Cancelled, EdgeEnsembleError
from edge_ensemble.eval.tasks import Task, get_task


class GenerationConfig(Protocol):
    """What the runner needs from an engine configuration."""

    name: str

    def generate(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        """Return at least {"text", "tokens", "seconds", "ensembled_fraction"}."""
        ...

    # Optional: ``parallel`` above 1 and the rest of TogetherConfig, to decode several items' answers at once.


# Bumped when how answers are produced or timed changes, so that a resumed run never mixes two ways:
# 1 = answers could reuse a prompt another configuration had just prefilled; 2 = every answer prefills its
# prompt from scratch (Ensemble.reset_cache), which is fair for timing and can change greedy output slightly.
HARNESS_VERSION = 2

Protocol = tuple[int, int, "int | None"]


def protocol_of(record: dict[str, Any]) -> Protocol:
    """(harness version, prompt version, token budget) a record was made with; old records lack the versions."""
    harness = record.get("harness_version")
    if harness is None:
        # Records written before the field existed: "prompt_seconds" came in with the same change as the
        # from-scratch prefill, so it tells the two apart.
        harness = 2 if "prompt_seconds" in record else 1
    return harness, record.get("prompt_version", 1), record.get("max_tokens")


def describe_protocol(protocol: Protocol) -> str:
    harness, prompt, budget = protocol
    return f"harness {harness}, prompt version {prompt}, --max-tokens {budget if budget is not None else 'unknown'}"


def results_path(out_dir: str | os.PathLike[str], task_name: str) -> Path:
    """Where the records of ``task_name`` live: ``out_dir/<task>.jsonl``."""
    return Path(out_dir) / f"{task_name}.jsonl"


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a results file; an unterminated last line (a killed write) is ignored."""
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # last line without "\n": a write cut short
                continue
            raise EdgeEnsembleError(f"{path}:{number} is not valid JSON; fix or delete that line and rerun") from None
    return records


def repair_tail(path: Path) -> None:
    """Make the file end with a newline: drop a partial last record, or terminate a complete one."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
    except (json.JSONDecodeError, UnicodeDecodeError):
        with open(path, "r+b") as f:
            f.truncate(cut)
        return
    with open(path, "ab") as f:
        f.write(b"\n")


class Progress:
    """A one-line progress bar on stderr: count, percentage, rate and ETA (new lines when not a terminal)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total, self.label, self.done = total, label, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > 0
        self.tty = self.stream.isatty()
        self.start = time.monotonic()
        self._last_line = 0.0
        self.note = ""
        self.correct = 0  # records scored right so far (a bar kept over several runs counts them all)

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        self.note = note or self.note
        now = time.monotonic()
        # Without a terminal, a line at most every 30 s (and at the end) keeps logs short.
        if self.enabled and (self.tty or self.done == self.total or now - self._last_line >= 30):
            self._last_line = now
            self._write(now)

    def _write(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        width = 24
        filled = int(width * self.done / self.total)
        line = (
            f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{100 * self.done / self.total:3.0f}%  {rate * 60:.1f}/min  ETA {_clock(eta)}"
            + (f"  {self.note}" if self.note else "")
        )
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # NaN: no rate yet
        return "--:--"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


def run_eval(
    task: Task | str,
    configs: Sequence[GenerationConfig],
    out_dir: str | os.PathLike[str],
    *,
    start: int = 0,
    limit: int | None = None,
    max_tokens: int | None = None,
    progress: bool = True,
    bar: Progress | None = None,
    shard: tuple[int, int] | None = None,
) -> Path:
    """Generate and score every (item, config) pair not yet in ``out_dir/<task>.jsonl``; return that path.

    Items are taken in dataset order from ``start`` (``limit=None``: the task's development slice). For each
    item every config runs before the next item, so an interrupted run still compares configs on the same
    items (configs with ``parallel`` above 1: in chunks of items, see :func:`_run_pass`); a config that builds
    on another's records of the whole run (``builds_on``: EAGER-adapt) runs after all of them, once its
    ``plan`` has read them. Each record is flushed and fsynced as soon as it is made. ``bar``: a progress bar the caller keeps over several calls (its total is the caller's to set).
    ``shard=(k, n)``: generate only the slice's items at positions k, k + n, k + 2n, ... (one of n processes or
    machines splitting a run; join their records with :func:`share_records`); a second pass still plans over
    the whole slice, so every shard needs the first pass's records of all of it.
    """
    task = get_task(task) if isinstance(task, str) else task
    names = [config.name for config in configs]
    if len(set(names)) != len(names):
        raise EdgeEnsembleError(f"config names must be distinct, got {names}")
    items = task.items(start, limit)
    budget = max_tokens if max_tokens is not None else task.max_tokens
    mine = items if shard is None else items[shard[0]::shard[1]]

    path = results_path(paths.make_out_dir(out_dir), task.name)
    repair_tail(path)
    protocol = (HARNESS_VERSION, task.prompt_version, budget)
    # A configuration that builds on another's records of the whole run (EAGER-adapt on eager's) goes second,
    # once those are complete; its records count as done only when made under the same plan (the same slice
    # and first-pass records: a rerun over a longer slice re-plans, and supersedes them).
    first = [c for c in configs if getattr(c, "builds_on", None) is None]
    second = [c for c in configs if getattr(c, "builds_on", None) is not None]
    earlier = [r for r in read_records(path) if r.get("task") == task.name]
    done = {(r.get("item"), r.get("config")) for r in earlier}
    _run_pass(task, path, earlier, protocol, [(item, c) for item in mine for c in first
                                              if (item.id, c.name) not in done], budget, progress, bar)
    if second:
        run = [r for r in read_records(path) if r.get("task") == task.name]
        for config in second:
            config.plan(run, [i.id for i in items])  # type: ignore[attr-defined]
        planned = {(r.get("item"), r.get("config")) for r in run
                   if any(r.get("config") == c.name and r.get("plan") == c.plan_signature for c in second)}  # type: ignore[attr-defined]
        _run_pass(task, path, run, protocol, [(item, c) for item in mine for c in second
                                              if (item.id, c.name) not in planned], budget, progress, bar)
    return path


def _run_pass(task: Task, path: Path, earlier: Sequence[dict[str, Any]], protocol: Protocol,
              todo: Sequence[tuple[Any, GenerationConfig]], budget: int | None, progress: bool,
              bar: Progress | None = None) -> None:
    """Generate, score and append the records of ``todo``, each flushed and fsynced as soon as it is made.

    A config whose ``parallel`` is above 1 decodes that many items' answers together (one thread each, their
    decodes batched); the pairs then go in chunks of items, each chunk one config after another, so that an
    interrupted run still compares the configs on nearly the same items."""
    if not todo:  # a finished file is only re-reported, whatever made it
        return
    check_same_protocol(path, earlier, protocol)
    own_bar = bar is None
    bar = bar if bar is not None else Progress(len(todo), task.name, enabled=progress)
    try:
        with open(path, "a", encoding="utf-8") as out:
            writer = _Writer(out, bar)
            if all(_width(c) == 1 for _, c in todo):
                for item, config in todo:
                    writer.write(_evaluate(task, item, config, budget))
                return
            for chunk in _item_chunks(todo, TOGETHER_CHUNK * max(_width(c) for _, c in todo)):
                by_config: dict[str, tuple[GenerationConfig, list[Any]]] = {}  # (config names are distinct)
                for item, config in chunk:
                    by_config.setdefault(config.name, (config, []))[1].append(item)
                for config, items in by_config.values():
                    if _width(config) > 1:
                        _evaluate_together(task, items, config, budget, writer)  # type: ignore[arg-type]
                    else:
                        for item in items:
                            writer.write(_evaluate(task, item, config, budget))
    finally:
        if own_bar:
            bar.close()


def _width(config: GenerationConfig) -> int:
    """How many items' answers ``config`` decodes together (1: one at a time)."""
    return int(getattr(config, "parallel", 1))


# Items per chunk, in multiples of the answers decoded together: a chunk's last answers run with fewer beside
# them, so longer chunks batch better; shorter ones keep the configs' item sets closer when a run is cut short.
TOGETHER_CHUNK = 4


class _Writer:
    """Appends records to the open results file (flushed and fsynced each), from any thread, and moves the bar."""

    def __init__(self, out: TextIO, bar: Progress) -> None:
        self.out, self.bar = out, bar
        self.lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.out.flush()
            os.fsync(self.out.fileno())
            self.bar.correct += record["correct"]
            self.bar.update(note=f"acc {self.bar.correct}/{self.bar.done + 1}  {record['config']}: "
                                 f"{record['tokens_per_second'] or 0:.1f} tok/s")


def _item_chunks(todo: Sequence[tuple[Any, GenerationConfig]], size: int) -> list[list[tuple[Any, GenerationConfig]]]:
    """``todo`` cut into runs of pairs covering ``size`` items each (in the order the items come)."""
    chunks: list[list[tuple[Any, GenerationConfig]]] = []
    seen: dict[Any, None] = {}
    for pair in todo:
        if pair[0].id not in seen and len(seen) % size == 0:
            chunks.append([])
        seen.setdefault(pair[0].id)
        chunks[-1].append(pair)
    return chunks


class TogetherConfig(GenerationConfig, typing.Protocol):  # (Protocol is this module's record protocol)
    """A config that can decode several items' answers at once (see EngineConfig)."""

    parallel: int

    def decoding_together(self) -> AbstractContextManager[Any]:
        """While it runs, threads taking part in the rounds it yields may call generate at once."""
        ...

    def cancel(self) -> None:
        """End the answers in progress at their next token (they raise Cancelled)."""
        ...


def _evaluate_together(task: Task, items: Sequence[Any], config: TogetherConfig, budget: int | None,
                       writer: _Writer) -> None:
    """``config``'s answers to ``items``, ``config.parallel`` at a time, each by its own thread taking part in
    the decode rounds only while it generates (so the answers' decodes go to llama.cpp together, and scoring,
    which may run a sandboxed test, holds up no other answer); each record is written as soon as it is made.
    On an error or Ctrl-C the answers in progress are cancelled, the threads joined, and the error raised."""
    pending = iter(items)
    lock = threading.Lock()
    failures: list[BaseException] = []

    with config.decoding_together() as rounds:
        def work() -> None:
            while not failures:
                with lock:
                    item = next(pending, None)
                if item is None:
                    return
                try:
                    with rounds.taking_part():
                        result, wall = _generate(task, item, config, budget)
                    record = _record(task, item, config, budget, result, wall)
                    record["decoded_together"] = config.parallel  # its seconds are shared with the others'
                    writer.write(record)
                except BaseException as exc:  # noqa: BLE001 - raised again in the calling thread
                    failures.append(exc)
                    config.cancel()

        threads = [threading.Thread(target=work, name=f"eval-{n}", daemon=True)
                   for n in range(min(config.parallel, len(items)))]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        except BaseException as exc:  # Ctrl-C: the answers in progress stop at their next token
            failures.append(exc)
            config.cancel()
            for t in threads:
                if t.is_alive():
                    t.join()
            raise
    real = [f for f in failures if not isinstance(f, Cancelled)]
    if real:
        raise real[0]


def check_same_protocol(path: Path, records: Sequence[dict[str, Any]], protocol: Protocol) -> None:
    """Refuse to add to a file made another way (harness, prompt, budget): its numbers would not compare."""
    for record in records:
        if protocol_of(record) != protocol:
            raise EdgeEnsembleError(
                f"{path} holds {record.get('task')} records made with {describe_protocol(protocol_of(record))}; "
                f"this run uses {describe_protocol(protocol)}: pass another --out (or move the file away) so "
                "the two are not mixed"
            )


def share_records(source: Path, dest: Path, task: Task | str, config: str, *, start: int = 0,
                  limit: int | None = None, as_config: str | None = None) -> int:
    """Append to ``dest`` the records of ``config`` in ``source`` for the items of the slice that ``dest``
    lacks, and return how many. Both files must hold records made the same way (see :func:`protocol_of`).

    For a member that two result sets share (same GGUF, same settings): its single-model answers do not
    depend on which other models were loaded, so generating them twice only costs time. ``as_config`` files
    them under another name: the same settings that another command names otherwise (eval's ``safe-gated`` is
    calibrate's ``safe w=1 gate=0.5`` on equal weights); the caller vouches for that, and each such record
    keeps its first name as ``shared_from``.
    """
    task = get_task(task) if isinstance(task, str) else task
    wanted = {item.id for item in task.items(start, limit)}
    ours = [r for r in read_records(source) if r.get("task") == task.name and r.get("config") == config]
    if not ours:
        raise EdgeEnsembleError(f"{source} has no {task.name} records of {config}")
    protocol = protocol_of(ours[0])
    check_same_protocol(source, ours, protocol)
    repair_tail(dest)
    theirs = [r for r in read_records(dest) if r.get("task") == task.name]
    check_same_protocol(dest, theirs, protocol)
    name = as_config or config
    have = {r.get("item") for r in theirs if r.get("config") == name}
    new = [r if name == config else {**r, "config": name, "shared_from": r.get("shared_from", f"{source}: {config}")}
           for r in ours if r["item"] in wanted and r["item"] not in have]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "a", encoding="utf-8") as out:
        out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in new)
    return len(new)


def _evaluate(task: Task, item: Any, config: GenerationConfig, max_tokens: int) -> dict[str, Any]:
    """One (item, config) pair's record: the answer generated, then scored."""
    return _record(task, item, config, max_tokens, *_generate(task, item, config, max_tokens))


def _generate(task: Task, item: Any, config: GenerationConfig, max_tokens: int) -> tuple[dict[str, Any], float]:
    """``config``'s answer to ``item`` and the wall seconds it took."""
    messages = task.build_messages(item)
    began = time.perf_counter()
    if getattr(config, "branching", False):
        result = config.generate(messages, max_tokens, extract=lambda text: task.vote_answer(item, text),  # type: ignore[call-arg]
                                 item=item.id)
    else:
        result = config.generate(messages, max_tokens)
    return result, time.perf_counter() - began


def _record(task: Task, item: Any, config: GenerationConfig, max_tokens: int, result: dict[str, Any],
            wall: float) -> dict[str, Any]:
    """The record of ``result`` (``config``'s answer to ``item``), scored."""
    text = str(result.get("text", ""))
    tokens = int(result.get("tokens", 0))
    seconds = float(result.get("seconds", wall))
    extracted = task.extract(item, text)
    correct, detail = task.score(item, extracted)
    record: dict[str, Any] = {
        "task": task.name,
        "item": item.id,
        "config": config.name,
        "output": text,
        "extracted": extracted,
        "gold": item.gold,
        "correct": bool(correct),
        "tokens": tokens,
        "seconds": round(seconds, 4),  # prompt included
        "tokens_per_second": round(tokens / seconds, 3) if seconds > 0 else None,
        "ensembled_fraction": result.get("ensembled_fraction"),
        "max_tokens": max_tokens,
        "prompt_version": task.prompt_version,
        "harness_version": HARNESS_VERSION,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for optional in ("prompt_seconds", "finish_reason", "generated_tokens", "reallocated", "first_pass_branches",
                     "plan", "settings", "routed_tokens", "route_decisions", "catch_up_tokens", "catch_up_seconds",
                     "member_decoded_tokens", "member_decode_seconds", "policy_figures"):
        if result.get(optional) is not None:
            record[optional] = result[optional]
    if result.get("branches"):  # cons@M is the voted answer's score; pass@M: any branch right
        record["branches"] = [{**b, "correct": bool(task.score(item, b["answer"])[0])} for b in result["branches"]]
        record["pass_at_k"] = any(b["correct"] for b in record["branches"])
    if detail:
        record["detail"] = detail
    return record
