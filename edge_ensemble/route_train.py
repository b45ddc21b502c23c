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
the same models and items give the same bytes.
"""

from __future__ import annotations

import datetime as _dt
import os
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import IncompatibleMembersError, UsageError
from .routing import BETA_GRID, RouterHead, file_sha256, fit_beta, fit_head, text_array, write_npz
from .runtime import LoadOptions, Model, SeqRequest, common_prefix_len

DATA_VERSION = 1  # bump when prompts, references or the cached fields change: old caches are then not reused
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


@dataclass
class Models:
    """The loaded experts and router (the router may be one of the experts: then the same object)."""

    experts: list[Model]
    router: Model
    expert_names: list[str]
    router_name: str
    expert_shas: list[str]
    router_sha: str
    grid: tuple[float, ...] = BETA_GRID

    def cache_key(self) -> str:
        # n_ctx: which items fit (the rest are skipped) depends on it, so each context size has its own cache
        text = json.dumps({"v": DATA_VERSION, "router": self.router_sha, "experts": self.expert_shas,
                           "grid": list(self.grid), "n_ctx": self.router.n_ctx}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def close(self) -> None:
        for m in {id(m): m for m in [*self.experts, self.router]}.values():
            m.close()


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


# -- fit --------------------------------------------------------------------------------------------------------


@dataclass
class Split:
    train: list[dict]
    heldout: list[dict]
    test: list[dict]


def split_items(records: list[dict], seed: int, heldout: float = 0.15, test: float = 0.15) -> Split:
    """Items (not positions: an item's positions are alike) into train / held-out / test, by a seeded permutation."""
    order = np.random.default_rng(seed).permutation(len(records))
    n_test = max(1, int(round(test * len(records)))) if len(records) >= 3 else 0
    n_held = max(1, int(round(heldout * len(records)))) if len(records) >= 2 else 0
    test_idx, held_idx, train_idx = order[:n_test], order[n_test:n_test + n_held], order[n_test + n_held:]
    return Split([records[i] for i in sorted(train_idx)], [records[i] for i in sorted(held_idx)],
                 [records[i] for i in sorted(test_idx)])


def _informative(records: list[dict], d: int) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states and labels (the one expert that is right) at the informative positions."""
    xs, ys = [np.zeros((0, d), np.float32)], [np.zeros(0, np.int64)]
    for r in records:
        right = r["correct"][:, :, 0]  # β = 0: each expert's own argmax
        info = right.sum(axis=1) == 1
        where = np.flatnonzero(info[r["decisive"]])  # informative ⊂ decisive: index into the stored rows
        xs.append(r["hidden"][where])
        ys.append(np.argmax(right[r["decisive"][where]], axis=1))
    return np.concatenate(xs), np.concatenate(ys)


def _choices(records: list[dict], head: RouterHead) -> tuple[np.ndarray, np.ndarray]:
    """Every position's correct-table and the head's choice there (expert 0 where the choice does not matter)."""
    tables, chosen = [], []
    for r in records:
        c = np.zeros(len(r["ref"]), dtype=np.int64)
        if len(r["decisive"]):
            c[r["decisive"]] = np.argmax(head.scores(r["hidden"]), axis=1)
        tables.append(r["correct"])
        chosen.append(c)
    if not tables:
        return np.zeros((0, head.n_experts, 1), bool), np.zeros(0, np.int64)
    return np.concatenate(tables), np.concatenate(chosen)


@dataclass
class TrainResult:
    """The head and the training report."""

    head: RouterHead
    report: dict = field(default_factory=dict)

    def markdown(self) -> str:
        return report_markdown(self.report)


# L2 weights tried when none is given: the one with the lowest held-out loss is kept. (Hidden states have ~900
# dimensions and a few hundred informative positions per hundred items: a weak penalty overfits at once.)
L2_GRID: tuple[float, ...] = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def fit_from_features(paths: Sequence[Path], models: Models, *, seed: int = 0, l2: float | None = None, date: str = "",
                      training_data: str = "", router_spec: str = "") -> TrainResult:
    """Fit the head and β on cached features (see the module docstring)."""
    records = []
    for p in paths:
        with np.load(p, allow_pickle=False) as data:
            if "skipped" in data.files:
                continue
            records.append({k: data[k] for k in data.files})
    if len(records) < 3:
        raise UsageError(f"route train needs at least 3 usable items (train, held-out, test); got {len(records)}")
    d, K = int(records[0]["hidden"].shape[1]), len(models.expert_names)
    split = split_items(records, seed)
    t0 = time.perf_counter()
    X, y = _informative(split.train, d)
    Xv, yv = _informative(split.heldout, d)
    if len(y) == 0:
        raise UsageError("the training items have no informative positions (the experts never disagree with exactly"
                         " one right); use more items or experts that differ")
    fits = [fit_head(X, y, Xv, yv, K, l2=w, check_every=1) for w in ((l2,) if l2 is not None else L2_GRID)]
    best = min(range(len(fits)), key=lambda i: fits[i].heldout_loss)  # the first (weakest) on a tie
    fit, l2 = fits[best], (l2 if l2 is not None else L2_GRID[best])
    head = RouterHead(fit.W, fit.b, 0.0, models.router_sha, tuple(models.expert_shas), tuple(models.expert_names),
                      router_name=models.router_name, router_spec=router_spec, hidden_size=d,
                      training_data=training_data, date=date, seed=seed)
    beta, beta_acc = fit_beta(*_choices(split.heldout, head), models.grid)
    fit_seconds = time.perf_counter() - t0

    Xt, yt = _informative(split.test, d)
    strongest = int(np.argmax(np.bincount(y, minlength=K)))
    test_acc = float(np.mean(head.scores(Xt).argmax(axis=1) == yt)) if len(yt) else None
    table, chosen = _choices(split.test, head)
    g = models.grid.index(beta)
    n = max(len(chosen), 1)
    all_right = table[:, :, 0]

    def routed(column: int) -> float:  # share of test reference tokens ranked first by the chosen experts
        return float(table[np.arange(len(chosen)), chosen, column].sum() / n)

    report = {
        "items": {"train": len(split.train), "heldout": len(split.heldout), "test": len(split.test),
                  "skipped": len(paths) - len(records)},
        "positions": {"all": int(sum(len(r["ref"]) for r in records)), "informative_train": int(len(y)),
                      "informative_heldout": int(len(yv)), "informative_test": int(len(yt))},
        "fit": {"iterations": fit.iterations, "l2": l2, "l2_choice": "given" if len(fits) == 1 else
                "lowest held-out loss of " + ", ".join(map(str, L2_GRID)), "train_accuracy": fit.train_accuracy,
                "heldout_accuracy": fit.heldout_accuracy},
        "router_accuracy_test": test_acc,
        "strongest_expert": models.expert_names[strongest],
        "strongest_accuracy_test": float(np.mean(yt == strongest)) if len(yt) else None,
        "expert_right_share_all": {name: float(all_right[:, k].mean()) if len(all_right) else None
                                   for k, name in enumerate(models.expert_names)},
        "expert_right_share_informative": {name: float(np.mean(yt == k)) if len(yt) else None
                                           for k, name in enumerate(models.expert_names)},
        "beta": beta,
        "beta_grid_heldout": dict(zip([str(b) for b in models.grid], beta_acc)),
        # Teacher-forced share of test reference tokens ranked first: each expert alone, routing, the oracle.
        "token_accuracy_test": {
            **{name: float(all_right[:, k].mean()) for k, name in enumerate(models.expert_names)},
            "route beta=0": routed(0),
            **({f"route beta={beta} (fitted)": routed(g)} if beta != 0.0 else {}),  # 0 is the row above
            "oracle (any expert right)": float(all_right.any(axis=1).sum() / n),
        } if len(chosen) else {},
    }
    head = RouterHead(head.W, head.b, beta, head.router_sha256, head.expert_sha256, head.expert_names,
                      router_name=head.router_name, router_spec=router_spec, hidden_size=d,
                      training_data=training_data, date=date, seed=seed, heldout_accuracy=fit.heldout_accuracy,
                      extra=_rounded(report))  # no timings in the file: the same data give the same bytes
    report["seconds"] = {"fit": round(fit_seconds, 3)}
    return TrainResult(head, report)


def _rounded(value: object) -> object:
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def report_markdown(r: dict) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f} %"

    lines = [
        f"- items: {r['items']['train']} train, {r['items']['heldout']} held-out, {r['items']['test']} test"
        f" ({r['items']['skipped']} skipped: longer than the context)",
        f"- answer positions: {r['positions']['all']}; informative (exactly one expert right): "
        f"{r['positions']['informative_train']} train, {r['positions']['informative_heldout']} held-out, "
        f"{r['positions']['informative_test']} test",
        f"- head: {r['fit']['iterations']} iterations, L2 {r['fit']['l2']} (the fit's penalty, {r['fit']['l2_choice']}), train accuracy {pct(r['fit']['train_accuracy'])},"
        f" held-out {pct(r['fit']['heldout_accuracy'])}",
        f"- **router accuracy on test informative positions: {pct(r['router_accuracy_test'])}** against "
        f"{pct(r['strongest_accuracy_test'])} for always the strongest expert ({r['strongest_expert']})",
        "- share of informative test positions where each expert is the right one: "
        + ", ".join(f"{k} {pct(v)}" for k, v in r["expert_right_share_informative"].items()),
        "- share of all test positions where each expert's top token is the reference: "
        + ", ".join(f"{k} {pct(v)}" for k, v in r["expert_right_share_all"].items()),
        f"- β = {r['beta']} (held-out accuracy per β: "
        + ", ".join(f"{k}: {pct(v)}" for k, v in r["beta_grid_heldout"].items()) + ")",
        "- teacher-forced token accuracy on the test items: "
        + ", ".join(f"{k} {pct(v)}" for k, v in r["token_accuracy_test"].items()),
    ]
    t = r.get("seconds", {})
    if "features" in t:
        each = f", {t['per_item']:.2f} s each" if t["decoded_items"] else ", the rest from the cache"
        lines.append(f"- time: features {t['features']:.0f} s ({t['decoded_items']} items decoded{each}), fit "
                     f"{t['fit']:.1f} s, total {t['total']:.0f} s")
    return "\n".join(lines) + "\n"


# -- the whole run ----------------------------------------------------------------------------------------------


TWO_EXPERTS = "route train: give two or more experts (-m ... -m ..., or a preset): a head chooses between them"


def load_models(expert_paths: Sequence[Path], router_path: Path, expert_names: Sequence[str], router_name: str, *,
                n_ctx: int = 2048, n_threads: int | None = None) -> Models:
    """Load the experts and the router (hidden states on; the same model when the router is an expert)."""
    shas = [file_sha256(p) for p in expert_paths]
    router_sha = file_sha256(router_path)
    if len(expert_paths) < 2:
        raise UsageError(TWO_EXPERTS)
    if len(set(shas)) != len(shas):
        raise UsageError("route train: an expert is listed twice; give each expert once")
    prints = set()
    for path in {*expert_paths, router_path}:  # vocabularies only: a mismatch is refused before any full load
        probe = Model(path, LoadOptions(vocab_only=True))
        try:
            prints.add(probe.tokenizer_fingerprint)
        finally:
            probe.close()
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
                 mbpp: int = MBPP_MAX, seed: int = 0, l2: float | None = None, n_ctx: int = 2048,
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
