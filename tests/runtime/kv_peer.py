"""A stand-in prefill for the KV puller tests: a threaded HTTP/1.1 server whose answers the test sets."""

from __future__ import annotations

import http.server
import threading


class KVPeer:
    """A threaded HTTP/1.1 server: path -> (status, declared length or None, body, close after), or raw
    bytes to answer with (then the connection closes), or None to answer nothing (a hung prefill)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, int | None, bytes, bool] | bytes | None] = {}
        self.hang = threading.Event()
        self.connections = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                server.connections += 1
                super().setup()

            def do_GET(self) -> None:
                route = server.routes[self.path]
                if route is None:
                    server.hang.wait(10)
                    route = b""
                if isinstance(route, bytes):
                    self.wfile.write(route)
                    self.close_connection = True
                    return
                status, length, body, close = route
                self.send_response(status)
                self.send_header("content-length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = close

            def log_message(self, *_: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def params(self, handle: str) -> dict[str, object]:
        return {
            "do_remote_prefill": True,
            "remote_engine_id": "kubemoe-torch",
            "remote_handle": handle,
            "remote_host": "127.0.0.1",
            "remote_port": self.port,
        }

    def close(self) -> None:
        self.hang.set()
        self.httpd.shutdown()
        self.httpd.server_close()
