"""The development set of ``edge-ensemble calibrate`` (:mod:`edge_ensemble.eval.calibrate`): an eval task's items
or the user's own JSONL file, one ``{"prompt": ..., "answer": ...}`` object a line.

A reference answer that is a number is matched as GSM8K answers are; any other reference is matched against the
whole output after :func:`normalize_text`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from pathlib import Path
from typing import Any, Sequence

from edge_ensemble.errors import UsageError
from edge_ensemble.eval import scoring
from edge_ensemble.eval.tasks import Item, Task, get_task

USER_FILE_MAX_TOKENS = 256  # a user file's answers are short: the prompt asks for the answer alone


def normalize_text(text: str) -> str:
    """An answer reduced for exact matching: NFKC, lower case, white space folded, a leading "the answer is" /
    "answer:" and surrounding quotes, asterisks and punctuation dropped."""
    s = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    s = re.sub(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*", "", s)
    return s.strip(" \t\"'`*_.,;:!?()[]{}")


def _is_number(answer: str) -> bool:
    return scoring.normalize_number(answer) is not None


def _file_extract(item: Item, text: str) -> str | None:
    return scoring.extract_gsm8k_answer(text) if _is_number(item.gold) else normalize_text(text)


def _file_score(item: Item, extracted: str | None) -> tuple[bool, str]:
    if _is_number(item.gold):
        return scoring.numbers_equal(extracted, item.gold), ""
    return extracted is not None and extracted == normalize_text(item.gold), ""


def load_dev_file(path: str | os.PathLike[str]) -> Task:
    """The user's JSONL development file as a :class:`Task`; a :class:`UsageError` naming ``file:line`` for a
    line that is not a JSON object with a non-empty string ``prompt`` and a string or number ``answer``.

    The task is named after the file and a hash of its content, so an edited file never resumes old records.
    """
    path = Path(path).expanduser()
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except OSError as e:
        raise UsageError(f"cannot read development file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"development file {path} is not UTF-8 text") from None
    items: list[Item] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise UsageError(f'{where}: expected an object {{"prompt": ..., "answer": ...}}; got {type(row).__name__}')
        missing = [k for k in ("prompt", "answer") if k not in row]
        if missing:
            raise UsageError(f'{where}: missing {" and ".join(map(repr, missing))} (each line is '
                             '{"prompt": ..., "answer": ...})')
        prompt, answer = row["prompt"], row["answer"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"{where}: prompt must be a non-empty string; got {prompt!r}")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            raise UsageError(f"{where}: answer must be a non-empty string or a number; got {answer!r}")
        item_id = str(row.get("id", number))
        if item_id in seen:
            raise UsageError(f"{where}: id {item_id!r} is used twice")
        seen.add(item_id)
        items.append(Item(id=item_id, gold=str(answer).strip(), data={"prompt": prompt}))
    if not items:
        raise UsageError(f"development file {path} holds no items")
    name = f"file-{path.stem}-{hashlib.sha256(data).hexdigest()[:8]}"
    return Task(name, lambda: items, lambda item: [{"role": "user", "content": item.data["prompt"]}],
                _file_extract, _file_score, max_tokens=USER_FILE_MAX_TOKENS, dev_limit=None)


def dev_task(task: str | None = None, file: str | os.PathLike[str] | None = None) -> Task:
    """The development set: the eval task called ``task`` or the JSONL ``file`` (exactly one of them)."""
    if (task is None) == (file is None):
        raise UsageError("give the development set: either --task NAME or --file FILE.jsonl")
    return get_task(task) if task is not None else load_dev_file(file)  # type: ignore[arg-type]


def describe_dev_set(task: Task, file: Any, items: Sequence[Item], start: int) -> str:
    source = str(Path(file).expanduser().resolve()) if file is not None else task.name
    return f"{source} items {start}-{start + len(items) - 1}"


__all__ = ["USER_FILE_MAX_TOKENS", "dev_task", "describe_dev_set", "load_dev_file", "normalize_text"]
