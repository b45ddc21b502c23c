"""The CPU half of the GPU check (scripts/gpu-check, docs/gpu-check.md): the slimmed llama-cpp-python source
package is small and keeps every source of the build; the random-weight models with real shapes and tokenizers
load and generate through edge-ensemble; ``gpu-check run --dry-run`` passes end to end on the CPU."""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_models  # noqa: E402
import gpu_slim  # noqa: E402

SCRIPT = ROOT / "scripts" / "gpu-check"


def _script() -> ModuleType:
    """scripts/gpu-check as a module (no .py suffix)."""
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def full_sdist() -> Path:
    """The pinned llama-cpp-python sdist, downloaded from PyPI once into ~/.cache/edge-ensemble/sdist."""
    return _script().full_sdist(importlib.metadata.version("llama-cpp-python"))


def _files(sdist: Path) -> set[str]:
    with tarfile.open(sdist, "r:gz") as t:
        return {m.name.split("/", 1)[1] for m in t if m.isfile() and "/" in m.name}


# ------------------------------------------------------------------------------------------------- slimming

def test_dropped_paths_are_the_ones_the_build_does_not_read() -> None:
    assert gpu_slim.dropped("vendor/llama.cpp/models/ggml-vocab-gpt-2.gguf")
    assert gpu_slim.dropped("vendor/llama.cpp/tools/server/webui/index.html")
    assert gpu_slim.dropped("vendor/llama.cpp/docs/build.md") and gpu_slim.dropped(".git/HEAD")
    assert not gpu_slim.dropped("vendor/llama.cpp/tools/mtmd/clip.cpp")
    assert not gpu_slim.dropped("vendor/llama.cpp/ggml/src/ggml-cuda/fattn.cu")
    assert not gpu_slim.dropped("vendor/llama.cpp/ggml/src/ggml-cuda/template-instances/mmq-instance-q4_0.cu")
    assert not gpu_slim.dropped("llama_cpp/llama.py") and not gpu_slim.dropped("CMakeLists.txt")
    assert not gpu_slim.dropped("vendor/llama.cpp/models-extra/x.c")  # a prefix of a name is not the directory


def _tar(path: Path, names: list[str]) -> Path:
    import io

    with tarfile.open(path, "w:gz") as t:
        for name in names:
            info = tarfile.TarInfo(f"pkg-1.0/{name}")
            info.size = len(name)
            t.addfile(info, io.BytesIO(name.encode()))
    return path


def test_missing_sources_names_a_build_source_the_slim_package_lacks(tmp_path: Path) -> None:
    names = ["CMakeLists.txt", "vendor/llama.cpp/ggml/src/ggml-cuda/fattn.cu", "vendor/llama.cpp/models/v.gguf",
             "vendor/llama.cpp/tools/server/server.cpp", "vendor/llama.cpp/tools/mtmd/clip.cpp"]
    full = _tar(tmp_path / "pkg-1.0.tar.gz", names)
    slim = gpu_slim.slim_sdist(full, tmp_path / "slim")
    assert _files(slim) == {names[0], names[1], names[4]}
    assert gpu_slim.missing_sources(full, slim) == []
    broken = _tar(tmp_path / "broken.tar.gz", [names[0], names[4]])
    assert gpu_slim.missing_sources(full, broken) == ["vendor/llama.cpp/ggml/src/ggml-cuda/fattn.cu"]
    with pytest.raises(ValueError):
        gpu_slim.slim_sdist(full, tmp_path)  # would overwrite its source


def test_slimmed_sdist_is_under_40_mib_and_keeps_every_build_source(full_sdist: Path, tmp_path: Path) -> None:
    slim = gpu_slim.slim_sdist(full_sdist, tmp_path)
    assert slim.name == full_sdist.name
    assert slim.stat().st_size < 40 * 2**20 < full_sdist.stat().st_size
    assert gpu_slim.missing_sources(full_sdist, slim) == []
    full, kept = _files(full_sdist), _files(slim)
    assert kept < full
    cuda = {f for f in full if f.startswith("vendor/llama.cpp/ggml/src/ggml-cuda/")}
    assert len(cuda) > 200 and cuda <= kept  # every CUDA source and template instance
    for tree in ("vendor/llama.cpp/ggml/", "vendor/llama.cpp/src/", "vendor/llama.cpp/include/", "llama_cpp/"):
        assert {f for f in full if f.startswith(tree)} <= kept, tree
    assert {"PKG-INFO", "pyproject.toml", "CMakeLists.txt", "vendor/llama.cpp/CMakeLists.txt"} <= kept
    assert not any(f.endswith(".gguf") for f in kept)


# ------------------------------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def specs(real_models) -> dict[str, dict]:
    keys = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct")
    return {key: gpu_models.read_spec(real_models(key)) for key in keys}


@pytest.mark.real
def test_spec_round_trips_and_a_one_layer_model_has_the_real_shapes(specs, real_models, tmp_path: Path) -> None:
    import gguf

    spec = specs["smollm2-135m-instruct"]
    assert gpu_models.load_spec(gpu_models.save_spec(spec, tmp_path / "s.json.gz")) == spec
    path = gpu_models.write_random_model(gpu_models.shrink(spec, n_layer=1, head_dim=None), tmp_path / "one.gguf")
    real = {t.name: list(t.shape) for t in gguf.GGUFReader(real_models("smollm2-135m-instruct")).tensors}
    made = gguf.GGUFReader(path)
    shapes = {t.name: list(t.shape) for t in made.tensors}
    assert shapes == {n: s for n, s in real.items() if not n.startswith("blk.") or n.startswith("blk.0.")}
    tokens = made.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == 49152 and made.fields["llama.block_count"].contents() == 1


@pytest.mark.real
def test_small_random_models_tokenize_like_the_real_ones_and_generate_through_an_ensemble(specs, real_models,
                                                                                        tmp_path: Path) -> None:
    from edge_ensemble.api import Ensemble, EnsembleConfig
    from edge_ensemble.runtime import LoadOptions, Model

    paths = {}
    for (key, spec), head_dim in zip(specs.items(), (8, 4)):
        paths[key] = gpu_models.write_random_model(gpu_models.shrink(spec, n_layer=2, head_dim=head_dim),
                                                   tmp_path / f"{key}.gguf", seed=len(paths))
        text = "def f(x):\n    return x ** 2  # 東京 🌞"
        real = Model(real_models(key), LoadOptions(vocab_only=True))
        made = Model(paths[key], LoadOptions(n_ctx=256))
        assert made.tokenize(text, add_bos=True) == real.tokenize(text, add_bos=True)
        logits = np.array(made.decode(made.tokenize(text, add_bos=True)), dtype=np.float64).ravel()
        assert np.isfinite(logits).all() and 2.0 < logits.std() < 32.0  # peaked, not degenerate
        real.close()
        made.close()
    drafter, other = paths["qwen2.5-coder-0.5b-instruct"], paths["smollm2-135m-instruct"]
    cfg = EnsembleConfig(n_ctx=512, check_memory=False, gate=None)
    with Ensemble([drafter, other], config=cfg, progress=False) as ens:
        result = ens.generate("Why is the sky blue?", max_tokens=8)
    assert result.stats.tokens >= 1 and result.finish_reason in ("length", "stop")
    assert result.stats.ensembled_fraction > 0  # the two vocabularies were aligned (cross-tokenizer path)


# ------------------------------------------------------------------------------------------------- dry run

@pytest.mark.real
def test_gpu_check_prepare_then_run_dry_passes_on_the_cpu(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    prepared, scratch = tmp_path / "prepared", tmp_path / "scratch"
    prep = subprocess.run([sys.executable, str(SCRIPT), "prepare", "--out", str(prepared)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    info = json.loads((prepared / "prepare.json").read_text())
    assert info["slim_sdist_bytes"] < 40 * 2**20 and info["missing_sources"] == []
    assert info["carried_bytes"] < 16 * 2**20  # leaves the repository most of the 64 MiB that travel
    run = subprocess.run([sys.executable, str(SCRIPT), "run", "--dry-run", "--out", str(prepared), "--scratch",
                          str(scratch)], env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    results = scratch / "results"
    checks = json.loads((results / "identities.json").read_text())
    assert len(checks) == 10 and all(c["ok"] for c in checks), checks
    md = (results / "gpu-check.md").read_text()
    assert "## Identities" in md and "Gated SAFE / drafter alone" in md and "| B | together" in md
    records = [json.loads(line) for line in (results / "speed.jsonl").read_text().splitlines()]
    assert {r["policy"] for r in records} >= {"single", "every-token", "safe"}


def test_gpu_check_run_without_prepare_says_so_and_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, str(SCRIPT), "run", "--dry-run", "--out", str(tmp_path / "none"),
                          "--scratch", str(tmp_path / "scratch")], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "nothing prepared under" in run.stdout and "scripts/gpu-check prepare" in run.stdout
    assert "Traceback" not in run.stdout + run.stderr
