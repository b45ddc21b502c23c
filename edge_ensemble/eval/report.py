"""Summaries of evaluation records: accuracy with a Wilson interval, speed and ensembled share per config."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_ensemble.errors import EdgeEnsembleError
from edge_ensemble.paths import write_text_atomic
from edge_ensemble.eval.runner import read_records
from edge_ensemble.eval.scoring import mcnemar_exact, wilson_interval
from edge_ensemble.policies import BASELINE_POLICY

# Each member alone, as eval names it: "<baseline policy>:<member>" (the reference every configuration is compared with).
ALONE = f"{BASELINE_POLICY}:"


@dataclass(frozen=True)
class Summary:
    """One (task, config) row of the report."""

    task: str
    config: str
    n: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    tokens_per_second: float | None  # total tokens / total seconds
    ensembled_fraction: float | None  # token-weighted mean of the per-answer E/T
    seconds_per_answer: float | None = None  # mean seconds per answer, prompt included
    at_limit: float | None = None  # share of answers stopped by the token budget rather than by the model


@dataclass(frozen=True)
class Paired:
    """An ensemble configuration against one member alone on the items both answered."""

    task: str
    config: str
    baseline: str
    n: int
    only_config: int  # items the ensemble got right and the member alone wrong
    only_baseline: int  # the reverse
    p_value: float  # exact McNemar, two-sided


def load_records(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Records from JSONL files; a later record for the same (task, item, config) replaces an earlier one."""
    latest: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
    for path in paths:
        for record in read_records(Path(path)):
            latest[(record.get("task"), record.get("item"), record.get("config"))] = record
    return list(latest.values())


def summarize(records: Iterable[dict[str, Any]]) -> list[Summary]:
    """One :class:`Summary` per (task, config): tasks in order of first appearance, each member alone
    (``single:``) before the ensembles, otherwise in order of first appearance."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["task"], record["config"]), []).append(record)
    task_rank = {task: i for i, task in enumerate(dict.fromkeys(task for task, _ in groups))}
    order = {key: i for i, key in enumerate(groups)}
    keys = sorted(groups, key=lambda k: (task_rank[k[0]], not k[1].startswith(ALONE), order[k]))
    summaries = []
    for task, config in keys:
        rows = groups[(task, config)]
        n = len(rows)
        k = sum(bool(r["correct"]) for r in rows)
        low, high = wilson_interval(k, n)
        tokens = sum(int(r.get("tokens") or 0) for r in rows)
        seconds = sum(float(r.get("seconds") or 0.0) for r in rows)
        weighted = [(r["ensembled_fraction"], int(r.get("tokens") or 0)) for r in rows
                    if r.get("ensembled_fraction") is not None]
        weight = sum(t for _, t in weighted)
        budgeted = [r for r in rows if r.get("finish_reason") or r.get("max_tokens")]
        summaries.append(Summary(
            task=task,
            config=config,
            n=n,
            correct=k,
            accuracy=k / n,
            ci_low=low,
            ci_high=high,
            tokens_per_second=tokens / seconds if seconds > 0 else None,
            seconds_per_answer=seconds / n,
            ensembled_fraction=sum(f * t for f, t in weighted) / weight if weight > 0 else None,
            at_limit=sum(map(_stopped_by_budget, budgeted)) / len(budgeted) if budgeted else None,
        ))
    return summaries


def _stopped_by_budget(record: dict[str, Any]) -> bool:
    if record.get("finish_reason"):
        return record["finish_reason"] == "length"
    return int(record.get("tokens") or 0) >= int(record["max_tokens"])  # older records: used the whole budget


def _p(value: float) -> str:
    return "<0.001" if value < 0.001 else f"{value:.3f}" if value < 0.01 else f"{value:.2f}"


PARALLEL = "parallel"  # the branching baseline: M independent samples, voted (an eval configuration of eager's)


def paired_comparisons(records: Iterable[dict[str, Any]]) -> list[Paired]:
    """Each ensemble configuration against each ``single:`` configuration of the same task, item by item, and
    each other branching configuration (eager, ...) also against ``parallel``, the baseline at equal M.

    Overlapping confidence intervals of two accuracies say little when both ran on the same items; the paired
    view counts the items where exactly one of the two was right and tests that split (exact McNemar).
    """
    outcome: dict[tuple[str, str], dict[Any, bool]] = {}
    branching: set[tuple[str, str]] = set()
    for record in records:
        outcome.setdefault((record["task"], record["config"]), {})[record["item"]] = bool(record["correct"])
        if record.get("branches"):
            branching.add((record["task"], record["config"]))
    rows = []
    for (task, config), results in outcome.items():
        if config.startswith(ALONE):
            continue
        for (other_task, baseline), base in outcome.items():
            against_parallel = baseline == PARALLEL and config != PARALLEL and (task, config) in branching
            if other_task != task or not (baseline.startswith(ALONE) or against_parallel):
                continue
            shared = results.keys() & base.keys()
            only_config = sum(results[i] and not base[i] for i in shared)
            only_baseline = sum(base[i] and not results[i] for i in shared)
            rows.append(Paired(task, config, baseline, len(shared), only_config, only_baseline,
                               mcnemar_exact(only_config, only_baseline)))
    return rows


def paired_markdown(rows: Sequence[Paired]) -> str:
    """A Markdown table of :func:`paired_comparisons`."""
    lines = [
        "| task | config | against (member alone, or parallel) | items | only config right | only the other right | McNemar p |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.task} | {r.config} | {r.baseline.removeprefix(ALONE)} | {r.n} | "
                     f"{r.only_config} | {r.only_baseline} | {_p(r.p_value)} |")
    return "\n".join(lines) + "\n"


def summary_markdown(summaries: Sequence[Summary]) -> str:
    """A Markdown table: task, config, n, accuracy [95% Wilson interval], tokens/s, E/T, share cut off."""
    lines = [
        "| task | config | n | accuracy | 95% CI | tok/s | s/answer | E/T | at token limit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        limit = f"{100 * s.at_limit:.0f}%" if s.at_limit is not None else "–"
        lines.append(
            f"| {s.task} | {s.config} | {s.n} | {100 * s.accuracy:.1f}% ({s.correct}/{s.n}) | "
            f"{100 * s.ci_low:.1f}–{100 * s.ci_high:.1f}% | {_speed(s)} | {_seconds(s)} | {_share(s)} | {limit} |"
        )
    return "\n".join(lines) + "\n"


def _seconds(s: Summary) -> str:
    return f"{s.seconds_per_answer:.2f}" if s.seconds_per_answer is not None else "–"


def _speed(s: Summary) -> str:
    return f"{s.tokens_per_second:.1f}" if s.tokens_per_second is not None else "–"


def _share(s: Summary) -> str:
    return f"{s.ensembled_fraction:.2f}" if s.ensembled_fraction is not None else "–"


def glance_markdown(summaries: Sequence[Summary]) -> str:
    """One row per configuration, one column group per task: accuracy (k/n), tok/s, seconds per answer, E/T."""
    tasks = list(dict.fromkeys(s.task for s in summaries))
    configs = list(dict.fromkeys(s.config for s in summaries))
    by_key = {(s.task, s.config): s for s in summaries}
    header = "| config | " + " | ".join(f"{t} accuracy | tok/s | s/answer | E/T" for t in tasks) + " |"
    lines = [header, "|---|" + "---:|---:|---:|---:|" * len(tasks)]
    for config in configs:
        cells = []
        for task in tasks:
            s = by_key.get((task, config))
            if s is None:
                cells += ["–"] * 4
                continue
            cells += [f"{100 * s.accuracy:.1f}% ({s.correct}/{s.n})", _speed(s), _seconds(s), _share(s)]
        lines.append(f"| {config.removeprefix(ALONE)}{' alone' if config.startswith(ALONE) else ''} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_speed(summaries: Sequence[Summary], png_path: str | os.PathLike[str]) -> Path:
    """One panel per task: accuracy (with its 95% interval) against tokens/s, a labelled point per config."""
    tasks = list(dict.fromkeys(s.task for s in summaries))
    configs = list(dict.fromkeys(s.config for s in summaries))  # one colour per config across panels
    if not tasks:
        raise EdgeEnsembleError("no evaluation records to plot")
    fig, axes = _figure(len(tasks))
    for ax, task in zip(axes, tasks):
        for s in (s for s in summaries if s.task == task):
            x = s.tokens_per_second or 0.0
            ax.errorbar(
                [x], [100 * s.accuracy],
                yerr=[[100 * (s.accuracy - s.ci_low)], [100 * (s.ci_high - s.accuracy)]],
                fmt="o", capsize=3, color=f"C{configs.index(s.config) % 10}",
            )
            ax.annotate(s.config, (x, 100 * s.accuracy), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_title(task)
        ax.set_xlabel("tokens / s")
        ax.set_ylabel("accuracy (%) with 95% CI")
        ax.grid(True, alpha=0.3)
    return _save(fig, png_path)


def plot_branching(records: Iterable[dict[str, Any]], png_path: str | os.PathLike[str]) -> Path | None:
    """One panel per task: cons@M (filled) and pass@M (hollow), with 95% intervals, against the tokens generated
    per item, for the configurations that recorded branches and each member alone (greedy: one answer, so cons
    = pass). None, and no file, when no record has branches."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["config"]), []).append(r)
    shown = {k: rs for k, rs in groups.items() if k[1].startswith(ALONE) or any(r.get("branches") for r in rs)}
    tasks = list(dict.fromkeys(t for (t, c), rs in shown.items() if any(r.get("branches") for r in rs)))
    if not tasks:
        return None
    fig, axes = _figure(len(tasks))
    configs = list(dict.fromkeys(c for _, c in shown))
    for ax, task in zip(axes, tasks):
        for (t, config), rs in shown.items():
            if t != task:
                continue
            n = len(rs)
            x = sum(r.get("generated_tokens", r["tokens"]) for r in rs) / n
            colour = f"C{configs.index(config) % 10}"
            points = [("o", sum(bool(r["correct"]) for r in rs), colour)]
            if any(r.get("branches") for r in rs):
                points.append(("o", sum(bool(r.get("pass_at_k")) for r in rs), "none"))
            for marker, k, face in points:
                lo, hi = wilson_interval(k, n)
                below, above = max(0.0, k / n - lo), max(0.0, hi - k / n)  # (rounding at 0 % and 100 %)
                ax.errorbar([x], [100 * k / n], yerr=[[100 * below], [100 * above]], fmt=marker,
                            capsize=3, color=colour, markerfacecolor=face)
            ax.annotate(config.removeprefix(ALONE), (x, 100 * points[0][1] / n), textcoords="offset points",
                        xytext=(5, 5), fontsize=8)
        ax.set_title(f"{task}: cons@M (filled), pass@M (hollow)")
        ax.set_xscale("log")
        ax.set_xlabel("generated tokens / item")
        ax.set_ylabel("accuracy (%) with 95% CI")
        ax.grid(True, alpha=0.3)
    return _save(fig, png_path)


def _figure(panels: int) -> tuple[Any, Any]:
    """A figure of ``panels`` side by side, on the Agg canvas (no pyplot, no global backend switch)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise EdgeEnsembleError(
            "the accuracy plot needs matplotlib: pip install 'edge-ensemble[eval]'"
        ) from None
    fig = Figure(figsize=(4.5 * panels, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def _save(fig: Any, png_path: str | os.PathLike[str]) -> Path:
    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def together_note(records: Sequence[dict[str, Any]]) -> str:
    """A line naming the configurations whose answers were decoded side by side (``--parallel``): their
    seconds are wall time shared with the other answers of the batch, comparable only at the same width."""
    widths: dict[str, set[int]] = {}
    for r in records:
        widths.setdefault(str(r.get("config")), set()).add(int(r.get("decoded_together") or 1))
    shared = {c: w for c, w in widths.items() if w != {1}}
    if not shared:
        return ""
    listed = ", ".join(f"{c} (--parallel {'/'.join(map(str, sorted(w)))})" for c, w in sorted(shared.items()))
    return (f"Decoded side by side, several items at once: {listed}. Their tok/s and seconds per answer are wall "
            "time shared with the other answers of each batch: compare them only at the same --parallel.\n")


def report_markdown(records: Iterable[dict[str, Any]], sources: str = "",
                    summaries: Sequence[Summary] | None = None) -> str:
    """The whole report: how to read it, the per-configuration tables and the paired comparisons
    (``summaries``: :func:`summarize` of ``records`` when the caller already has it)."""
    records = list(records)
    if summaries is None:
        summaries = summarize(records)
    origin = f"From {sources}. " if sources else ""
    text = (
        "# Evaluation\n\n"
        f"{origin}Accuracy with a 95% Wilson interval; tok/s = total generated tokens / total seconds "
        "(prompt included); s/answer = mean seconds per answer (prompt included); E/T = share of generated tokens that were ensembled (token-weighted); at token limit = "
        "share of answers stopped by the token budget rather than by the model (answers that state their "
        "result early, as on ARC, can still be right).\n\n"
        + glance_markdown(summaries) + "\n" + summary_markdown(summaries)
    )
    together = together_note(records)
    if together:
        text += "\n" + together
    branching = branching_markdown(records)
    if branching:
        text += ("\nBranching configurations (M answers per item, voted): cons@M = the voted answer right (the "
                 "accuracy above), pass@M = any branch right; branches = sequences generated per item (eager-adapt: "
                 "both passes); generated = tokens decoded by all branches per item (a prefix that branches share "
                 "counted once), the compute a configuration spends.\n\n" + branching)
    paired = paired_comparisons(records)
    if paired:
        text += (
            "\nPaired, item by item: the items where exactly one of the two was right, and an exact McNemar "
            "test of that split. The p-values are nominal: one per row, not corrected for the number of rows.\n\n"
            + paired_markdown(paired)
        )
    return text


def branching_markdown(records: Iterable[dict[str, Any]]) -> str:
    """cons@M, pass@M, branches and generated tokens per item for the configurations that recorded branches;
    the member alone (greedy) for comparison of generated tokens. "" when no record has branches."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["config"]), []).append(r)
    rows = []
    for (task, config), rs in groups.items():
        if not any(r.get("branches") for r in rs):
            continue
        n = len(rs)
        cons = sum(bool(r["correct"]) for r in rs)
        passed = sum(bool(r.get("pass_at_k")) for r in rs)
        lo, hi = wilson_interval(passed, n)
        generated = sum(r.get("generated_tokens", r["tokens"]) for r in rs) / n
        branches = sum(len(r.get("branches", ())) + r.get("first_pass_branches", 0) for r in rs) / n  # both passes
        rows.append(f"| {task} | {config} | {n} | {cons / n:.1%} | {passed / n:.1%} ({100 * lo:.1f}–{100 * hi:.1f}%) "
                    f"| {branches:.1f} | {generated:.0f} |")
    if not rows:
        return ""
    singles = [f"| {task} | {config} | {len(rs)} | {sum(bool(r['correct']) for r in rs) / len(rs):.1%} | – | 1.0 | "
               f"{sum(r['tokens'] for r in rs) / len(rs):.0f} |"
               for (task, config), rs in groups.items() if config.startswith(ALONE)]
    return ("| task | config | items | cons@M | pass@M (95% CI) | branches / item | generated tokens / item |\n"
            "|---|---|---:|---:|---:|---:|---:|\n" + "\n".join(singles + rows) + "\n")


def write_report(records: Iterable[dict[str, Any]], md_path: str | os.PathLike[str],
                 png_path: str | os.PathLike[str] | None = None, sources: str = "") -> list[Summary]:
    """Write :func:`report_markdown` (and the plot when ``png_path`` is given); return the summaries."""
    records = list(records)
    md = Path(md_path)
    md.parent.mkdir(parents=True, exist_ok=True)
    summaries = summarize(records)
    write_text_atomic(md, report_markdown(records, sources, summaries))  # (a Ctrl-C leaves the old one whole)
    if png_path is not None:
        plot_accuracy_vs_speed(summaries, png_path)
        plot_branching(records, branching_png(png_path))
    return summaries


def branching_png(png_path: str | os.PathLike[str]) -> Path:
    """Where :func:`write_report` puts the branching plot beside the accuracy plot: ``<name>-branching.png``."""
    path = Path(png_path)
    return path.with_name(f"{path.stem}-branching{path.suffix}")


def replace_marked_block(text: str, name: str, body: str) -> str:
    """Return ``text`` with the lines between the marker lines ``<!-- results:NAME -->`` and
    ``<!-- /results:NAME -->`` replaced by ``body``, so a document (the README) can quote a generated table
    without anyone pasting it by hand. Markers count only as whole lines, so prose may mention them."""
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == start]
    ends = [i for i, line in enumerate(lines) if line.strip() == end]
    if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
        raise EdgeEnsembleError(f"expected one '{start}' line and one '{end}' line after it in the document; "
                                "put the two marker lines around the table to regenerate")
    return "".join(lines[: starts[0] + 1]) + body.rstrip("\n") + "\n" + "".join(lines[ends[0]:])


def update_document(path: str | os.PathLike[str], name: str, body: str) -> bool:
    """Rewrite the ``name`` block of the document at ``path`` with ``body`` (atomically); True when it changed."""
    path = Path(path)
    if not path.is_file():
        raise EdgeEnsembleError(f"{path}: no such document; pass the README's path")
    old = path.read_text(encoding="utf-8")
    new = replace_marked_block(old, name, body)
    if new == old:
        return False
    write_text_atomic(path, new)
    return True
