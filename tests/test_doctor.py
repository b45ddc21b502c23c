"""`edge-ensemble doctor`: a real test decode in a child process, and a clear line when that child crashes.

The crash is real too: a child program that kills itself with SIGSEGV stands in for a llama.cpp build that
faults on this CPU (no such build can be made on purpose here).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_ensemble import doctor

_SEGFAULT = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"


def test_decode_check_runs_a_real_model(tiny_bpe: Path) -> None:
    check = doctor.decode_check(tiny_bpe, tokens=100)
    assert check.ok and not check.crashed
    assert check.detail.startswith("100 prompt tokens in "), check.detail


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_crashing_child_is_reported_not_fatal(tiny_bpe: Path) -> None:
    check = doctor.decode_check(tiny_bpe, child_code=_SEGFAULT)
    assert not check.ok and check.crashed
    assert "segmentation" in check.detail.lower() or "SIGSEGV" in check.detail
    # With AMX in the build, the advice is the rebuild without it; the command pins the installed version.
    said = doctor.advice(check, ["AVX2", "AMX_INT8"])
    assert "-mno-amx-tile" in said and "--no-cache-dir" in said and doctor.llama_version() in said
    assert "AMX" not in doctor.advice(check, ["AVX2"])


def test_a_python_error_in_the_child_is_its_last_line(tiny_bpe: Path) -> None:
    check = doctor.decode_check(tiny_bpe, child_code="raise SystemExit('cannot load it')")
    assert not check.ok and not check.crashed
    assert check.detail == "exit 1: cannot load it"


def test_build_features_are_read_without_running_a_model() -> None:
    features = doctor.build_features()
    assert features and all(f == f.upper() for f in features)  # e.g. SSE3 on x86-64, NEON on ARM


def test_cli_doctor_on_a_file_and_on_bad_input(tiny_bpe: Path, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edge_ensemble.cli", "doctor", *args], capture_output=True,
                              text=True, timeout=300, stdin=subprocess.DEVNULL)

    ok = run(str(tiny_bpe))
    assert ok.returncode == 0, ok.stderr
    assert "llama.cpp built for:" in ok.stdout and ok.stdout.splitlines()[-1].startswith("ok: 200 prompt tokens")
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model")
    for bad in (str(tmp_path / "missing.gguf"), str(not_gguf)):
        done = run(bad)
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1, done.stderr
