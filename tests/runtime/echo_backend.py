"""A stand-in backend for the router's forwarding tests: a threaded HTTP/1.1 server that answers /ready and
/health with 200 and records every other request it gets (method, path and query, headers, body), so a test
can tell what the router sent, and that it sent nothing for a path it must not forward. By path:

    /v1/stream   an SSE answer, chunked: `data: {"i": N}` for N in 0..?n-1 (default 3), one every 0.4 s, then
                 `data: [DONE]`
    /v1/cut      a JSON answer whose Content-Length says 1000 bytes, cut after 10 (the connection closed)
    anything     200 (or ?status=N) with the request as JSON: {"method", "target", "headers", "body"}
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass


@dataclass(frozen=True)
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


class EchoBackend:
    def __init__(self) -> None:
        self.seen: list[Seen] = []
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # the head and the body go in two writes: no delayed-ACK wait

            def _any(self) -> None:
                path, _, query = self.path.partition("?")
                if path in ("/ready", "/health"):
                    self._answer(200, b"ok", "text/plain")
                    return
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                backend.seen.append(Seen(self.command, self.path, headers, body))
                params = dict(urllib.parse.parse_qsl(query))
                if path == "/v1/stream":
                    self._stream(int(params.get("n", "3")))
                elif path == "/v1/cut":
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", "1000")
                    self.end_headers()
                    self.wfile.write(b'{"partial"')
                    self.wfile.flush()
                    self.close_connection = True
                else:
                    echo = {
                        "method": self.command,
                        "target": self.path,
                        "headers": headers,
                        "body": body.decode("latin-1"),
                    }
                    data = json.dumps(echo).encode()
                    self._answer(int(params.get("status", "200")), data, "application/json")

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _any

            def _answer(self, status: int, data: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(data)))
                self.send_header("x-echo", "yes")
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, n: int) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                events = [f"data: {json.dumps({'i': i})}\n\n".encode() for i in range(n)]
                for i, event in enumerate([*events, b"data: [DONE]\n\n"]):
                    if i:
                        time.sleep(0.4)
                    self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, *_: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
