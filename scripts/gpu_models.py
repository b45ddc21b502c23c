"""Random-weight GGUF models with a real model's shapes and tokenizer, for the GPU check (scripts/gpu-check).

The real models (98 MB and up) cannot travel to the device machine, and their weights are not what a GPU check
tests. What travels is a *spec*: every hyperparameter and tokenizer key of a real GGUF file plus its tensor list
(names and shapes), saved as gzipped JSON (~3 MB for Qwen2.5's 152k-token vocabulary). On the device the spec is
turned back into a GGUF file of the same architecture, dimensions and tokenizer with random weights, so llama.cpp
runs the same kernels on the same shapes and edge-ensemble's cross-tokenizer path sees the real vocabularies.

    spec = read_spec("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"); save_spec(spec, "qwen.spec.json.gz")
    write_random_model(load_spec("qwen.spec.json.gz"), "qwen-random.gguf")              # real shapes, F16
    write_random_model(shrink(spec, n_layer=2, head_dim=8), "qwen-small.gguf")         # a CPU test's size

Weights: embedding rows of unit scale, matrices N(0, 1/fan_in), norms ~1, biases ~0; the output projection
(``output.weight``, or the tied embedding) gives logits of std ~:data:`LOGIT_STD`, so greedy choices have clear
margins (numerical noise between GPU kernels for different batch sizes should not flip them) while the text is
still meaningless. Control and unused tokens get smaller output rows, so generation rarely stops by chance.
Only numpy and the ``gguf`` package are needed (no edge_ensemble, no llama_cpp). Same spec and seed, same file.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LOGIT_STD", "read_spec", "save_spec", "load_spec", "shrink", "write_random_model"]

LOGIT_STD = 8.0
SPEC_VERSION = 1
# Keys that describe the file or the source model, not the architecture or the tokenizer: not copied.
_SKIP_PREFIXES = ("GGUF.", "general.")
_NORMAL, _BYTE, _USER_DEFINED = 1, 6, 4  # llama.cpp token types


def _jsonable(value: Any) -> Any:
    """A field's contents as JSON: bytes-like strings are decoded (surrogateescape keeps any invalid UTF-8)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "surrogateescape")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_spec(path: os.PathLike[str] | str) -> dict[str, Any]:
    """The architecture, hyperparameters, tokenizer keys and tensor list of a GGUF file (no weights)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    kv = []
    for key, field in reader.fields.items():
        if key.startswith(_SKIP_PREFIXES):
            continue
        types = [int(t) for t in field.types]
        kv.append({"key": key, "type": types[0], "sub": types[1] if len(types) > 1 else None,
                   "value": _jsonable(field.contents())})
    arch = reader.fields["general.architecture"].contents()
    tensors = [{"name": t.name, "ne": [int(n) for n in t.shape]} for t in reader.tensors]
    return {"version": SPEC_VERSION, "source": Path(path).name, "arch": arch, "kv": kv, "tensors": tensors}


def save_spec(spec: dict[str, Any], path: os.PathLike[str] | str) -> Path:
    """Write a spec as gzipped JSON (deterministic: no timestamp in the gzip header)."""
    path = Path(path)
    data = json.dumps(spec, ensure_ascii=True, separators=(",", ":")).encode()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as fh:
        fh.write(data)
    return path


def load_spec(path: os.PathLike[str] | str) -> dict[str, Any]:
    """Read a spec written by :func:`save_spec`."""
    with gzip.open(path, "rb") as fh:
        spec = json.loads(fh.read())
    if spec.get("version") != SPEC_VERSION:
        raise ValueError(f"{path}: spec version {spec.get('version')}, expected {SPEC_VERSION}")
    return spec


def _value(spec: dict[str, Any], key: str) -> Any:
    for e in spec["kv"]:
        if e["key"] == key:
            return e["value"]
    return None


def _set(spec: dict[str, Any], key: str, value: Any) -> None:
    for e in spec["kv"]:
        if e["key"] == key:
            e["value"] = value


def shrink(spec: dict[str, Any], *, n_layer: int = 2, head_dim: int | None = 8) -> dict[str, Any]:
    """The same architecture and tokenizer with fewer layers and a smaller head size (so a smaller embedding and
    feed-forward width): a model a CPU test writes and loads in seconds. Head counts are kept; ``head_dim=None``
    keeps every width (only the layers go)."""
    arch = spec["arch"]
    n_embd = int(_value(spec, f"{arch}.embedding_length"))
    n_head = int(_value(spec, f"{arch}.attention.head_count"))
    n_head_kv = int(_value(spec, f"{arch}.attention.head_count_kv") or n_head)
    n_ff = int(_value(spec, f"{arch}.feed_forward_length"))
    old_hd = int(_value(spec, f"{arch}.attention.key_length") or n_embd // n_head)
    out = json.loads(json.dumps(spec))
    out["tensors"] = [t for t in out["tensors"]
                      if not t["name"].startswith("blk.") or int(t["name"].split(".")[1]) < n_layer]
    _set(out, f"{arch}.block_count", n_layer)
    out["source"] = f"{spec['source']} ({n_layer} layers)"
    if head_dim is None or head_dim == old_hd:
        return out
    new = {n_embd: n_head * head_dim, n_head_kv * old_hd: n_head_kv * head_dim,
           n_ff: max(32, n_ff * head_dim // old_hd // 32 * 32)}
    if n_head * old_hd != n_embd:
        new[n_head * old_hd] = n_head * head_dim
    n_vocab = len(_value(spec, "tokenizer.ggml.tokens") or [])
    if len(new) != len({n_embd, n_head_kv * old_hd, n_ff, n_head * old_hd}) or n_vocab in new:
        raise ValueError(f"{spec['source']}: two of its dimensions are equal; cannot shrink them apart")
    for t in out["tensors"]:
        t["ne"] = [new.get(n, n) for n in t["ne"]]
    _set(out, f"{arch}.embedding_length", n_head * head_dim)
    _set(out, f"{arch}.feed_forward_length", new[n_ff])
    for key in (f"{arch}.attention.key_length", f"{arch}.attention.value_length", f"{arch}.rope.dimension_count"):
        _set(out, key, head_dim)
    out["source"] = f"{spec['source']} ({n_layer} layers, head size {head_dim})"
    return out


def _scales(spec: dict[str, Any], n_vocab: int) -> np.ndarray:
    """Per-token output scale: control, unknown and unused tokens lower, raw bytes a little lower."""
    scale = np.ones(n_vocab, dtype=np.float32)
    types = _value(spec, "tokenizer.ggml.token_type")
    if types is not None:
        types = np.asarray(types)
        scale[~np.isin(types, (_NORMAL, _BYTE, _USER_DEFINED))] = 0.25
        scale[types == _BYTE] = 0.5
    return scale


def _tensor(rng: np.random.Generator, name: str, ne: list[int], n_embd: int, vocab_scale: np.ndarray,
            tied: bool) -> np.ndarray:
    """One random tensor in numpy layout (GGUF's ne reversed: rows = outputs, columns = inputs)."""
    shape = tuple(reversed(ne))
    if len(ne) == 1:
        if name.endswith(".bias"):
            return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
        return (1.0 + rng.standard_normal(shape, dtype=np.float32) * 0.1).astype(np.float32)  # a norm
    if name == "token_embd.weight" or name == "output.weight":
        # The final RMS norm gives the hidden state a norm of ~sqrt(n_embd): rows of norm LOGIT_STD give
        # logits of std ~LOGIT_STD. (Input embeddings go through an RMS norm first: their scale is irrelevant.)
        std = LOGIT_STD / np.sqrt(n_embd) if (name == "output.weight" or tied) else 1.0
        x = rng.standard_normal(shape, dtype=np.float32) * std
        if name == "output.weight" or tied:
            x *= vocab_scale[: shape[0], None]
        return x.astype(np.float16)
    x = rng.standard_normal(shape, dtype=np.float32) * (1.0 / np.sqrt(ne[0]))
    return x.astype(np.float16)


def write_random_model(spec: dict[str, Any], path: os.PathLike[str] | str, *, seed: int = 0,
                       name: str | None = None) -> Path:
    """Write a GGUF file with ``spec``'s architecture, keys and tensor shapes and random weights (matrices F16,
    vectors F32) to ``path`` (atomically); return the path."""
    import gguf

    path = Path(path)
    arch = spec["arch"]
    names = {t["name"] for t in spec["tensors"]}
    tied = "output.weight" not in names
    n_embd = int(_value(spec, f"{arch}.embedding_length"))
    n_vocab = len(_value(spec, "tokenizer.ggml.tokens"))
    vocab_scale = _scales(spec, n_vocab)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(name or f"random {spec['source']} seed {seed}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for e in spec["kv"]:
        vtype = gguf.GGUFValueType(e["type"])
        sub = gguf.GGUFValueType(e["sub"]) if e["sub"] is not None else None
        value = e["value"]
        if vtype == gguf.GGUFValueType.STRING:
            value = value.encode("utf-8", "surrogateescape")
        elif sub == gguf.GGUFValueType.STRING:
            value = [v.encode("utf-8", "surrogateescape") for v in value]
        w.add_key_value(e["key"], value, vtype, sub_type=sub)
    rng = np.random.default_rng(seed)
    for t in spec["tensors"]:
        w.add_tensor(t["name"], _tensor(rng, t["name"], t["ne"], n_embd, vocab_scale, tied))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    os.replace(tmp, path)
    return path


def main() -> int:
    """``python scripts/gpu_models.py SPEC OUT.gguf [--seed N] [--shrink LAYERS HEAD_SIZE]``."""
    import argparse
    import time

    ap = argparse.ArgumentParser(description="Write a random-weight GGUF model from a spec (scripts/gpu-check).")
    ap.add_argument("spec", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shrink", type=int, nargs=2, metavar=("LAYERS", "HEAD_SIZE"), help="a small variant")
    args = ap.parse_args()
    t0 = time.perf_counter()
    spec = load_spec(args.spec)
    if args.shrink:
        spec = shrink(spec, n_layer=args.shrink[0], head_dim=args.shrink[1])
    write_random_model(spec, args.out, seed=args.seed)
    print(f"{args.out.name}: {spec['source']}, {args.out.stat().st_size / 2**20:.0f} MiB in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
