"""``edge-ensemble route train``: fit a FusionRoute selection head (:mod:`edge_ensemble.routing`) on a laptop.

1. **Data.** Reference solutions as the assistant's answer to the evaluation prompt: GSM8K test items 200-799
   (the evaluation slices use items 0-199) and MBPP's 500 test problems (no evaluation uses MBPP).
2. **Teacher forcing.** For each item every expert decodes prompt + reference in one prefill, with logits at
   every answer position; only what the labels and the β fit need is kept: each expert's argmax, its
   log-probability of the reference token, and whether log π_k + β log π_router puts the reference token first
   for each β of the grid. The router's last hidden state is kept where it matters: at the positions where the
   experts' outcomes differ. When the router is one of the experts (the default), one decode serves both.
3. **Labels.** An informative position (FusionRoute's): exactly one expert puts the reference token first; the
   label is that expert.
4. **Fit.** Items are split (seeded) into train / held-out / test. A multinomial logistic regression on the
   train items' informative positions, early-stopped on the held-out ones; β maximises the held-out share of
   reference tokens ranked first under the head's choice (all positions); the report gives test figures.

Features are cached per item on disk (written atomically): an interrupted run resumes where it stopped, and
the same models and items give the same bytes. The data, the features and the whole run are here; the fit and its
report (steps 3 and 4) are :mod:`edge_ensemble.route_fit`, whose names are importable from here too.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import IncompatibleMembersError, UsageError
from .route_fit import (DATA_VERSION, L2_GRID, Models, Split, TrainResult, fit_from_features,  # (re-exported)
                        report_markdown, split_items)
from .routing import BETA_GRID, file_sha256, text_array, write_npz  # (BETA_GRID re-exported)
from .model_file import ModelFile
from .options import EVAL_N_CTX
from .runtime import LoadOptions, Model, SeqRequest, common_prefix_len

GSM8K_FIRST = 200  # GSM8K test items before this one are evaluation slices
GSM8K_MAX = 600  # items 200..799
MBPP_MAX = 500


@dataclass(frozen=True)
class TrainItem:
    """One training example: the conversation the evaluation would ask, and the reference answer."""

    source: str
    id: str
    messages: list[dict[str, str]]
    reference: str
    # The same conversation with the item's own text left out: the template and instruction all items of the
    # source share. Its tokens are decoded once and reused (see :func:`_decode_answer`).
    shared: list[dict[str, str]] | None = None

    @property
    def key(self) -> str:
        return f"{self.source}-{self.id}"


# -- data -------------------------------------------------------------------------------------------------------


def gsm8k_reference(answer: str) -> str:
    """A GSM8K solution as an answer in the evaluation's format: calculator marks ``<<...>>`` removed, the final
    ``#### N`` as "The answer is N."."""
    body, _, final = answer.rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return f"{body}\nThe answer is {final.strip()}."


def mbpp_messages(doc: dict) -> list[dict[str, str]]:
    tests = "\n".join(doc["test_list"])
    return [{"role": "user", "content": (
        "Write a Python function for the following task. Reply with the complete function in a single ```python "
        f"code block.\n\nTask: {doc['text']}\nIt must pass these tests:\n```python\n{tests}\n```")}]


def mbpp_reference(code: str) -> str:
    lines = [line.rstrip() for line in code.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "```python\n" + "\n".join(lines).strip("\n") + "\n```"


def training_items(gsm8k: int = GSM8K_MAX, mbpp: int = MBPP_MAX) -> list[TrainItem]:
    """GSM8K test items 200 .. 200 + ``gsm8k`` - 1 and the first ``mbpp`` MBPP test problems."""
    from .eval.tasks import TASKS, Item, _olmo_docs

    if not (0 <= gsm8k <= GSM8K_MAX and 0 <= mbpp <= MBPP_MAX and gsm8k + mbpp > 0):
        raise UsageError(f"--gsm8k must be 0 to {GSM8K_MAX} and --mbpp 0 to {MBPP_MAX}, not both 0;"
                         f" got {gsm8k} and {mbpp}")
    items = []
    task = TASKS["gsm8k"]
    shared = task.build_messages(Item("", "", {"question": ""}))
    for doc in _olmo_docs("gsm8k/gold_bpb_5shot")[GSM8K_FIRST:GSM8K_FIRST + gsm8k]:
        messages = task.build_messages(Item(str(doc["id"]), "", {"question": doc["question"]}))
        items.append(TrainItem("gsm8k", str(doc["id"]), messages, gsm8k_reference(doc["answer"]), shared))
    shared = mbpp_messages({"text": "", "test_list": []})
    for doc in _olmo_docs("codex_mbpp/gold_bpb_0shot")[:mbpp]:
        items.append(TrainItem("mbpp", str(doc["task_id"]), mbpp_messages(doc), mbpp_reference(doc["code"]),
                               shared))
    return items


def describe_items(items: Sequence[TrainItem]) -> str:
    counts = {s: sum(1 for i in items if i.source == s) for s in dict.fromkeys(i.source for i in items)}
    parts = []
    for source, n in counts.items():
        if source == "gsm8k":
            parts.append(f"GSM8K test items {GSM8K_FIRST}-{GSM8K_FIRST + n - 1} ({n})")
        elif source == "mbpp":
            parts.append(f"MBPP test problems, first {n}")
        else:
            parts.append(f"{source} ({n})")
    return " + ".join(parts) + "; reference solutions teacher-forced"


# -- features ---------------------------------------------------------------------------------------------------


def item_features(models: Models, item: TrainItem) -> dict[str, np.ndarray]:
    """What the fit needs of one item (see the module docstring), from one prefill per distinct model."""
    router = models.router
    logits: dict[int, np.ndarray] = {}  # id(model) -> (answer positions, n_vocab)
    hidden = None
    ref: list[int] | None = None
    for model in {id(m): m for m in [*models.experts, router]}.values():
        prompt = model.prompt_tokens(model.render_chat(item.messages))
        answer = model.tokenize(item.reference.encode("utf-8"), add_bos=False, special=False)
        if ref is not None and answer != ref:
            raise IncompatibleMembersError("route train needs the router and every expert to share one tokenizer")
        ref = answer
        full = prompt + answer
        if len(full) > model.n_ctx or not answer:
            return {"skipped": np.array(True)}
        out = _decode_answer(model, item, prompt, full)
        logits[id(model)] = out.logits[0]
        if model is router:
            hidden = out.hidden[0]
    assert ref is not None and hidden is not None
    ref_ids = np.asarray(ref, dtype=np.int64)
    n = len(ref_ids)
    at = np.arange(n)
    zr = logits[id(router)]
    grid = models.grid
    K = len(models.experts)
    argmax = np.zeros((n, K), dtype=np.int32)
    ref_logp = np.zeros((n, K), dtype=np.float32)
    correct = np.zeros((n, K, len(grid)), dtype=bool)
    for k, model in enumerate(models.experts):
        z = logits[id(model)]
        argmax[:, k] = z.argmax(axis=1)
        ref_logp[:, k] = z[at, ref_ids] - _logsumexp(z)
        for g, beta in enumerate(grid):
            if beta == 0.0 or model is router:  # the router as the expert: its own argmax (as the policy does)
                correct[:, k, g] = argmax[:, k] == ref_ids
            else:
                correct[:, k, g] = (z + np.float32(beta) * zr).argmax(axis=1) == ref_ids
    router_logp = (zr[at, ref_ids] - _logsumexp(zr)).astype(np.float32)
    # Positions where the choice of expert changes the outcome for some β: the hidden state is kept there.
    decisive = np.flatnonzero((correct != correct[:, :1, :]).any(axis=(1, 2))).astype(np.int32)
    return {"ref": ref_ids.astype(np.int32), "argmax": argmax, "ref_logp": ref_logp, "router_logp": router_logp,
            "correct": correct, "decisive": decisive, "hidden": hidden[decisive].astype(np.float32)}


def _decode_answer(model: Model, item: TrainItem, prompt: list[int], full: list[int]):
    """Decode prompt + answer with logits (and hidden states) at the answer rows: row p - 1 + j predicts answer
    token j. The part of the prompt the item shares with its source's template comes from one decode of that
    template from scratch, the rest from one decode: so an item's features never depend on the items before."""
    start = 0
    if item.shared is not None:
        shared = model.prompt_tokens(model.render_chat(item.shared))
        start = min(common_prefix_len(shared, full), len(prompt) - 1)
        if list(model.tokens(0)[:start]) != shared[:start] or model.n_past(0) < start:
            model.reset()
            model.decode(shared, want=None)
    model.trim(start)
    rows = list(range(len(prompt) - 1 - start, len(full) - 1 - start))
    return model.decode_many([SeqRequest(0, full[start:], rows)])


def _logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=1, dtype=np.float64)).astype(np.float32)


Progress = Callable[[int, int, int, float], None]  # (done, total, decoded now, seconds so far)


def build_features(models: Models, items: Sequence[TrainItem], cache_dir: Path,
                   progress: Progress | None = None) -> list[Path]:
    """Each item's features in ``cache_dir/<models key>/<item>.npz``, decoded unless already there."""
    folder = Path(cache_dir) / models.cache_key()
    paths = []
    t0 = time.perf_counter()
    decoded = 0
    for i, item in enumerate(items):
        path = folder / f"{item.key}.npz"
        if not _readable(path):
            write_npz(path, {**item_features(models, item), "item": text_array([item.source, item.id])})
            decoded += 1
        paths.append(path)
        if progress is not None:
            progress(i + 1, len(items), decoded, time.perf_counter() - t0)
    return paths


def _readable(path: Path) -> bool:
    try:
        with np.load(path, allow_pickle=False) as data:
            return "item" in data.files
    except (OSError, ValueError, EOFError, Exception):  # a damaged cache file is decoded again
        return False


# -- the whole run ----------------------------------------------------------------------------------------------


TWO_EXPERTS = "route train: give two or more experts (-m ... -m ..., or a preset): a head chooses between them"


def load_models(expert_paths: Sequence[Path], router_path: Path, expert_names: Sequence[str], router_name: str, *,
                n_ctx: int = EVAL_N_CTX, n_threads: int | None = None) -> Models:
    """Load the experts and the router (hidden states on; the same model when the router is an expert)."""
    shas = [file_sha256(p) for p in expert_paths]
    router_sha = file_sha256(router_path)
    if len(expert_paths) < 2:
        raise UsageError(TWO_EXPERTS)
    if len(set(shas)) != len(shas):
        raise UsageError("route train: an expert is listed twice; give each expert once")
    prints = set()
    for path in {*expert_paths, router_path}:  # vocabularies only: a mismatch is refused before any full load
        with ModelFile.open_vocab(path) as probe:
            prints.add(probe.tokenizer_fingerprint)
    if len(prints) > 1:
        raise IncompatibleMembersError("route train needs the router and every expert to share one tokenizer "
                                       "(as the `coder` preset's models do): routing across tokenizers is not "
                                       "supported")
    loaded: list[Model] = []
    try:
        router = Model(router_path, LoadOptions(n_ctx=n_ctx, n_threads=n_threads, hidden_states=True))
        loaded.append(router)
        experts = []
        for path, sha in zip(expert_paths, shas):
            if sha == router_sha:
                experts.append(router)
            else:
                experts.append(Model(path, LoadOptions(n_ctx=n_ctx, n_threads=n_threads)))
                loaded.append(experts[-1])
    except BaseException:
        for m in loaded:
            m.close()
        raise
    return Models(experts, router, list(expert_names), router_name, shas, router_sha)


def _training_date() -> str:
    """Now (UTC), or ``$SOURCE_DATE_EPOCH`` when set (the reproducible-builds convention): two trainings on the same
    data and seed then write the same bytes, date included."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    moment = (_dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch.isdigit()
              else _dt.datetime.now(_dt.timezone.utc))
    return moment.replace(microsecond=0).isoformat()


def train_router(experts: Sequence[object], router: object, out: Path | str, *, gsm8k: int = GSM8K_MAX,
                 mbpp: int = MBPP_MAX, seed: int = 0, l2: float | None = None, n_ctx: int = EVAL_N_CTX,
                 n_threads: int | None = None, cache_dir: Path | None = None, date: str | None = None,
                 items: Sequence[TrainItem] | None = None, progress: Progress | None = None,
                 download: bool = True, shard: tuple[int, int] | None = None) -> TrainResult | None:
    """Train a route head for ``experts`` (model specs, in the head's order) read by ``router`` (a spec; it may
    be one of the experts) and write it to ``out`` (with the report beside it, ``<out>.md``).

    ``items``: the training examples (default: :func:`training_items` with ``gsm8k`` and ``mbpp``); ``date``:
    what the head records as its training date (default: now, UTC, or ``$SOURCE_DATE_EPOCH``); ``cache_dir``: where item features are kept
    (default: the cache directory's ``route-features``); ``l2``: the fit's L2 weight (default: the best of
    :data:`L2_GRID` on the held-out items). ``shard=(k, n)``: only build the features of items k, k + n, ...
    into the cache (one of n processes or machines sharing the work) and return None; a run without it then
    fits from the cache."""
    from . import paths as _paths
    from .sources import Catalog, parse_spec, resolve

    t0 = time.perf_counter()
    if len(experts) < 2:  # (before anything is located or downloaded)
        raise UsageError(TWO_EXPERTS)
    catalog = Catalog.load()
    specs = [parse_spec(s, catalog) for s in experts]  # type: ignore[arg-type]
    rspec = parse_spec(router, catalog)  # type: ignore[arg-type]
    data = list(items) if items is not None else training_items(gsm8k, mbpp)  # data problems before any load
    out = Path(out)
    expert_paths = [resolve(s, download=download, progress=progress is not None) for s in specs]
    router_path = resolve(rspec, download=download, progress=progress is not None)
    models = load_models(expert_paths, router_path, [s.display_name for s in specs], rspec.display_name,
                         n_ctx=n_ctx, n_threads=n_threads)
    try:
        t1 = time.perf_counter()
        decoded = [0]

        def counting(done: int, total: int, new: int, seconds: float) -> None:
            decoded[0] = new
            if progress is not None:
                progress(done, total, new, seconds)

        feats = build_features(models, data if shard is None else data[shard[0]::shard[1]],
                               Path(cache_dir or _paths.cache_dir() / "route-features"), counting)
        feature_seconds = time.perf_counter() - t1
    finally:
        models.close()
    if shard is not None:
        return None
    when = date if date is not None else _training_date()
    spec_text = rspec.entry.key if rspec.entry is not None else str(router_path)
    result = fit_from_features(feats, models, seed=seed, l2=l2, date=when, training_data=describe_items(data),
                               router_spec=spec_text)
    result.report["seconds"].update({"features": round(feature_seconds, 1), "decoded_items": decoded[0],
                                     "per_item": round(feature_seconds / max(decoded[0], 1), 3),
                                     "total": round(time.perf_counter() - t0, 1)})
    result.head.save(out)
    _paths.write_text_atomic(out.with_name(out.name + ".md"), f"# Route head {out.name}\n\n"
                             f"- experts: {', '.join(models.expert_names)}; router: {models.router_name}\n"
                             f"- data: {result.head.training_data}\n- date: {when}, seed {seed}\n"
                             + result.markdown())
    return result
