"""``edge-ensemble eval``: score each member alone and the ensemble policies on a benchmark task; resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .. import paths
from ..api import ENSEMBLE_OPTIONS, EnsembleConfig
from ..errors import UsageError
from .common import EnsembleChoice, _catalog, _parse_shard
from .flags import _EVAL_DEFAULTS, _eval_options


@click.command("eval")
@click.argument("task", type=click.Choice(["gsm8k", "arc-challenge", "math-500", "humaneval"]))
@click.option("-p", "--preset", help="Ensemble preset whose members are compared [default: the catalog's default].")
@click.option("-m", "--model", "members", multiple=True, metavar="MODEL", help="Explicit members (first drafts).")
@click.option("--configs", default=None, metavar="LIST",
              help="Comma-separated configurations: single (each member alone), single:<member>, every-token, "
                   "safe (faithful), safe-gated; branching (named only): parallel, eager, eager-adapt, "
                   "eager-ensemble (M = 8 at temperature 0.6); with --head: route (fitted beta), route-b0, "
                   "route-gated (router consulted where the expert's top-1 < 0.5) [default: all but the branching ones].")
@click.option("--head", type=click.Path(dir_okay=False), default=None,
              help="A route head (`edge-ensemble route train`): adds the route, route-b0 and route-gated configurations.")
@click.option("--start", type=click.IntRange(min=0), default=0, help="First item (dataset order).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Number of items [default: the development slice].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Results directory [default: results/<preset or members>].")
@click.option("--no-plot", is_flag=True, help="Skip the PNG plot (no matplotlib needed).")
@click.option("--shard", metavar="K/N", default=None,
              help="Generate only every N-th item of the slice from the K-th (0-based): one of N processes or "
              "machines, each with its own --out; join them with benchmarks/share_records.py. A second pass "
              "(eager-adapt) still plans over the whole slice.")
@_eval_options
def eval_command(task: str, preset: str | None, members: tuple[str, ...], configs: str | None, head: str | None,
                 start: int, limit: int | None, out_dir: str | None, no_plot: bool, shard: str | None,
                 options: dict[str, Any]) -> None:
    """Score each member alone and the ensemble policies on TASK; resumable.

    Writes one JSONL record per (item, configuration) to OUT/<task>.jsonl — a rerun skips what is done —
    then OUT/summary.md (accuracy with a 95% Wilson interval, tok/s, seconds per answer, E/T, share of
    answers stopped by the token budget, paired comparisons with each member alone; for branching
    configurations cons@M, pass@M, generated tokens and paired comparisons against parallel) and
    OUT/summary.png (with branching configurations also OUT/summary-branching.png: cons@M and pass@M
    against generated tokens).
    """
    from ..eval.configs import build_configs, check_config_names, offered
    from ..eval.report import load_records, write_report
    from ..eval.runner import results_path, run_eval
    from ..eval.tasks import get_task

    choice = EnsembleChoice(preset, members)  # (both: the records would go to the preset's directory, mixing)
    task_obj = get_task(task)
    if not task_obj.items(start, limit):  # (also: missing data fails here, before any model loads)
        raise UsageError(f"{task} has no items from --start {start}")
    split = _parse_shard(shard)
    catalog = _catalog()
    specs = choice.specs(catalog)
    label = choice.label(catalog)
    out = Path(out_dir or Path("results") / label)
    paths.check_out_dir(out)
    max_tokens = options.pop("max_tokens", None)
    base = EnsembleConfig(**{**_EVAL_DEFAULTS, **options}).validate(len(specs), lambda n: ENSEMBLE_OPTIONS[n].flag)
    names = [c.strip() for c in configs.split(",")] if configs else None
    check_config_names(names)
    branching = [n for n in names or () if n in offered() and offered()[n][0].branches]
    if branching and task == "humaneval":
        raise UsageError(f"{', '.join(branching)} vote over extracted answers, and humaneval has no answer to "
                         "extract; use gsm8k, arc-challenge or math-500")
    # (build_configs refuses, before any model loads, a configuration that lacks what it needs or a bad head file)
    engine_configs, ensembles = build_configs(specs, names, base, **({"head": head} if head is not None else {}))
    if not engine_configs:
        raise UsageError(f"--configs {configs!r} matches no configuration; use {', '.join(offered())}")
    try:
        run_eval(task_obj, engine_configs, out, start=start, limit=limit, max_tokens=max_tokens, shard=split)
    finally:
        for e in ensembles:
            e.close()
    record_files = sorted(out.glob("*.jsonl"))
    write_report(load_records(record_files), out / "summary.md", None if no_plot else out / "summary.png",
                 sources=", ".join(p.name for p in record_files))
    click.echo((out / "summary.md").read_text())
    click.echo(f"records: {results_path(out, task)}", err=True)
