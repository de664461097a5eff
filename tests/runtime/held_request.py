"""A POST held open between its headers and its body (Expect: 100-continue), over a plain socket: the
server's handler has started and waits for the body, so a test can change the server's state (a
drain, an engine failure) in exactly that window, then send the body and read the final answer."""

from __future__ import annotations

import json
import socket
from typing import Any

from tests.runtime.fake_backend import parse_response


class Held:
    """A POST whose headers the server has, and whose body it is waiting for."""

    def __init__(self, port: int, path: str, body: dict[str, Any]) -> None:
        self.data = json.dumps(body).encode()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        head = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        head += f"content-length: {len(self.data)}\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n"
        self.sock.sendall(head.encode())
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = self.sock.recv(1)
            assert chunk, "the server closed the connection"
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100"), interim

    def finish(self) -> tuple[int, bytes]:
        """Send the body; the final status and body (de-chunked)."""
        self.sock.sendall(self.data)
        answer = b""
        while chunk := self.sock.recv(65536):
            answer += chunk
        self.sock.close()
        return parse_response(answer)

    def close(self) -> None:
        self.sock.close()
