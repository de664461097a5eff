"""The heads of the runtime's one HTTP/1.1 client (http_connections.py): the request's head
(`request_head`), and the answer's head parsed and checked (`parse_head`: the status line, the fields, the
framing from Content-Length or Transfer-Encoding, whether the connection stays open).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

MAX_HEAD_BYTES = 64 << 10  # an answer's head, its blank line included
MAX_LENGTH_DIGITS = 18  # a Content-Length or chunk size past 10**18 bytes is no length at all
NO_BODY = frozenset({204, 304})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a field name (RFC 9110 5.1)


class HeadError(ValueError):
    """An answer's head (or a chunk's framing) that is not well-formed HTTP/1.1, or a body past its frame."""


def request_head(
    method: str, target: str, *, host: str, fields: Mapping[str, str] | None = None, body_length: int | None
) -> bytes:
    """An HTTP/1.1 request's head; a Content-Length unless `body_length` is None. ValueError if a part
    holds a line break (the head is the server's to parse: no caller's value may add a line to it)."""
    lines = [f"{method} {target} HTTP/1.1", f"host: {host}"]
    if body_length is not None:
        lines.append(f"content-length: {body_length}")
    if fields:
        lines += [f"{name}: {value}" for name, value in fields.items()]
    text = "\r\n".join(lines)
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise ValueError(f"a line break inside the request's head: {text[:200]!r}")
    return (text + "\r\n\r\n").encode("latin-1")


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """An answer's head, checked. `headers`: lower-cased names, a repeated field's values joined by ", "."""

    status: int
    headers: dict[str, str]
    content_length: int | None  # None: chunked, or up to the close
    chunked: bool
    keep_alive: bool  # HTTP/1.1, no Connection: close, and the body's end known without the close

    def length(self, limit: int) -> int:
        """The body's Content-Length, at most `limit`; HeadError if the body is framed otherwise."""
        if (te := self.headers.get("transfer-encoding")) is not None:
            raise HeadError(f"Transfer-Encoding {te}, not a Content-Length")
        if self.content_length is None:
            raise HeadError("no Content-Length")
        if self.content_length > limit:
            raise HeadError(f"Content-Length {self.content_length} is above {limit}")
        return self.content_length


def parse_head(head: bytes) -> ResponseHead:
    """The head of an HTTP/1.x answer, up to its blank line (included or not); HeadError unless it is one."""
    if len(head) > MAX_HEAD_BYTES:
        raise HeadError(f"a head of {len(head)} bytes, above {MAX_HEAD_BYTES}")
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code = rest[:3]
    if (
        version not in ("HTTP/1.1", "HTTP/1.0")
        or not (code.isascii() and code.isdigit() and code[0] != "0")
        or rest[3:4] not in ("", " ")
    ):
        raise HeadError(f"not an HTTP/1.x answer: {status_line[:80]!r}")
    status = int(code)
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name) or "\n" in value or "\r" in value:
            raise HeadError(f"not a header field (a name, a colon, a value): {line[:80]!r}")
        key, value = name.lower(), value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    content_length: int | None = None
    if (te := headers.get("transfer-encoding")) is not None:
        chunked = te.rpartition(",")[2].strip(" \t").lower() == "chunked"  # else: up to the close
    else:
        chunked = False
        if (field := headers.get("content-length")) is not None:
            content_length = _length(field)
    if status in NO_BODY or 100 <= status < 200:
        content_length, chunked = 0, False
    keep_alive = (
        version == "HTTP/1.1"
        and "close" not in (token.strip(" \t") for token in headers.get("connection", "").lower().split(","))
        and (chunked or content_length is not None)
    )
    return ResponseHead(status, headers, content_length, chunked, keep_alive)


def _length(field: str) -> int:
    """A Content-Length field's one value (a list of equal values is that value: RFC 9110 8.6)."""
    values = {value.strip(" \t") for value in field.split(",")}
    if len(values) != 1 or not _is_decimal(value := values.pop()):
        raise HeadError(f"Content-Length {field[:80]!r} is not one length")
    return int(value)


def _is_decimal(text: str) -> bool:
    return 0 < len(text) <= MAX_LENGTH_DIGITS and text.isascii() and text.isdigit()
