"""The vLLM front against hostile bodies and a failing vLLM (engines/vllm/front.py).

kv_transfer_params tell vLLM's connector where to connect, so the front decides on the body as vLLM will
read it (decoded JSON keys), never on its bytes: an escaped key, another encoding, a duplicate key or
`vllm_xargs` do not smuggle unsigned parameters past it; what it cannot parse is a 400 and never reaches
vLLM; a body nested too deeply or a signature no string of hex digits is an OpenAI-shaped 400, not a 500.
A vLLM that drops a request (or has exited) is an OpenAI-shaped 502 (503), which the router retries
elsewhere, and the front's kept-alive connections expire before vLLM's own keep-alive closes them.

The front runs in uvicorn; the "vLLM" behind it is a stand-in that records what reaches it
(echo_backend.py), or a raw socket server that misbehaves, under a stand-in process.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from kubemoe_runtime.engines.vllm.front import VllmUpstream, front_app
from kubemoe_runtime.pod.http_pool import IDLE_S
from kubemoe_runtime.pod.kv_auth import SIGNATURE_FIELD, KVSigner
from kubemoe_runtime.pod.metrics import MetricLabels
from tests.runtime.app_thread import serving
from tests.runtime.echo_backend import EchoBackend
from tests.runtime.fake_backend import raw_send

KEY = b"front-hostile-key-0123456789abcdef"
FORGED = {"do_remote_prefill": True, "remote_host": "169.254.169.254", "remote_port": 80}


@contextmanager
def running_front(url: str, *, exited: bool = False) -> Iterator[tuple[str, VllmUpstream]]:
    """A front on a free port in front of `url`; `exited`: its vLLM process has already exited."""
    code = "pass" if exited else "import time; time.sleep(120)"
    process = subprocess.Popen([sys.executable, "-c", code])
    if exited:
        process.wait()
    upstream = VllmUpstream(process=process, url=url, headless=False, labels=MetricLabels(role="worker"))
    try:
        with serving(front_app(upstream, signer=KVSigner(KEY)), what="the front") as port:
            yield f"127.0.0.1:{port}", upstream
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def front(echo: EchoBackend) -> Iterator[str]:
    with running_front(f"http://{echo.address}") as (address, _):
        yield address


def openai_error(data: bytes, headers: dict[str, str]) -> dict[str, Any]:
    assert headers["content-type"].startswith("application/json")
    error = json.loads(data)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    return dict(error)


def signed(**params: Any) -> dict[str, Any]:
    return KVSigner(KEY).sign(params)


def _unsigned_spellings() -> list[Any]:
    plain = json.dumps({"prompt": "hi", "kv_transfer_params": FORGED})
    return [
        pytest.param(
            b'{"prompt":"hi","kv_transfer_param\\u0073":' + json.dumps(FORGED).encode() + b"}",
            id="escaped-key",
        ),
        pytest.param(
            b'{"prompt":"hi","\\u006b\\u0076_transfer_params":' + json.dumps(FORGED).encode() + b"}",
            id="escaped-prefix",
        ),
        *(pytest.param(plain.encode(codec), id=codec) for codec in ("utf-16-le", "utf-16-be", "utf-32")),
        pytest.param(b"\xef\xbb\xbf" + plain.encode(), id="utf-8-bom"),
        pytest.param(
            json.dumps({"prompt": "hi", "vllm_xargs": {"kv_transfer_params": "x"}}).encode(), id="vllm-xargs"
        ),
        pytest.param(
            json.dumps({"prompt": "hi", "kv_transfer_params": signed(do_remote_decode=True)}).encode()[:-1]
            + b',"kv_transfer_params":'
            + json.dumps(FORGED).encode()
            + b"}",
            id="signed-then-forged-duplicate",
        ),
    ]


@pytest.mark.parametrize("body", _unsigned_spellings())
def test_unsigned_kv_params_are_refused_however_spelt(front: str, echo: EchoBackend, body: bytes) -> None:
    seen = len(echo.seen)
    status, data, headers = raw_send(front, body)
    assert status == 400, data
    error = openai_error(data, headers)
    assert error["type"] == "invalid_request_error"
    assert "kv_transfer_params" in error["message"]
    assert len(echo.seen) == seen  # vLLM never saw it


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b'{"prompt": "hi"', id="truncated"),
        pytest.param(b'["prompt", "kv_transfer_params"]', id="a-list"),
        pytest.param(b'"kv_transfer_params"', id="a-string"),
        pytest.param(b'{"prompt":"\xff\xfe hi"}', id="bad-utf-8"),
        pytest.param(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", id="nested-100k"),
        pytest.param(
            b'{"kv_transfer_params": null, "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            id="nested-100k-with-the-key",
        ),
        pytest.param(b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", id="5000-digits"),
    ],
)
def test_what_cannot_be_parsed_is_a_400_and_never_reaches_vllm(
    front: str, echo: EchoBackend, body: bytes
) -> None:
    seen = len(echo.seen)
    for content_type in ("application/json", "text/plain", ""):
        status, data, headers = raw_send(front, body, content_type=content_type)
        assert status == 400, (content_type, data)
        assert openai_error(data, headers)["type"] == "invalid_request_error"
    assert len(echo.seen) == seen


@pytest.mark.parametrize(
    "signature", ["\ud800", "\u00e9" * 64, "0" * 63 + "\U0001f600", 1234, None], ids=repr
)
def test_a_signature_that_is_no_hex_string_is_a_400(front: str, echo: EchoBackend, signature: Any) -> None:
    seen = len(echo.seen)
    params = {"do_remote_decode": True, SIGNATURE_FIELD: signature}
    status, data, headers = raw_send(
        front, json.dumps({"prompt": "hi", "kv_transfer_params": params}).encode()
    )
    assert status == 400, data
    assert openai_error(data, headers)["param"] == "kv_transfer_params"
    assert len(echo.seen) == seen


def test_signed_params_reach_vllm_verified_however_spelt(front: str, echo: EchoBackend) -> None:
    params = signed(do_remote_decode=True, do_remote_prefill=False)
    body = json.dumps({"prompt": "h\u00e9 \u4e16", "kv_transfer_params": params}, ensure_ascii=False)
    for raw in (
        body.encode(),
        body.replace('"kv_transfer_params"', '"kv_transfer_param\\u0073"').encode(),
        body.encode("utf-16"),
    ):
        status, data, _ = raw_send(front, raw)
        assert status == 200, data
        got = json.loads(echo.seen[-1].body)
        assert got == {
            "prompt": "h\u00e9 \u4e16",
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False},
        }


def test_what_vllm_gets_is_what_was_checked(front: str, echo: EchoBackend) -> None:
    """A duplicate key: vLLM reads the last one; the front forwards only that one."""
    body = (
        b'{"prompt":"hi","kv_transfer_params":' + json.dumps(FORGED).encode() + b',"kv_transfer_params":null}'
    )
    status, data, _ = raw_send(front, body)
    assert status == 200, data
    assert b"169.254" not in echo.seen[-1].body
    assert json.loads(echo.seen[-1].body) == {"prompt": "hi", "kv_transfer_params": None}
    # Every other JSON object arrives as the same JSON (a lone surrogate too: vLLM decides on it).
    for value in [{"prompt": "\ud800", "n": 1.5e300, "x": [1, {"y": None}]}, {}]:
        status, data, _ = raw_send(front, json.dumps(value).encode())
        assert status == 200, data
        assert json.loads(echo.seen[-1].body) == value


def test_an_audio_form_passes_unchanged_and_only_there(front: str, echo: EchoBackend) -> None:
    form = b'--xx\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n--xx--\r\n'
    multipart = "multipart/form-data; boundary=xx"
    status, data, _ = raw_send(front, form, content_type=multipart, path="/v1/audio/transcriptions")
    assert status == 200, data
    assert echo.seen[-1].body == form
    # a form's Content-Type elsewhere is no way around the check: some routes read any body as JSON
    seen = len(echo.seen)
    forged = json.dumps({"prompt": "hi", "kv_transfer_params": FORGED}).encode()
    status, data, _ = raw_send(front, forged, content_type=multipart)
    assert status == 400, data
    assert len(echo.seen) == seen


def test_a_body_less_request_passes(front: str, echo: EchoBackend) -> None:
    status, data, _ = raw_send(front, b"", content_type="", path="/v1/models")
    assert status == 200, data
    assert echo.seen[-1].target == "/v1/models"
    assert echo.seen[-1].body == b""


# --- a vLLM that fails ----------------------------------------------------------------------------------


class RawServer:
    """A socket server for the front's upstream that handles each connection with `handle`."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.handle = handle
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            self.handle(conn)

    def close(self) -> None:
        self.sock.close()


def read_request(conn: socket.socket) -> bool:
    """Read one request (head and Content-Length body); False once the peer closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(v)
            for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n"))
            if k.lower() == b"content-length"
        ),
        0,
    )
    while len(body) < length:
        body += conn.recv(65536)
    return True


def hang_up(conn: socket.socket) -> None:
    """A vLLM that dies (or resets the request) before answering."""
    read_request(conn)


def garbage(conn: socket.socket) -> None:
    """A vLLM whose answer is no HTTP."""
    read_request(conn)
    conn.sendall(b"\x00\x01 not http\r\n\r\n")


@pytest.mark.parametrize("handle", [hang_up, garbage], ids=["hang-up", "garbage"])
def test_a_vllm_that_drops_the_request_is_a_502_the_router_retries(
    handle: Callable[[socket.socket], None],
) -> None:
    vllm = RawServer(handle)
    try:
        with running_front(f"http://{vllm.address}") as (address, _):
            status, data, headers = raw_send(address, b'{"prompt": "hi"}')
            assert status == 502, data
            error = openai_error(data, headers)
            assert (error["type"], error["code"]) == ("server_error", "backend_failed")
        with running_front(f"http://{vllm.address}", exited=True) as (address, _):
            status, data, headers = raw_send(address, b'{"prompt": "hi"}')
            assert status == 503, data
            assert openai_error(data, headers)["code"] == "engine_failed"
    finally:
        vllm.close()


def test_kept_alive_connections_expire_before_vllms_keep_alive() -> None:
    """vLLM (uvicorn) closes a connection idle for 5 s; one the front reuses just then fails. The front lets
    its own idle connections go first (IDLE_S): this stand-in drops a request on one idle for longer."""
    closes_idle_after = IDLE_S + 0.5
    answer = b'{"ok": true}'

    def keep_alive(conn: socket.socket) -> None:
        last = time.monotonic()
        while read_request(conn):
            if time.monotonic() - last >= closes_idle_after:
                return  # as the server's keep-alive timer fired: closed, unanswered
            head = (
                f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(answer)}\r\n\r\n"
            )
            conn.sendall(head.encode() + answer)
            last = time.monotonic()

    vllm = RawServer(keep_alive)
    try:
        with running_front(f"http://{vllm.address}") as (address, _):
            assert raw_send(address, b'{"prompt": "hi"}')[0] == 200
            time.sleep(closes_idle_after + 0.2)
            status, data, _ = raw_send(address, b'{"prompt": "hi"}')
            assert (status, data) == (200, answer)
            assert vllm.connections == 2  # the idle one was not reused
    finally:
        vllm.close()
