"""A stand-in engine for the router's fault tests: a threaded HTTP/1.1 server that answers /ready and
/health with 200 and misbehaves on POST as the request's `prompt` says:

    "hang"      answer nothing; wait until the router closes the connection (recorded in `closed`)
    "die"       a streamed answer cut after two events (the connection closes without the last chunk)
    "nodone"    a streamed answer of two events that ends cleanly, but without `data: [DONE]`
    "drip"      a streamed answer of one event every 0.2 s, for about 20 s
    "flood"     a streamed answer of 16 kB events as fast as the connection takes them, until the router
                closes it (recorded in `closed`) or for FLOOD_S at most
    anything    a normal answer: JSON, or SSE events ending in `data: [DONE]` when `stream` is true

With `post_status` set, every POST gets that status (an OpenAI-shaped error, its `code` `error_code`) instead.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from typing import Any

EVENT = {"id": "cmpl-x", "object": "text_completion", "choices": [{"index": 0, "text": "tok"}]}
BIG_EVENT = {"id": "cmpl-x", "object": "text_completion", "choices": [{"index": 0, "text": "x" * 16384}]}
FLOOD_S = 60.0
ANSWER = {"id": "cmpl-x", "object": "text_completion", "choices": [{"index": 0, "text": "ok"}]}


def _event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


class FakeBackend:
    def __init__(
        self, *, post_status: int = 200, retry_after: str | None = None, error_code: str | None = None
    ) -> None:
        self.post_status = post_status
        self.error_code = error_code
        self.retry_after = retry_after  # a Retry-After header on its refusals
        self.posts = 0
        self.closed = threading.Event()  # a "hang" or "flood" request's connection was closed by the router
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._answer(200, b"ok", "text/plain")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                backend.posts += 1
                if backend.post_status != 200:
                    error = {
                        "error": {
                            "message": "busy",
                            "type": "server_error",
                            "param": None,
                            "code": backend.error_code,
                        }
                    }
                    data = json.dumps(error).encode()
                    self._answer(
                        backend.post_status, data, "application/json", retry_after=backend.retry_after
                    )
                    return
                prompt = body.get("prompt")
                if prompt == "hang":
                    self._hang()
                elif prompt == "die":
                    self._stream([_event(EVENT), _event(EVENT)], complete=False)
                elif prompt == "nodone":
                    self._stream([_event(EVENT), _event(EVENT)], complete=True)
                elif prompt == "drip":
                    self._stream((_event(EVENT) for _ in range(100)), complete=True, pause=0.2)
                elif prompt == "flood":
                    self._stream(_flood(), complete=True, record_cut=True)
                elif body.get("stream"):
                    self._stream([_event(EVENT), _event(EVENT), _event("[DONE]")], complete=True)
                else:
                    self._answer(200, json.dumps(ANSWER).encode(), "application/json")

            def _answer(
                self, status: int, data: bytes, content_type: str, *, retry_after: str | None = None
            ) -> None:
                self.send_response(status)
                self.send_header("content-type", content_type)
                if retry_after is not None:
                    self.send_header("retry-after", retry_after)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _hang(self) -> None:
                self.connection.settimeout(60)
                try:
                    if self.connection.recv(1) == b"":
                        backend.closed.set()
                except OSError:
                    pass
                self.close_connection = True

            def _stream(
                self, events: Any, *, complete: bool, pause: float = 0.0, record_cut: bool = False
            ) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                try:
                    for event in events:
                        self.wfile.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                        self.wfile.flush()
                        time.sleep(pause)
                    if complete:
                        self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    if record_cut:
                        backend.closed.set()
                self.close_connection = True  # "die": closed without the last chunk

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


def _flood() -> Any:
    end = time.monotonic() + FLOOD_S
    while time.monotonic() < end:
        yield _event(BIG_EVENT)
    yield _event("[DONE]")


def raw_post(url: str, body: dict[str, Any], *, timeout: float = 30) -> tuple[int, bytes]:
    """POST over a plain socket (HTTP/1.1, Connection: close); the status and the whole body, de-chunked."""
    host, _, port = url.removeprefix("http://").partition(":")
    port, _, path = port.partition("/")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        head = f"POST /{path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        head += f"content-length: {len(data)}\r\nconnection: close\r\n\r\n"
        sock.sendall(head.encode() + data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return parse_response(answer)


def raw_send(
    address: str, body: bytes, *, path: str = "/v1/completions", content_type: str = "application/json"
) -> tuple[int, bytes, dict[str, str]]:
    """POST `body` to HOST:PORT exactly as given (HTTP/1.1, Connection: close; no Content-Type header when
    `content_type` is empty): the status, the whole body (de-chunked) and the headers (lower-case names)."""
    host, _, port = address.removeprefix("http://").partition(":")
    head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n"
    if content_type:
        head += f"content-type: {content_type}\r\n"
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status, data = parse_response(answer)
    lines = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status, data, headers


def parse_response(answer: bytes) -> tuple[int, bytes]:
    """An HTTP/1.1 response read to its end: the status and the body, de-chunked."""
    top, _, rest = answer.partition(b"\r\n\r\n")
    status = int(top.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" not in top.lower():
        return status, rest
    body = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body, rest = body + rest[:size], rest[size + 2 :]
    return status, body
