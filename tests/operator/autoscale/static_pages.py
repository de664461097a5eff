"""/metrics pages a test sets, served by a real HTTP server (http.server in a thread), one URL each; a
query is ignored, as a torch-engine pod ignores the autoscaler's `?kubemoe=1`."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@contextlib.contextmanager
def static_pages(pages: dict[str, bytes]) -> Iterator[dict[str, str]]:
    """{name: body} -> {name: URL}; a client that hangs up early is no error."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path.split("?", 1)[0].strip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(ConnectionError):
                self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield {name: f"{base}/{name}" for name in pages}
    finally:
        server.shutdown()
        server.server_close()
