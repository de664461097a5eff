"""How far the fill got: Progress (files and bytes), served as JSON on GET /progress, and the lines on
stderr (one per file, and a tick at least every few seconds while downloading)."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, Literal

from kubemoe_runtime.pod.messages import human_bytes
from kubemoe_runtime.tools.model_cache.source import CacheFile

PROG: Final = "kubemoe-runtime fill-cache"

Phase = Literal["listing", "downloading", "done", "failed"]


@dataclass
class Progress:
    """The run's progress, written by the filling thread, read by the HTTP server and the ticker."""

    phase: Phase = "listing"
    files: int = 0
    files_total: int = 0
    bytes: int = 0
    bytes_total: int = 0
    message: str = ""
    current: str = ""
    current_bytes: int = 0  # of `current`, counted as it arrives (at most its size; never backwards)
    current_size: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_json(self) -> dict[str, Any]:
        with self.lock:
            return {
                "phase": self.phase,
                "files": self.files,
                "filesTotal": self.files_total,
                "bytes": self.bytes + self.current_bytes,
                "bytesTotal": self.bytes_total,
                "message": self.message,
            }

    def set(self, **changes: Any) -> None:
        with self.lock:
            for name, value in changes.items():
                setattr(self, name, value)

    def start_file(self, f: CacheFile) -> None:
        self.set(current=f.path, current_bytes=0, current_size=f.size, message=f"downloading {f.path}")

    def arrived(self, counted: int) -> None:
        """`counted` bytes of the current file so far (by the download's own count)."""
        with self.lock:
            self.current_bytes = max(self.current_bytes, min(counted, self.current_size))

    def finish_file(self, f: CacheFile) -> None:
        with self.lock:
            self.files += 1
            self.bytes += f.size
            self.current, self.current_bytes, self.current_size = "", 0, 0

    def line(self) -> str:
        doc = self.as_json()
        percent = 100 * doc["bytes"] // max(doc["bytesTotal"], 1)
        return (
            f"{doc['files']}/{doc['filesTotal']} files, {human_bytes(doc['bytes'])} of "
            f"{human_bytes(doc['bytesTotal'])} ({percent}%)"
        )


def say(text: str) -> None:
    with contextlib.suppress(OSError):
        print(f"{PROG}: {text}", file=sys.stderr, flush=True)


class ProgressServer(ThreadingHTTPServer):
    """GET /progress: the run's Progress as JSON; anything else 404."""

    daemon_threads = True

    def __init__(self, port: int, progress: Progress) -> None:
        self.progress = progress
        super().__init__(("0.0.0.0", port), _ProgressHandler)  # all addresses: the operator polls the pod IP

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, name="progress-http", daemon=True).start()


class _ProgressHandler(BaseHTTPRequestHandler):
    server: ProgressServer

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/progress":
            self._send(404, {"error": "not found: GET /progress"})
            return
        self._send(200, self.server.progress.as_json())

    def _send(self, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # polled every few seconds: no line per request


@contextlib.contextmanager
def ticking(progress: Progress, every_s: float) -> Iterator[None]:
    """A progress line every `every_s` while downloading."""
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(every_s):
            with progress.lock:
                downloading, current = progress.phase == "downloading", progress.current
            if downloading:
                say(f"{progress.line()}" + (f", downloading {current}" if current else ""))

    thread = threading.Thread(target=tick, name="progress-log", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=1)
