"""``edge-ensemble route train``: fit FusionRoute's selection head, the file ``--policy route --head FILE`` reads."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .. import paths
from ..errors import UsageError
from ..options import EVAL_N_CTX, LOAD
from .common import EnsembleChoice, _catalog, _note, _parse_shard
from .flags import _declared_flags


@click.group()
def route() -> None:
    """FusionRoute: train the selection head that `--policy route --head FILE` reads."""


_ROUTE_LOAD = (LOAD["n_ctx"], LOAD["n_threads"])


@route.command("train")
@click.option("-p", "--preset", help="The experts: a preset's members, in order [default: coder].")
@click.option("-m", "--model", "members", multiple=True, metavar="MODEL", help="An expert (repeat it); replaces "
              "--preset.")
@click.option("--router", default="qwen2.5-coder-0.5b-instruct", show_default=True, metavar="MODEL",
              help="The model whose hidden state the head reads (it may be one of the experts: one decode serves both).")
@click.option("--gsm8k", "n_gsm8k", type=click.IntRange(0, 600), default=600, show_default=True,
              help="GSM8K test items, from item 200 on (0-199 are the evaluation slices).")
@click.option("--mbpp", "n_mbpp", type=click.IntRange(0, 500), default=500, show_default=True,
              help="MBPP test problems, from the first.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="The head file [default: route-head-<preset or experts>.npz]; the report goes beside it (.md).")
@click.option("--cache", "cache", type=click.Path(file_okay=False), default=None,
              help="Feature cache (one file per item; a rerun reuses it) [default: <cache dir>/route-features].")
@click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True,
              help="Seed of the train / held-out / test split.")
@click.option("--l2", type=click.FloatRange(min=0.0), default=None,
              help="L2 weight of the fit [default: the best on the held-out items of 0.01 ... 100].")
@click.option("--shard", metavar="K/N", default=None,
              help="Only build the features of every N-th item from the K-th into the cache (one of N processes "
              "sharing it); then run without --shard to fit.")
@_declared_flags(_ROUTE_LOAD, "options", defaults=False, shown={"n_ctx": str(EVAL_N_CTX)})
def route_train(preset: str | None, members: tuple[str, ...], router: str, n_gsm8k: int, n_mbpp: int,
                out: str | None, cache: str | None, seed: int, l2: float | None, shard: str | None,
                options: dict[str, Any]) -> None:
    """Teacher-force reference solutions through every expert, then fit the head and beta; resumable.

    Keeps the positions where exactly one expert's top token is the reference token, fits a multinomial
    logistic regression on the router's hidden state there (held-out early stopping), fits beta (the
    weight of the router's own log-probabilities), writes OUT and OUT.md and prints the report.
    """
    from ..route_train import train_router

    choice = EnsembleChoice(preset, members)
    if l2 is not None and not math.isfinite(l2):  # (click's FloatRange lets nan and inf through)
        raise UsageError(f"--l2 must be a finite number >= 0; got {l2}")
    split = _parse_shard(shard)
    catalog = _catalog()
    experts = choice.specs(catalog, default="coder")
    label = choice.label(catalog, default="coder")
    target = Path(out or f"route-head-{label}.npz")
    if split is None:  # (a shard only fills the cache; a fit writes the head: checked now, not after hours)
        paths.check_out_dir(target.parent, "--out")
    result = train_router(experts, router, target, gsm8k=n_gsm8k, mbpp=n_mbpp, seed=seed, l2=l2,
                          n_ctx=options.get("n_ctx", EVAL_N_CTX), n_threads=options.get("n_threads"),
                          cache_dir=Path(cache) if cache else None, progress=_route_progress(), shard=split)
    if result is None:
        _note(f"shard {shard}: its features are cached; once every shard is done, run the same command without "
              "--shard to fit the head")
        return
    click.echo(result.markdown(), nl=False)
    _note(f"head: {target} (report: {target}.md); use it with --policy route --head {target}")


def _route_progress() -> Callable[[int, int, int, float], None]:
    """Progress of the feature build on stderr: items done, decoded this run, seconds per item, ETA."""
    tty = sys.stderr.isatty()

    def show(done: int, total: int, decoded: int, seconds: float) -> None:
        if not (tty or done == total or done % 25 == 0):
            return
        rate = seconds / decoded if decoded else 0.0
        eta = rate * (total - done)
        line = (f"route train: {done}/{total} items ({decoded} decoded, {done - decoded} from the cache), "
                f"{rate:.1f} s/item, ETA {int(eta // 60)} min {int(eta % 60):02d} s")
        click.echo(("\r" + line + " " * 4) if tty else line, err=True, nl=not tty or done == total)

    return show
