"""A stand-in for huggingface.co on 127.0.0.1 for the model cache's tests: it answers only the Hub HTTP
calls huggingface_hub makes to download a model (HfApi.model_info, HfApi.list_repo_tree,
hf_hub_download's HEAD and GET on /resolve), with the Hub's headers and error codes, from files held in
memory. It can stream slowly, lie about a size in the listing, and gate a repository behind a token."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

CHUNK = 32 << 10


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str = "0123456789abcdef0123456789abcdef01234567"
    token: str | None = None  # gated: downloads need `Authorization: Bearer TOKEN`
    listed_sizes: dict[str, int] = field(default_factory=dict)  # sizes the tree listing gets wrong

    @classmethod
    def of_folder(
        cls, folder: Path, extra: dict[str, bytes] | None = None, *, token: str | None = None
    ) -> Repo:
        """A folder's files, and `extra` ones (name: bytes)."""
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        return cls(files={**files, **(extra or {})}, token=token)


class FakeHub:
    """`repos` by id (ORG/NAME); `delay_s`: a pause before each CHUNK of a file larger than one chunk;
    `resume`: while this event is not set, a file larger than one chunk stops after its first chunk (a
    test that must see a fill mid-way sets it once it has); `host`: the address to listen on (0.0.0.0
    for pods on the real node, which reach it at the node's address)."""

    def __init__(
        self,
        repos: dict[str, Repo],
        *,
        delay_s: float = 0.0,
        resume: threading.Event | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.repos = repos
        self.delay_s = delay_s
        self.resume = resume
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer((host, 0), _Handler)
        self.server.daemon_threads = True
        self.server.hub = self  # type: ignore[attr-defined]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def downloads(self) -> list[str]:
        """The files fetched (GET on /resolve) so far."""
        with self.lock:
            return [
                path.rsplit("/", 1)[-1]
                for method, path in self.requests
                if method == "GET" and "/resolve/" in path
            ]

    @contextmanager
    def running(self) -> Iterator[FakeHub]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+))?$")  # no revision: main
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    @property
    def hub(self) -> FakeHub:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        return hub

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        path = urlsplit(self.path).path
        with self.hub.lock:
            self.hub.requests.append((self.command, path))
        if api := _API.match(path):
            repo_id, kind, revision = api[1], api[2] or "revision", unquote(api[3] or "main")
            repo = self._repo(repo_id, revision)
            if repo is not None:
                self._json(self._model_info(repo_id, repo) if kind == "revision" else self._tree(repo))
            return
        if resolve := _RESOLVE.match(path):
            repo_id, revision, name = resolve[1], unquote(resolve[2]), unquote(resolve[3])
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
                status = 403 if self.headers.get("Authorization") else 401
                self._error(status, "GatedRepo", f"Access to model {repo_id} is restricted.")
                return
            if name not in repo.files:
                self._error(404, "EntryNotFound", "Entry not found")
                return
            self._file(repo, repo.files[name], body=body)
            return
        self._error(404, None, "Not Found")

    def _repo(self, repo_id: str, revision: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:  # the Hub answers 401 for a missing repository and for a private one alike
            self._error(401, "RepoNotFound", "Repository not found")
            return None
        if revision not in ("main", repo.sha):
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
            return None
        return repo

    @staticmethod
    def _model_info(repo_id: str, repo: Repo) -> dict[str, Any]:
        return {
            "id": repo_id,
            "sha": repo.sha,
            "private": False,
            "gated": "manual" if repo.token else False,
            "siblings": [{"rfilename": name} for name in repo.files],
        }

    @staticmethod
    def _tree(repo: Repo) -> list[dict[str, Any]]:
        """The top level (recursive=false): files, and each folder once."""
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for name, data in repo.files.items():
            if "/" in name:
                folder = name.split("/", 1)[0]
                if folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "oid": "f" * 40, "size": 0, "path": folder})
                continue
            size = repo.listed_sizes.get(name, len(data))
            entries.append(
                {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": size, "path": name}
            )
        return entries

    def _file(self, repo: Repo, data: bytes, *, body: bool) -> None:
        start = 0
        if match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
            start = min(int(match[1]), len(data))
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not body:
            return
        large = len(data) > CHUNK
        for at in range(start, len(data), CHUNK):
            if large and self.hub.delay_s > 0:
                time.sleep(self.hub.delay_s)
            if large and at > start and self.hub.resume is not None:
                self.hub.resume.wait(timeout=600)  # bounded: a test that never resumes still ends
            self.wfile.write(data[at : at + CHUNK])

    def _json(self, doc: Any) -> None:
        raw = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(raw)

    def _error(self, status: int, code: str | None, message: str) -> None:
        raw = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code is not None:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(raw)
