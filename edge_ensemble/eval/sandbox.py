"""Run a HumanEval sample in a separate, resource-limited Python process.

Generated code is never executed in this process. The child runs in a fresh temporary directory with an
isolated interpreter (``-I``), a stripped environment whose proxies point at a closed port, socket
connections disabled, and limits on CPU time, memory (2 GiB address space), file size and core dumps that
are set before any generated code runs. A sample passes only if ``check(entry_point)`` returns and the
harness then prints a per-run random token: a sample that calls ``sys.exit(0)`` or ``os._exit(0)`` before
the tests finish exits cleanly but never prints it.
"""

from __future__ import annotations

import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MEMORY_LIMIT_BYTES = 2 * 1024**3
FILE_SIZE_LIMIT_BYTES = 32 * 1024**2
_OUTPUT_TAIL_BYTES = 64 * 1024
_DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused

# Runs first in the child: set the limits, block sockets, run the program as __main__, then print the token.
# Limits are set here rather than in a preexec_fn: the parent holds llama.cpp threads, and preexec_fn is
# unsafe with threads (and forces a full fork of a process with gigabytes of mapped models).
_HARNESS = """\
import resource, runpy, socket, sys

def _limit(which, value):
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))

_limit(resource.RLIMIT_CPU, {cpu_seconds})
_limit(resource.RLIMIT_AS, {memory})
_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_FSIZE, {file_size})

def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")

socket.socket.connect = socket.socket.connect_ex = _no_network
socket.create_connection = socket.getaddrinfo = _no_network
runpy.run_path({program!r}, run_name="__main__")
sys.stdout.write({token!r} + "\\n")
sys.stdout.flush()
"""


def build_program(problem: dict[str, Any], completion: str) -> str:
    """The test program: prompt + completion + the problem's tests + ``check(entry_point)``."""
    return (
        f"{problem['prompt']}{completion}\n\n\n"
        f"{problem['test']}\n\n\n"
        f"check({problem['entry_point']})\n"
    )


def _child_environment(workdir: str) -> dict[str, str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }
    # Proxy-aware clients are sent to a closed port; no_proxy is left unset because "*" would make them
    # bypass that dead proxy and try a direct connection.
    for name in ("http_proxy", "https_proxy", "all_proxy", "ftp_proxy"):
        env[name] = env[name.upper()] = _DEAD_PROXY
    return env


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - _OUTPUT_TAIL_BYTES))
        return f.read().decode("utf-8", errors="replace")


def _failure_reason(returncode: int, stderr: str) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)"}.get(name, "")
        return f"killed by {name}{hint}"
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    if returncode != 0 and lines:
        return lines[-1][:300]
    if returncode == 0:
        return "exited before the tests finished (exit code 0)"
    return f"exited with code {returncode}"


def run_humaneval_sample(problem: dict[str, Any], completion: str, timeout: float = 10.0) -> tuple[bool, str]:
    """Run ``problem``'s tests on ``prompt + completion`` in a sandboxed subprocess; (passed, reason).

    A sample that fails, hangs (killed with its whole process group after ``timeout`` seconds), crashes
    or exits early is a failed sample; this function always returns.
    """
    token = f"edge-ensemble-check-passed-{secrets.token_hex(16)}"
    cpu_seconds = math.ceil(timeout) + 1
    with tempfile.TemporaryDirectory(prefix="edge-ensemble-humaneval-", ignore_cleanup_errors=True) as tmp:
        workdir = Path(tmp)
        program = workdir / "program.py"
        program.write_text(build_program(problem, completion), encoding="utf-8")
        harness = workdir / "harness.py"
        harness.write_text(_HARNESS.format(
            program=str(program), token=token, cpu_seconds=cpu_seconds,
            memory=MEMORY_LIMIT_BYTES, file_size=FILE_SIZE_LIMIT_BYTES,
        ), encoding="utf-8")
        out_path, err_path = workdir / "stdout.txt", workdir / "stderr.txt"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            start = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", str(harness)],
                cwd=tmp,
                env=_child_environment(tmp),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                close_fds=True,
                start_new_session=True,  # own process group, so a timeout kills its children too
            )
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.wait()
                return False, f"timed out after {timeout:g} s"
            finally:
                _kill_group(proc.pid)  # background processes the sample may have left behind
            elapsed = time.monotonic() - start
        stdout, stderr = _tail(out_path), _tail(err_path)
    if returncode == 0 and token in stdout.splitlines():
        return True, f"passed in {elapsed:.2f} s"
    return False, _failure_reason(returncode, stderr)
