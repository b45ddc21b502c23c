"""`edge-ensemble doctor`: a real test decode in a child process, and a clear line when that child crashes.

The crash is real too: a child program that kills itself with SIGSEGV stands in for a llama.cpp build that
faults on this CPU (no such build can be made on purpose here).
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_ensemble import doctor
from edge_ensemble.cli import cli

_SEGFAULT = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"


def test_decode_check_runs_a_real_model(tiny_bpe: Path) -> None:
    check = doctor.decode_check(tiny_bpe, tokens=100)
    assert check.ok and not check.crashed
    assert check.detail.startswith("100 prompt tokens in "), check.detail


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_crashing_child_is_reported_not_fatal(tiny_bpe: Path) -> None:
    check = doctor.decode_check(tiny_bpe, child_code=_SEGFAULT)
    assert not check.ok and check.crashed and not check.timed_out
    assert "segmentation" in check.detail.lower() or "SIGSEGV" in check.detail
    # With AMX in the build, the advice is the rebuild without it; the command pins the installed version.
    said = doctor.advice(check, ["AVX2", "AMX_INT8"])
    assert "-mno-amx-tile" in said and "--no-cache-dir" in said and doctor.llama_version() in said
    assert "AMX" not in doctor.advice(check, ["AVX2"]) and "--force-reinstall" in doctor.advice(check, ["AVX2"])


def test_a_kill_that_is_not_a_fault_is_no_crash(tiny_bpe: Path) -> None:
    # The OOM killer's SIGKILL: rebuilding llama.cpp would not help.
    check = doctor.decode_check(tiny_bpe, child_code="import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert not check.ok and not check.crashed


def test_a_child_that_hangs_is_stopped(tiny_bpe: Path) -> None:
    check = doctor.decode_check(tiny_bpe, child_code="import time; time.sleep(60)", timeout=1)
    assert not check.ok and check.timed_out and not check.crashed
    assert check.detail.startswith("no result after 1 s") and "busy" in doctor.advice(check, ["AMX_INT8"])


def test_the_rebuild_command_passes_the_flags_to_cmake_as_c_and_cxx_flags() -> None:
    command = doctor.rebuild_command("0.3.36")
    # What sh hands pip in CMAKE_ARGS: the assignment before the interpreter, run with printf in pip's place.
    assignment = command.split(shlex.quote(sys.executable))[0]
    shown = subprocess.run(["sh", "-c", assignment + """sh -c 'printf %s "$CMAKE_ARGS"'"""],
                           capture_output=True, text=True, check=True).stdout
    flags = " ".join(doctor.NO_AMX_FLAGS)
    # scikit-build-core splits CMAKE_ARGS the way shlex does: one -D each for the C and the C++ flags.
    assert shlex.split(shown) == [f"-DCMAKE_C_FLAGS={flags}", f"-DCMAKE_CXX_FLAGS={flags}"], shown
    words = shlex.split(command)
    assert words[-1] == "llama-cpp-python==0.3.36" and "--no-cache-dir" in words and "--no-deps" in words


def test_a_python_error_in_the_child_is_its_last_line(tiny_bpe: Path) -> None:
    check = doctor.decode_check(tiny_bpe, child_code="raise SystemExit('cannot load it')")
    assert not check.ok and not check.crashed
    assert check.detail == "exit 1: cannot load it"


def test_build_features_are_read_without_running_a_model() -> None:
    features = doctor.build_features()
    baseline = "SSE3" if platform.machine().lower() in ("x86_64", "amd64") else "NEON"
    assert baseline in features, features


def test_cli_exit_3_when_the_child_crashes(tiny_bpe: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real command, with a child program that really dies of SIGSEGV in place of the test decode.
    monkeypatch.setattr(doctor, "_CHILD", _SEGFAULT)
    result = CliRunner().invoke(cli, ["doctor", str(tiny_bpe)])
    assert result.exit_code == 3, result.output
    assert "error: llama.cpp crashed in the test decode (" in result.output


def test_cli_a_preset_is_not_a_model() -> None:
    result = CliRunner().invoke(cli, ["doctor", "tiny"])
    assert result.exit_code == 2 and "tiny is a preset, not a model" in result.output


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


def test_check_llama_build_rebuilds_only_after_a_crash(tmp_path: Path) -> None:
    # A model that is not there is exit 1 from doctor: the script passes it on and builds nothing.
    script = Path(__file__).resolve().parents[1] / "scripts" / "check-llama-build"
    done = subprocess.run(["sh", str(script), str(tmp_path / "missing.gguf")], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 1 and "building it again" not in done.stderr
    assert "error: model file not found" in done.stderr
