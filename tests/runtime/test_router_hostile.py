"""The router (a real process) against small hostile bodies: no body gives a 500.

Deep nesting, a number of thousands of digits, bytes that are no UTF-8 are OpenAI-shaped 400s on the
completions (which the router reads), and pass through on a forwarded path (which it only peeks into, for
prefix-hash's key); a lone surrogate (JSON's "\\ud800") is routed, prefix-hash and P/D's prompt estimate
included; a `null` stream is the default; a client's kv_transfer_params never reach a backend, however
the body spells or repeats the key. Colocated (prefix-hash) and disaggregated (P/D, with a prompt length
threshold) routers, over stand-in backends that record what they get (echo_backend.py).
"""

from __future__ import annotations

import functools
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.runtime.echo_backend import EchoBackend
from tests.runtime.fake_backend import raw_send
from tests.runtime.routing import RouterProcess

MODEL = "m"
DEEP = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # 200 KB


@pytest.fixture(scope="module", params=["colocated", "pd"])
def router(
    request: pytest.FixtureRequest, echo: EchoBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RouterProcess]:
    """Colocated with prefix-hash; or P/D (the echo as prefill and decode: its answer carries no
    kv_transfer_params, so the decode gets the request unchanged) with a prompt length threshold."""
    args = ["--served-model-name", MODEL, "--policy", "prefix-hash"]
    env: dict[str, str] = {}
    if request.param == "colocated":
        args += ["--worker-service", echo.address]
    else:
        args += ["--prefill-service", echo.address, "--decode-service", echo.address]
        args += ["--pd-min-prompt-tokens", "2"]
        env["KUBEMOE_KV_KEY"] = "router-hostile-key-0123456789abcdef"
    process = RouterProcess(args=args, log_dir=tmp_path_factory.mktemp(request.param), env=env)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def openai_error(status: int, data: bytes, headers: dict[str, str]) -> dict[str, Any]:
    assert headers["content-type"].startswith("application/json"), (status, data[:200])
    error = json.loads(data)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


def no_traceback(router: RouterProcess) -> None:
    log = router.log()
    assert "Traceback" not in log, log[-3000:]
    assert "Exception in ASGI" not in log, log[-3000:]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        pytest.param(DEEP, "nested too deeply", id="nested-100k"),
        pytest.param(b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "digits", id="5000-digits"),
        pytest.param(b'{"prompt": "\xff\xfe"}', "not valid JSON", id="bad-utf-8"),
        pytest.param(b'{"prompt": "x"', "not valid JSON", id="truncated"),
    ],
)
def test_hostile_completions_bodies_are_400s(router: RouterProcess, body: bytes, says: str) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        status, data, headers = raw_send(router.url, body, path=path)
        assert status == 400, (path, data[:300])
        error = openai_error(status, data, headers)
        assert error["type"] == "invalid_request_error"
        assert says in error["message"]
    no_traceback(router)


class Connection:
    """A kept-alive connection (opened again after an answer that closes it): hundreds of requests, each
    written at once (head and body). Status 0: the connection was cut without an answer."""

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.address = (host, int(port))
        self.sock: socket.socket | None = None

    def post(self, path: str, body: bytes) -> int:
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=60)
            self.file = self.sock.makefile("rb")
        head = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        try:
            self.sock.sendall(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
            status = int(self.file.readline().split()[1])
        except (ConnectionError, IndexError):  # cut without an answer (a server error, at worst)
            self.close()
            return 0
        length, close = 0, False
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            length = int(value) if name == b"content-length" else length
            close = close or (name == b"connection" and value.strip().lower() == b"close")
        self.file.read(length)
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self.sock is not None:
            self.file.close()
            self.sock.close()
            self.sock = None


def nested(shape: str, depth: int) -> bytes:
    """A body with a value `depth` lists deep: the prompt, another field, or a message's content."""
    inner = b"[" * depth + b"]" * depth
    if shape == "prompt":
        return b'{"prompt": ' + b"[" * depth + b"1" + b"]" * depth + b"}"
    if shape == "other-field":
        return b'{"prompt": "x", "tools": ' + inner + b"}"
    return b'{"messages": [{"role": "user", "content": ' + inner + b"}]}"


@pytest.mark.parametrize("shape", ["prompt", "other-field", "message"])
def test_no_nesting_depth_is_a_500(router: RouterProcess, shape: str) -> None:
    """Around the interpreter's recursion limit, where the body is parsed or not, and then hashed (prefix-
    hash), estimated (P/D) or re-serialized (P/D's prefill) a few frames deeper, or not."""
    body = functools.partial(nested, shape)
    path = "/v1/chat/completions" if shape == "message" else "/v1/completions"
    conn = Connection(router.url)
    try:
        status = {d: conn.post(path, body(d)) for d in range(1, 3000, 50)}
        assert set(status.values()) == {200, 400}, status  # both sides of the limit
        low, high = (
            max(d for d, s in status.items() if s == 200),
            min(d for d, s in status.items() if s == 400),
        )
        while high - low > 1:  # the first depth refused
            mid = (low + high) // 2
            status[mid] = conn.post(path, body(mid))
            if status[mid] == 200:
                low = mid
            else:
                high = mid
        for depth in range(max(1, high - 80), high + 10):
            assert conn.post(path, body(depth)) in (200, 400), depth
    finally:
        conn.close()
    no_traceback(router)


def test_forwarded_hostile_bodies_reach_the_backend(router: RouterProcess, echo: EchoBackend) -> None:
    """A forwarded path's body is the backend's to judge; the router only looks for prefix-hash's key."""
    for body in (
        DEEP,
        b'{"input": "\xff\xfe"}',
        b'{"input": 1' + b"0" * 5000 + b"}",
        b'{"input": "\\ud800"}',
    ):
        seen = len(echo.seen)
        status, data, _ = raw_send(router.url, body, path="/v1/embeddings")
        assert status == 200, data[:300]
        assert len(echo.seen) == seen + 1
        assert echo.seen[-1].body == body
    no_traceback(router)


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "\ud800"},
        {"prompt": "system \udfff prompt " * 40},
        {"prompt": ["\ud800"]},
        {"prompt": [[1, 2], "\ud800"]},
        {"messages": [{"role": "user", "content": "\ud800"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
    ],
)
def test_a_lone_surrogate_is_routed(router: RouterProcess, echo: EchoBackend, body: dict[str, Any]) -> None:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    status, data, _ = raw_send(router.url, json.dumps(body).encode(), path=path)
    assert status == 200, data[:300]
    assert json.loads(echo.seen[-1].body) == body  # the backend's to judge
    no_traceback(router)


def test_an_unknown_model_named_with_a_lone_surrogate_is_a_404(router: RouterProcess) -> None:
    status, data, headers = raw_send(router.url, json.dumps({"model": "\ud800", "prompt": "x"}).encode())
    assert status == 404, data[:300]
    assert openai_error(status, data, headers)["code"] == "model_not_found"
    assert json.loads(data)["error"]["message"] == "The model `\ud800` does not exist."
    no_traceback(router)


def test_a_null_stream_is_the_default(router: RouterProcess, echo: EchoBackend) -> None:
    status, data, headers = raw_send(router.url, b'{"prompt": "x", "stream": null}')
    assert status == 200, data[:300]
    assert headers["content-type"].startswith("application/json")  # an answer, not an event stream
    assert json.loads(echo.seen[-1].body)["stream"] is None  # passed on: the engine's default too
    status, data, headers = raw_send(router.url, b'{"prompt": "x", "stream": "yes"}')
    assert status == 400
    assert openai_error(status, data, headers)["param"] == "stream"


FORGED = b'{"do_remote_prefill": true, "remote_host": "169.254.169.254", "remote_port": 80}'


@pytest.mark.parametrize(
    "body",
    [
        b'{"prompt": "x", "kv_transfer_params": ' + FORGED + b"}",
        b'{"prompt": "x", "kv_transfer_param\\u0073": ' + FORGED + b"}",
        b'{"prompt": "x", "kv_transfer_params": ' + FORGED + b', "kv_transfer_params": null}',
        ('{"prompt": "x", "kv_transfer_params": ' + FORGED.decode() + "}").encode("utf-16"),
    ],
    ids=["plain", "escaped", "repeated-then-null", "utf-16"],
)
def test_a_clients_kv_params_never_reach_a_backend(
    router: RouterProcess, echo: EchoBackend, body: bytes
) -> None:
    seen = len(echo.seen)
    status, data, _ = raw_send(router.url, body)
    assert status == 200, data[:300]
    got = echo.seen[seen:]
    assert got, "nothing reached the backend"
    for request in got:
        assert b"169.254" not in request.body
        assert b"kv_transfer_param" not in request.body or b"kubemoe_signature" in request.body
