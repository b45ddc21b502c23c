"""A loopback imitation of the Hugging Face hub's file endpoint, for tests.

It serves ``HEAD``/``GET /{org}/{repo}/resolve/{revision}/{path}`` the way huggingface-hub (file_download.py)
expects: ``X-Repo-Commit`` (required: without it the client refuses the server), ``ETag`` (the blob name in
the cache; a sha256 here, as for LFS files), ``Content-Length``, ``Accept-Ranges`` and 206 answers to
``Range: bytes=N-`` (used to resume). Errors carry ``X-Error-Code`` (RepoNotFound / RevisionNotFound /
EntryNotFound), which huggingface-hub maps to its exception classes. ``GET /api/models/{org}/{repo}`` and
``.../revision/{revision}`` answer as the hub's model-info API (``HfApi.model_info``) does, with what this
imitation needs of it: ``id``, ``sha`` (the commit) and ``siblings`` (``rfilename`` of every file at that commit).

Faults for tests: ``cut_gets`` cuts the next N GET bodies off half-way (Content-Length promises the whole
body, the connection closes after half of it); ``not_a_hub`` answers everything with a plain 200 page and
no hub headers (a captive portal, a wrong HF_ENDPOINT).
Point huggingface-hub at it with ``HF_ENDPOINT=hub.url``. Every request is recorded in ``hub.requests``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_MODEL_INFO = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$")


def fake_commit(name: str) -> str:
    """A stable 40-hex commit id for a revision name."""
    return hashlib.sha1(name.encode()).hexdigest()


@dataclass
class Request:
    method: str
    path: str  # as sent (URL-quoted)
    revision: str  # unquoted
    range: str | None


@dataclass
class FakeHub:
    """State of the fake hub; use as a context manager to run the server in a thread."""

    # repo_id -> revision name (branch/tag/commit) -> commit id
    revisions: dict[str, dict[str, str]] = field(default_factory=dict)
    # (repo_id, commit, filename) -> content
    files: dict[tuple[str, str, str], bytes] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    cut_gets: int = 0
    cut_files: set[str] = field(default_factory=set)  # filenames whose every GET is cut short
    not_a_hub: bool = False

    def add_file(self, repo_id: str, filename: str, content: bytes, revision: str = "main") -> str:
        """Publish ``content`` as ``filename`` at ``revision`` of ``repo_id``; returns the commit id."""
        commit = fake_commit(f"{repo_id}@{revision}")
        revs = self.revisions.setdefault(repo_id, {})
        revs[revision] = commit
        revs[commit] = commit  # a commit id is a revision too
        self.files[(repo_id, commit, filename)] = content
        return commit

    def paths_seen(self, method: str | None = None) -> list[str]:
        return [r.path for r in self.requests if method is None or r.method == method]

    # ---- server lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and Content-Length framing, like the real hub
    state: FakeHub

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        body = message.encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _model_info(self, repo_id: str, revision: str, send_body: bool) -> None:
        hub = self.state
        if repo_id not in hub.revisions:
            self._error(404, "RepoNotFound", "Repository not found")
            return
        commit = hub.revisions[repo_id].get(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
            return
        files = sorted(name for (repo, c, name) in hub.files if repo == repo_id and c == commit)
        body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                           "siblings": [{"rfilename": name} for name in files]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _serve(self, send_body: bool) -> None:
        hub = self.state
        raw_path = urlsplit(self.path).path
        m = _RESOLVE.match(raw_path)
        revision = unquote(m.group(2)) if m else ""
        hub.requests.append(Request(self.command, raw_path, revision, self.headers.get("Range")))
        if hub.not_a_hub:
            page = b"<html>Welcome to the hotel wifi</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            if send_body:
                self.wfile.write(page)
            return
        if not m and (api := _MODEL_INFO.match(raw_path)):
            self._model_info(api.group(1), unquote(api.group(2) or "main"), send_body)
            return
        if not m:
            self._error(404, "NotFound", "not a resolve URL")
            return
        repo_id, filename = m.group(1), unquote(m.group(3))
        if repo_id not in hub.revisions:
            self._error(404, "RepoNotFound", "Repository not found")
            return
        commit = hub.revisions[repo_id].get(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
            return
        content = hub.files.get((repo_id, commit, filename))
        if content is None:
            self._error(404, "EntryNotFound", "Entry not found", commit=commit)
            return

        start = 0
        rng = self.headers.get("Range")
        if rng and (rm := re.fullmatch(r"bytes=(\d+)-", rng.strip())):
            start = min(int(rm.group(1)), len(content))
        body = content[start:]
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{hashlib.sha256(content).hexdigest()}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        self.end_headers()
        if not send_body:
            return
        if hub.cut_gets > 0 or filename in hub.cut_files:
            # Promise the whole body, deliver half, then hang up: an interrupted transfer.
            if filename not in hub.cut_files:
                hub.cut_gets -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)
