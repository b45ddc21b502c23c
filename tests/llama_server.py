"""Helpers for tests and benchmarks that need a real llama-server on loopback, and a fault-injecting proxy.

``llama_server_binary()`` finds the binary built by scripts/build-llama-server (or ``$EDGE_ENSEMBLE_LLAMA_SERVER``);
``Server`` starts one on a free loopback port with one thread and stops it; ``FaultProxy`` stands between a
client and a server and, from a chosen request on, delays, drops or garbles answers (a real llama-server
cannot be made to send malformed JSON or to stall on demand).
"""

from __future__ import annotations

import http.client
import importlib.metadata
import os
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def llama_server_binary() -> Path | None:
    """The llama-server for the installed llama-cpp-python, or None when it has not been built."""
    env = os.environ.get("EDGE_ENSEMBLE_LLAMA_SERVER")
    if env:
        return Path(env) if Path(env).is_file() else None
    version = importlib.metadata.version("llama-cpp-python")
    cache = Path(os.environ.get("EDGE_ENSEMBLE_CACHE") or Path.home() / ".cache" / "edge-ensemble")
    path = cache / "llama-server" / version / "llama-server"
    return path if path.is_file() else None


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A llama-server process serving ``model`` on 127.0.0.1 (one thread, ``slots`` slots)."""

    def __init__(self, binary: Path, model: Path, *, slots: int = 2, n_ctx: int = 4096, log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = model
        args = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                "--threads", "1", "--threads-batch", "1", "-np", str(slots), "-c", str(n_ctx * slots),
                "--no-warmup", "--no-webui", "--flash-attn", "off"]  # off: as a local member (a different kernel changes the last bits)
        out = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode} before it was ready")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama-server on port {self.port} was not ready within {timeout:g} s")

    def spec(self, model: object | None = None) -> str:
        """The member spec of this server, declaring ``model`` (default: the file it serves)."""
        return f"server:{self.url}={model if model is not None else self.model}"

    def kill(self) -> None:
        """Kill -9 (a server that dies)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FaultProxy:
    """Forwards requests to ``target_port``; from the ``after``-th ``/completion`` on it misbehaves:
    ``mode`` "slow" (sleeps ``delay`` s first), "garble" (answers 200 with text that is not JSON) or "drop"
    (closes the connection without an answer). Until then it is transparent."""

    def __init__(self, target_port: int, mode: str, after: int = 0, delay: float = 5.0) -> None:
        self.target_port, self.mode, self.after, self.delay = target_port, mode, after, delay
        self.completions = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._forward(None)

            def do_POST(self) -> None:
                self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def _forward(self, body: bytes | None) -> None:
                if self.path == "/completion":
                    proxy.completions += 1
                    if proxy.completions > proxy.after:
                        if proxy.mode == "slow":
                            time.sleep(proxy.delay)
                        elif proxy.mode == "garble":
                            self._answer(200, b"<html>502 Bad Gateway</html>")
                            return
                        elif proxy.mode == "drop":
                            self.close_connection = True
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=60)
                conn.request(self.command, self.path, body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                self._answer(resp.status, resp.read())
                conn.close()

            def _answer(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
