"""Does llama.cpp run on this machine? One real decode in a separate process, and what to do if it crashes.

A crash inside llama.cpp (a segmentation fault, an illegal instruction) ends the Python process: it cannot be
caught where it happens. So the check decodes a prompt of a few hundred tokens in a child process and reads its
exit status. The crash met in practice: pip builds llama.cpp with ``-march=native`` and reuses that wheel from
its cache; a wheel built on a CPU with Intel AMX uses AMX tiles for batches of prompt tokens, and in some
virtual machines (Firecracker guests on Sapphire Rapids) those instructions fault although the CPU lists them.
The fix is to build llama-cpp-python again with the AMX flags turned off (:func:`rebuild_command`);
``scripts/check-llama-build`` does that on the project's own machines.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# gcc and clang flags that keep AMX instructions out of a -march=native build (given before -march=native).
NO_AMX_FLAGS = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")
CRASH_SIGNALS = (signal.SIGSEGV, signal.SIGILL, signal.SIGBUS, signal.SIGFPE)  # faults of the code itself
PROMPT_TOKENS = 200  # enough for llama.cpp to take its batched matrix path (short prompts ran fine on AMX)
TIMEOUT_S = 300.0

# Run in the child: load the model, decode one batch of prompt tokens, print how many and how long it took.
_CHILD = """
import sys, time
import llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_batch=512, n_threads=1, verbose=False)
tokens = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 40)[:int(sys.argv[2])]
began = time.perf_counter()
llm.eval(tokens)
print(len(tokens), time.perf_counter() - began)
"""


@dataclass(frozen=True)
class DecodeCheck:
    """The outcome of one test decode in a child process."""

    ok: bool
    detail: str  # what happened, one line: "200 prompt tokens in 1.3 s", "Segmentation fault", "exit 1: ..."
    crashed: bool = False  # killed by a fault in native code (CRASH_SIGNALS): not an error, a hang or the OOM killer
    timed_out: bool = False


def llama_version() -> str:
    """The installed llama-cpp-python's version, or "not installed"."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def build_features() -> list[str]:
    """The CPU features the installed llama.cpp was built to use (``AVX2``, ``AMX_INT8``, ...), as llama.cpp
    reports them. Reading them runs no model, so it is safe even where decoding crashes."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    return sorted(set(re.findall(r"([A-Z][A-Z0-9_]*) = 1", text)))


def cpu_has_amx() -> bool:
    """Whether this CPU announces AMX (Linux x86-64; elsewhere False)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False


def decode_check(model: Path, *, tokens: int = PROMPT_TOKENS, timeout: float = TIMEOUT_S,
                 child_code: str | None = None) -> DecodeCheck:
    """Decode ``tokens`` prompt tokens of ``model`` in a child process and report how that went.

    ``child_code`` is the program the child runs (``sys.argv[1:]`` = model path, token count; default: the real
    test decode); only tests pass another, to make a real child crash without needing a broken build.
    """
    began = time.perf_counter()
    # GGML_NO_BACKTRACE: on a crash ggml would start gdb for a backtrace, which can keep the pipes open.
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
    try:
        done = subprocess.run([sys.executable, "-c", child_code or _CHILD, str(model), str(tokens)],
                              capture_output=True, text=True, errors="replace", timeout=timeout,
                              stdin=subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired:
        return DecodeCheck(False, f"no result after {timeout:g} s (the child process was stopped)", timed_out=True)
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    last = f": {lines[-1]}" if lines else ""
    if done.returncode < 0:  # killed by a signal
        number = -done.returncode
        try:
            name = signal.strsignal(number) or signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return DecodeCheck(False, f"{name}{last}", crashed=number in CRASH_SIGNALS)
    if done.returncode != 0:
        return DecodeCheck(False, f"exit {done.returncode}{last or ': no message'}")
    try:
        n, seconds = done.stdout.split()[-2:]
        return DecodeCheck(True, f"{int(n)} prompt tokens in {float(seconds):.2f} s")
    except ValueError:
        return DecodeCheck(True, f"decoded in {time.perf_counter() - began:.1f} s")


def rebuild_command(version: str | None = None, *, no_amx: bool = True) -> str:
    """The shell command that builds the installed llama-cpp-python again, here (``no_amx``: without AMX).

    ``--no-cache-dir``: the cached wheel is the one that crashes, and pip's cache key ignores ``CMAKE_ARGS``.
    """
    flags = " ".join(NO_AMX_FLAGS)  # (no quote, $ or backslash in them: safe inside double quotes)
    cmake = f"CMAKE_ARGS=\"-DCMAKE_C_FLAGS='{flags}' -DCMAKE_CXX_FLAGS='{flags}'\" " if no_amx else ""
    pin = f"=={version}" if version and version != "not installed" else ""
    return (f"{cmake}{shlex.quote(sys.executable)} -m pip install --no-cache-dir --force-reinstall --no-deps "
            f"llama-cpp-python{pin}")


def advice(check: DecodeCheck, features: list[str]) -> str:
    """What to do about a failed check, one sentence."""
    if check.crashed and any(f.startswith("AMX") for f in features):
        return ("this llama.cpp build uses AMX, whose instructions fault in some virtual machines; build it "
                f"again without AMX: {rebuild_command(llama_version())}")
    if check.crashed:
        return ("llama.cpp itself crashed on this CPU; build llama-cpp-python again here and run this again: "
                f"{rebuild_command(llama_version(), no_amx=False)}")
    if check.timed_out:
        return ("the machine may be too busy (another model running?) or too short of memory; try again when "
                "it is idle, or with a smaller model (`edge-ensemble doctor smollm2-135m-instruct`)")
    return "check that the file is a GGUF model llama.cpp can load (`edge-ensemble models info FILE`)"
