"""A slimmed llama-cpp-python source package for the GPU check: small enough to travel to the device machine.

The sdist (76.6 MB for 0.3.36) carries llama.cpp's vocabulary GGUFs, docs and images, the web UI, tests,
examples, tools and a whole .git directory, none of which the CMake build of the Python package reads. What it
reads is kept whole: llama_cpp/, the top-level CMake and packaging files, and under vendor/llama.cpp everything but
the directories below - ggml (every backend, the CUDA sources included), src, include, common, vendor, cmake,
licenses and tools/mtmd (the package builds libmtmd unless LLAVA_BUILD is off).

    slim_sdist(full_sdist, out_dir) -> Path of out_dir/llama_cpp_python-<version>.tar.gz
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path, PurePosixPath

__all__ = ["DROPPED", "KEPT_TOOLS", "SOURCE_DIRS", "SOURCE_SUFFIXES", "dropped", "slim_sdist", "missing_sources"]

# Directories (relative to the package root) the build does not read.
DROPPED = (
    ".git", ".github", "docs", "tests", "examples", "docker",
    "vendor/llama.cpp/.git", "vendor/llama.cpp/.github", "vendor/llama.cpp/.devops",
    "vendor/llama.cpp/models",  # vocabulary GGUFs (tests only): 75 MB
    "vendor/llama.cpp/docs", "vendor/llama.cpp/media", "vendor/llama.cpp/tests", "vendor/llama.cpp/examples",
    "vendor/llama.cpp/pocs", "vendor/llama.cpp/benches", "vendor/llama.cpp/gguf-py", "vendor/llama.cpp/conversion",
    "vendor/llama.cpp/scripts", "vendor/llama.cpp/ci", "vendor/llama.cpp/skills", "vendor/llama.cpp/requirements",
    "vendor/llama.cpp/grammars",
)
# Everything under vendor/llama.cpp/tools is dropped (server + its web UI, CLIs) except these.
KEPT_TOOLS = ("mtmd",)
# Where the sources of the build live, and what a source file is: the test checks that none of them is dropped.
SOURCE_DIRS = ("llama_cpp", "vendor/llama.cpp/ggml", "vendor/llama.cpp/src", "vendor/llama.cpp/include",
               "vendor/llama.cpp/common", "vendor/llama.cpp/vendor", "vendor/llama.cpp/cmake",
               "vendor/llama.cpp/tools/mtmd")
SOURCE_SUFFIXES = (".c", ".cc", ".cpp", ".cu", ".cuh", ".h", ".hpp", ".inc", ".cmake", ".txt", ".in", ".metal",
                   ".comp", ".glsl", ".py", ".m", ".mm")


def dropped(rel: str) -> bool:
    """Whether a path relative to the package root (``vendor/llama.cpp/models/x.gguf``) is left out."""
    parts = PurePosixPath(rel).parts
    for d in DROPPED:
        dp = PurePosixPath(d).parts
        if parts[: len(dp)] == dp:
            return True
    tools = ("vendor", "llama.cpp", "tools")
    return len(parts) > 3 and parts[:3] == tools and parts[3] not in KEPT_TOOLS


def _rel(name: str) -> str:
    """A member name without the top directory (``llama_cpp_python-0.3.36/``)."""
    return name.split("/", 1)[1] if "/" in name else ""


def slim_sdist(sdist: Path | str, out_dir: Path | str) -> Path:
    """Write the slimmed copy of ``sdist`` (same file name, same top directory) into ``out_dir``; return it.
    Deterministic for a given input (members in the original order, mtimes kept, no gzip timestamp)."""
    sdist, out_dir = Path(sdist), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / sdist.name
    if out.resolve() == sdist.resolve():
        raise ValueError(f"{sdist}: the slimmed package would overwrite its source; give another directory")
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(sdist, "r:gz") as src, open(tmp, "wb") as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as dst:  # type: ignore[call-overload]
        for member in src:
            if dropped(_rel(member.name)):
                continue
            data = src.extractfile(member) if member.isfile() else None
            dst.addfile(member, io.BytesIO(data.read()) if data is not None else None)
    tmp.replace(out)
    return out


def _listing(sdist: Path | str) -> set[str]:
    with tarfile.open(sdist, "r:gz") as t:
        return {_rel(m.name) for m in t if m.isfile()}


def missing_sources(full: Path | str, slim: Path | str) -> list[str]:
    """Source files of the build (:data:`SOURCE_DIRS`, :data:`SOURCE_SUFFIXES`, every CMakeLists.txt) that are
    in the full sdist but not in the slimmed one: empty when the slimming kept the build whole."""
    kept = _listing(slim)
    need = []
    for rel in sorted(_listing(full)):
        in_dirs = any(rel == d or rel.startswith(d + "/") for d in SOURCE_DIRS)
        is_source = rel.endswith(SOURCE_SUFFIXES) or PurePosixPath(rel).name == "CMakeLists.txt"
        if is_source and (in_dirs or PurePosixPath(rel).name == "CMakeLists.txt" and not dropped(rel)):
            need.append(rel)
    return [r for r in need if r not in kept]
