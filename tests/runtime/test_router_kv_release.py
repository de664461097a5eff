"""A prefill's KV that no decode will fetch is released at once, not kept until it expires (~60 s).

The prefill is the torch engine's real API on a real scheduler and engine thread, served by uvicorn in
this process, so that its KV store can be looked at without taking anything from it; the router is a
real process (`serve --role router`, disaggregated, signing with the deployment's key); the decode is a
stand-in that records what it is sent and then refuses (400, 500), breaks the connection, or hangs
until the router closes it. In each case the prefill held the KV when the decode was asked, and the
router's signed `DELETE /v1/kv/{handle}` (router/kv_release.py) empties the store.

A caller that leaves while the prefill runs (the client leaves the router, which closes its connection to
the prefill; or the router's connection is cut or times out) never learns the handle, so no one can
release the KV: the prefill drops it itself. Each case holds the engine thread at one point of the prefill
(a tiny model's prefill takes milliseconds: a caller leaving "during" it would race it) until the prefill
has seen its caller go, then lets it finish: left during the forward, the KV is never parked (the
scheduler sees the abort at the step's end); left after the KV was parked but before the answer went out,
it is dropped as the answer comes to no one. Before, the KV stayed for the store's ttl (60 s) either way.

The prefill's DELETE route (engines/torch/serve/kv/release.py), over HTTP: the router's signature drops
the KV (204), a second time or an unknown handle is a 404; anything else (no signature, another key's, the
signature of another handle, the kv_transfer_params' signature, a server without the key) is a 403 and the
KV is still there for its decode.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from starlette.testclient import TestClient

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.serve.app import ServerState, build_app
from kubemoe_runtime.engines.torch.serve.kv.handoff import KVStore, PrefilledKV, prompt_digest
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.kv_auth import KV_KEY_ENV, KV_RELEASE_HEADER, SIGNATURE_FIELD, KVSigner
from kubemoe_runtime.router.proxy import REMOTE_DECODE
from tests.runtime.fake_backend import raw_post
from tests.runtime.routing import RouterProcess
from tests.runtime.torch_prefill import serve_torch_prefill

MODEL = "tiny-qwen"
KEY = "release-test-key-0123456789abcdef"
SIGNER = KVSigner(KEY.encode())
BODY = {"model": MODEL, "prompt": "experts route tokens across ranks", "max_tokens": 4, "temperature": 0}
RELEASED_WITHIN_S = 10.0  # the KV would otherwise be held for the store's ttl (60 s)
SEEN_WITHIN_S = 30.0


@dataclass
class Prefill:
    url: str
    port: int
    state: ServerState

    @property
    def store(self) -> KVStore:
        assert self.state.scheduler is not None
        return self.state.scheduler.kv_store


@pytest.fixture(scope="module")
def prefill(qwen: Path, tokenizer: TextTokenizer, engine: TorchEngine) -> Iterator[Prefill]:
    """The torch engine's API as a prefill pod runs it (EP=1), with the deployment's key."""
    with serve_torch_prefill(model_path=qwen, tokenizer=tokenizer, engine=engine, key=KEY) as (
        port,
        state,
    ):
        yield Prefill(url=f"http://127.0.0.1:{port}", port=port, state=state)


class Decode:
    """A stand-in decode: /ready and /health answer 200; a POST's kv_transfer_params are recorded, with
    how many KV the prefill's store held as it came, and then it is answered as `mode` says: "400" or
    "500" (an OpenAI-shaped error), "cut" (the connection closed, no answer), "hang" (nothing, until the
    router closes the connection: `closed`)."""

    def __init__(self, held: Callable[[], int]) -> None:
        self.mode = "400"
        self.params: list[dict[str, Any]] = []
        self.held: list[int] = []
        self.received = threading.Event()
        self.closed = threading.Event()
        decode = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._answer(200, b"ok")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                decode.params.append(body.get("kv_transfer_params") or {})
                decode.held.append(held())
                decode.received.set()
                if decode.mode == "cut":
                    self.close_connection = True
                elif decode.mode == "hang":
                    self.connection.settimeout(30)
                    try:
                        if self.connection.recv(1) == b"":
                            decode.closed.set()
                    except OSError:
                        pass
                    self.close_connection = True
                else:
                    error = {"error": {"message": "no", "type": "invalid_request_error", "param": None}}
                    self._answer(int(decode.mode), json.dumps(error).encode())

            def _answer(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def reset(self, mode: str) -> None:
        self.mode = mode
        self.params.clear()
        self.held.clear()
        self.received.clear()
        self.closed.clear()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def decode(prefill: Prefill) -> Iterator[Decode]:
    stand_in = Decode(held=lambda: len(prefill.store))
    yield stand_in
    stand_in.close()


@pytest.fixture(scope="module")
def router(
    prefill: Prefill, decode: Decode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RouterProcess]:
    args = ["--served-model-name", MODEL, "--policy", "round-robin", "--health-interval", "0.2"]
    args += ["--prefill-service", f"127.0.0.1:{prefill.port}", "--decode-service", decode.address]
    process = RouterProcess(args=args, log_dir=tmp_path_factory.mktemp("release"), env={KV_KEY_ENV: KEY})
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def released(prefill: Prefill, *, before: int) -> bool:
    """Whether the prefill's store is back to `before` entries within RELEASED_WITHIN_S (looked at,
    nothing taken)."""
    deadline = time.monotonic() + RELEASED_WITHIN_S
    while len(prefill.store) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(prefill.store) == before


def handed_off(decode: Decode, prefill: Prefill, *, before: int) -> None:
    """The decode was sent the prefill's handle, signed by the router, while the prefill held the KV."""
    assert decode.held, "the decode was never asked"
    assert set(decode.held) == {before + 1}, decode.held  # retries included: the KV was there each time
    params = SIGNER.verify(decode.params[0])
    assert (params["remote_host"], params["remote_port"]) == ("127.0.0.1", prefill.port)
    assert params["remote_handle"]
    assert all(p == decode.params[0] for p in decode.params)


# --- the router releases what no decode will fetch ------------------------------------------------------


@pytest.mark.parametrize("status", [400, 500])
def test_a_decode_refusing_the_request_has_the_kv_released(
    prefill: Prefill, decode: Decode, router: RouterProcess, status: int
) -> None:
    router.wait_ready()
    before = len(prefill.store)
    decode.reset(str(status))
    answer, body = raw_post(f"{router.url}/v1/completions", BODY)
    assert answer == status, body  # the decode's answer is the client's
    handed_off(decode, prefill, before=before)
    assert released(prefill, before=before), f"the prefill still holds the KV:\n{router.log()}"


def test_a_decode_that_cannot_be_reached_has_the_kv_released(
    prefill: Prefill, decode: Decode, router: RouterProcess
) -> None:
    router.wait_ready()
    before = len(prefill.store)
    decode.reset("cut")
    answer, body = raw_post(f"{router.url}/v1/completions", BODY)
    assert answer == 503, body  # no decode answered
    assert json.loads(body)["error"]["code"] == "no_backend"
    handed_off(decode, prefill, before=before)
    assert released(prefill, before=before), f"the prefill still holds the KV:\n{router.log()}"


def test_a_client_leaving_before_the_decode_answers_has_the_kv_released(
    prefill: Prefill, decode: Decode, router: RouterProcess
) -> None:
    router.wait_ready()
    before = len(prefill.store)
    decode.reset("hang")
    data = json.dumps(BODY).encode()
    with socket.create_connection(("127.0.0.1", router.port)) as sock:
        head = "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        sock.sendall(f"{head}content-length: {len(data)}\r\n\r\n".encode() + data)
        assert decode.received.wait(30), "the request never reached the decode"
        handed_off(decode, prefill, before=before)
    assert decode.closed.wait(5), "the router did not cancel the decode's request"
    assert released(prefill, before=before), f"the prefill still holds the KV:\n{router.log()}"


# --- the prefill drops what it parked for a caller that left ---------------------------------------------


class Hold:
    """Holds the engine thread the first time it calls `target.name` (just before the call, or just
    `after` it) until `release()`: a prefill as long as the test needs, at a known point."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, target: object, name: str, *, after: bool) -> None:
        self.reached = threading.Event()
        self._released = threading.Event()
        self.calls = 0
        real = getattr(target, name)

        def held(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            result = real(*args, **kwargs) if after else None
            if not self.reached.is_set():
                self.reached.set()
                self._released.wait(60)
            return result if after else real(*args, **kwargs)

        monkeypatch.setattr(target, name, held)

    def release(self) -> None:
        self._released.set()


def finished(prefill: Prefill) -> float:
    """Requests the prefill's scheduler has finished, whatever the reason."""
    return sum(
        sample.value
        for metric in prefill.state.metrics.registry.collect()
        if metric.name == "kubemoe_requests_finished"
        for sample in metric.samples
        if sample.name == "kubemoe_requests_finished_total"
    )


def wait_for(condition: Callable[[], bool], what: str, *, within: float = SEEN_WITHIN_S) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def post_and_leave(port: int, body: dict[str, Any], *, hold: Hold, prefill: Prefill) -> None:
    """POST `body` to `port` over a socket of its own, and close the socket once the engine thread is held
    (`hold`) and the prefill has seen its caller go (the request left the server's in-flight set; its
    abort is then in the scheduler); then let the engine thread go on."""
    data = json.dumps(body).encode()
    try:
        with closing(socket.create_connection(("127.0.0.1", port), timeout=30)) as sock:
            head = "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            sock.sendall(f"{head}content-length: {len(data)}\r\n\r\n".encode() + data)
            assert hold.reached.wait(SEEN_WITHIN_S), "the prefill never ran"
        wait_for(lambda: len(prefill.state.in_flight) == 0, "the prefill did not see its caller go")
    finally:
        hold.release()


def test_a_client_leaving_the_router_during_the_prefill_leaves_no_kv_parked(
    prefill: Prefill, router: RouterProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    router.wait_ready()
    before, done = len(prefill.store), finished(prefill)
    assert prefill.state.scheduler is not None
    step = Hold(monkeypatch, prefill.state.scheduler.leader, "run", after=False)  # held before the forward
    parked = Hold(monkeypatch, prefill.store, "put", after=True)
    parked.release()  # not held: it only counts the puts
    post_and_leave(router.port, BODY, hold=step, prefill=prefill)  # the router closes its prefill connection
    wait_for(lambda: finished(prefill) > done, "the prefill request never finished")
    assert released(prefill, before=before), "the prefill still holds the KV of a request no one waits for"
    assert parked.calls == 0  # the KV was not even parked: the abort came during the step


def test_a_caller_leaving_after_the_kv_was_parked_has_it_dropped(
    prefill: Prefill, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The router's connection to the prefill is cut (or times out) after the prefill parked the KV and
    before its answer, with the handle, went out."""
    before, done = len(prefill.store), finished(prefill)
    parked = Hold(monkeypatch, prefill.store, "put", after=True)
    body = {**BODY, "max_tokens": 1, "kv_transfer_params": SIGNER.sign(REMOTE_DECODE)}  # as the router sends
    post_and_leave(prefill.port, body, hold=parked, prefill=prefill)
    wait_for(lambda: finished(prefill) > done, "the prefill request never finished")
    assert parked.calls == 1
    assert released(prefill, before=before), "the prefill still holds the KV of a request no one waits for"


def test_a_streamed_prefill_keeps_no_kv(prefill: Prefill) -> None:
    """A streamed answer carries no kv_transfer_params (the router never streams a prefill): no decode
    could fetch the KV, so none is kept once the stream has ended."""
    before = len(prefill.store)
    body = {**BODY, "max_tokens": 1, "stream": True, "kv_transfer_params": SIGNER.sign(REMOTE_DECODE)}
    status, answer = raw_post(f"{prefill.url}/v1/completions", body)
    assert status == 200, answer
    assert answer.rstrip().endswith(b"data: [DONE]")
    assert len(prefill.store) == before


# --- the prefill's DELETE route -----------------------------------------------------------------------


def delete(prefill: Prefill, handle: str, signature: str | None) -> int:
    """DELETE /v1/kv/{handle}, the signature header's bytes as given (UTF-8); the answer's status."""
    head = f"DELETE /v1/kv/{handle} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n".encode()
    if signature is not None:
        head += KV_RELEASE_HEADER.encode() + b": " + signature.encode() + b"\r\n"
    with socket.create_connection(("127.0.0.1", prefill.port), timeout=10) as sock:
        sock.sendall(head + b"\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def keep(prefill: Prefill) -> tuple[str, PrefilledKV]:
    """A prompt's KV in the prefill's store, as a prefill keeps it for its decode."""
    kv = PrefilledKV(
        kv=[{"k": torch.arange(6.0).reshape(3, 2)}],
        first_token=7,
        prompt_tokens=3,
        prompt_sha256=prompt_digest([1, 2, 3]),
    )
    return prefill.store.put(kv), kv


def fetch(prefill: Prefill, handle: str) -> PrefilledKV | None:
    """GET /v1/kv/{handle}, as a decode pulls it (once): the KV, or None for a 404."""
    try:
        with urllib.request.urlopen(f"{prefill.url}/v1/kv/{handle}", timeout=10) as response:
            return PrefilledKV.decode(response.read())
    except urllib.error.HTTPError as err:
        if err.code != 404:
            raise
        return None


def test_the_routers_release_drops_the_kv_and_any_other_is_a_404(prefill: Prefill) -> None:
    before = len(prefill.store)
    handle, _ = keep(prefill)
    assert delete(prefill, handle, SIGNER.sign_release(handle)) == 204
    assert len(prefill.store) == before
    assert delete(prefill, handle, SIGNER.sign_release(handle)) == 404  # already gone: harmless
    assert fetch(prefill, handle) is None
    fetched, _ = keep(prefill)
    assert fetch(prefill, fetched) is not None  # the decode took it first
    assert delete(prefill, fetched, SIGNER.sign_release(fetched)) == 404
    never = "never-handed-out"
    assert delete(prefill, never, SIGNER.sign_release(never)) == 404


@pytest.mark.parametrize(
    "forge",
    [
        "none",
        "another deployment's key",
        "another handle's signature",
        "the kv_transfer_params signature",
        "not hex",
    ],
)
def test_a_release_not_signed_by_the_router_is_refused_and_the_kv_stays(prefill: Prefill, forge: str) -> None:
    before = len(prefill.store)
    handle, kv = keep(prefill)
    signature = {
        "none": None,
        "another deployment's key": KVSigner(b"another-deployment-key").sign_release(handle),
        "another handle's signature": SIGNER.sign_release(handle[:-1] + ("A" if handle[-1] != "A" else "B")),
        "the kv_transfer_params signature": SIGNER.sign({"remote_handle": handle})[SIGNATURE_FIELD],
        "not hex": "\u00e9" * 64,
    }[forge]
    try:
        assert delete(prefill, handle, signature) == 403
        assert len(prefill.store) == before + 1
        pulled = fetch(prefill, handle)  # still there for its decode
        assert pulled is not None
        assert torch.equal(pulled.kv[0]["k"], kv.kv[0]["k"])
    finally:
        prefill.store.take(handle)


def test_a_server_without_the_key_refuses_every_release(
    prefill: Prefill, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KV_KEY_ENV, raising=False)
    before = len(prefill.store)
    handle, _ = keep(prefill)
    try:
        with TestClient(build_app(prefill.state)) as client:  # the same store, no key to verify with
            answer = client.delete(
                f"/v1/kv/{handle}", headers={KV_RELEASE_HEADER: SIGNER.sign_release(handle)}
            )
        assert answer.status_code == 403, answer.text
        assert KV_KEY_ENV in answer.json()["error"]["message"]
        assert len(prefill.store) == before + 1
    finally:
        prefill.store.take(handle)
