"""``edge-ensemble doctor``: check that llama.cpp runs on this machine by decoding a prompt in a child process."""

from __future__ import annotations

import math
import platform
import sys
from pathlib import Path

import click

from .. import __version__
from ..errors import EdgeEnsembleError, LlamaCrashError, ModelSourceError, UsageError
from .common import _catalog


@click.command()
@click.argument("model", required=False)
def doctor(model: str | None) -> None:
    """Check that llama.cpp runs on this machine: decode a 200-token prompt of MODEL in a separate process.

    MODEL is a catalog name or a .gguf path; by default the default preset's drafter, or else the smallest
    catalog model on disk. If llama.cpp crashes (a build that uses instructions this CPU or virtual machine
    does not allow), this says so and prints the command that builds it again here. Exit 3 if llama.cpp crashed,
    1 if the check failed otherwise (no such model, not a GGUF file, no result in time).
    """
    from .. import doctor as checks

    path = _doctor_model(model)
    features = checks.build_features()
    click.echo(f"edge-ensemble {__version__}, llama-cpp-python {checks.llama_version()}, "
               f"Python {sys.version.split()[0]}, {sys.platform} {platform.machine()}")
    click.echo(f"llama.cpp built for: {' '.join(features) or 'no optional CPU features'}"
               f" (this CPU has AMX: {'yes' if checks.cpu_has_amx() else 'no'})")
    click.echo(f"test decode of {path.name}, {checks.PROMPT_TOKENS} prompt tokens, in a child process ...")
    result = checks.decode_check(path)
    if not result.ok:
        error = LlamaCrashError if result.crashed else EdgeEnsembleError
        raise error(f"llama.cpp {'crashed in' if result.crashed else 'failed'} the test decode ({result.detail}): "
                    + checks.advice(result, features))
    click.echo(f"ok: {result.detail}")


def _doctor_model(name: str | None) -> Path:
    """The GGUF file doctor decodes: ``name`` (catalog name or path), or a model already on disk."""
    from ..remote import declared_model
    from ..sources import model_status, parse_spec, resolve

    catalog = _catalog()
    if name is not None:
        if catalog.find(name) is None and name in catalog.presets and not Path(name).exists():
            raise UsageError(f"{name} is a preset, not a model; test one of its members "
                             f"({', '.join(catalog.preset(name).members)})")
        spec = parse_spec(name, catalog)
        if spec.entry is None:
            return resolve(spec, download=False, progress=False)
        st = model_status(spec.entry)
        if not st.present:
            raise ModelSourceError(f"model '{spec.entry.key}' is not on disk; fetch it with "
                                   f"`edge-ensemble models pull {spec.entry.key}`, or give a .gguf path")
        return st.path
    preset = catalog.presets.get(catalog.default) if catalog.default else None
    # (a server member's declared model, if any: its vocab file is a local GGUF of the same model)
    drafter = catalog.find(declared_model(preset.members[0]) or "") if preset is not None and preset.members else None
    by_size = sorted(catalog.models.values(), key=lambda e: e.size or math.inf)
    entries = ([drafter] if drafter is not None else []) + by_size
    for entry in entries:
        st = model_status(entry)
        if st.present:
            return st.path
    raise ModelSourceError("no catalog model is on disk to test with; fetch a small one with "
                           "`edge-ensemble models pull smollm2-135m-instruct`, or give a .gguf path")
