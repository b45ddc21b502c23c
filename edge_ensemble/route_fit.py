"""The fit of ``edge-ensemble route train`` (:mod:`edge_ensemble.route_train`, steps 3 and 4 of its docstring): the
cached features of each item split into train / held-out / test, a multinomial logistic regression on the
informative positions, β fitted on the held-out items, and the report with the test figures."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import UsageError
from .routing import BETA_GRID, RouterHead, fit_beta, fit_head
from .runtime import Model

DATA_VERSION = 1  # bump when prompts, references or the cached fields change: old caches are then not reused


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
