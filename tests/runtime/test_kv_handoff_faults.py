"""Faults in the P/D KV hand-off of the torch engine (serve/kv/):

- parked KV expires on an idle prefill: the store expired entries only when put/take/len/nbytes ran, and
  nothing called them on a timer, so a KV whose decode never came (the router died, a decode answered
  without pulling) stayed in memory for good once no more P/D traffic came; the scheduler's loop now
  expires it (KVStore.expire);
- untrusted bytes whose header nests deeper than json.loads recurses (RecursionError), or whose metadata
  number is read as inf (1e400: OverflowError at int()), are a ValueError like every other malformed
  payload, so the decode prefills the prompt itself (200) rather than answering 500;
- the KV's handle is its bearer secret: a failed pull's error, and the decode's log of it, show it cut;
- the prefill sends a KV under one deadline: a decode that stops reading without closing no longer holds
  the taken KV, and the drain that waits for its request, for good.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel
from kubemoe_runtime.engines.torch.serve.app import ServerState, build_app
from kubemoe_runtime.engines.torch.serve.group import GroupLeader, RankRunner
from kubemoe_runtime.engines.torch.serve.kv.fetch import fetch_endpoint
from kubemoe_runtime.engines.torch.serve.kv.handoff import KVStore, PrefilledKV, prompt_digest
from kubemoe_runtime.engines.torch.serve.kv.pull import KVPuller, KVPullError
from kubemoe_runtime.engines.torch.serve.scheduler import Scheduler, SchedulerLimits
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.kv_auth import KV_KEY_ENV, KVSigner
from kubemoe_runtime.pod.metrics import MetricLabels, ServingMetrics
from tests.runtime.app_thread import serving
from tests.runtime.fake_backend import raw_post
from tests.runtime.kv_peer import KVPeer

KEY = "kv-faults-test-key-0123456789abcdef"
SIGNER = KVSigner(KEY.encode())
PROMPT = [5, 17, 42, 99]
MAX_MODEL_LEN = 64


def make_scheduler(
    engine: TorchEngine,
    tokenizer: TextTokenizer,
    *,
    kv_store: KVStore | None = None,
    metrics: ServingMetrics | None = None,
) -> Scheduler:
    return Scheduler(
        GroupLeader(RankRunner(engine, slots=2, max_len=MAX_MODEL_LEN), ep=ExpertParallel()),
        tokenizer=tokenizer,
        limits=SchedulerLimits(max_model_len=MAX_MODEL_LEN, max_num_seqs=2),
        eos_token_ids=(),
        metrics=metrics,
        kv_store=kv_store,
    )


@contextmanager
def engine_loop(scheduler: Scheduler, *, keepalive_s: float = 0.05) -> Iterator[None]:
    """The scheduler's loop on a thread for the block, as pod.py's engine thread runs it."""
    stop = threading.Event()
    thread = threading.Thread(target=scheduler.run, args=(stop,), kwargs={"keepalive_s": keepalive_s})
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive()


def wait_for(condition: Callable[[], bool], *, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gc.collect()
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# --- 1. parked KV expires on an idle prefill ----------------------------------------------------------


def park(store: KVStore) -> tuple[str, weakref.ref[torch.Tensor]]:
    """A prefilled prompt's KV (1 MB) in `store`, no reference kept here but a weak one."""
    kv = [{"k": torch.zeros(len(PROMPT), 65536)}]
    handle = store.put(PrefilledKV(kv, first_token=1, prompt_tokens=len(PROMPT), prompt_sha256="x"))
    return handle, weakref.ref(kv[0]["k"])


def test_store_expire_drops_only_what_is_due() -> None:
    now = [0.0]
    store = KVStore(ttl_s=10, clock=lambda: now[0])
    old, old_tensor = park(store)
    now[0] = 5.0
    fresh, _ = park(store)
    store.expire()
    assert old_tensor() is not None  # not due yet
    now[0] = 10.5
    store.expire()
    gc.collect()
    assert old_tensor() is None  # freed by expire() alone
    assert store.take(old) is None
    assert store.take(fresh) is not None


def test_an_idle_prefill_frees_expired_kv(engine: TorchEngine, tokenizer: TextTokenizer) -> None:
    """No request comes after the prefill: its engine loop idles, and the KV goes at its ttl anyway."""
    now = [0.0]
    store = KVStore(ttl_s=60, clock=lambda: now[0])
    scheduler = make_scheduler(engine, tokenizer, kv_store=store)
    handle, tensor = park(store)
    with engine_loop(scheduler):
        time.sleep(0.2)  # a few idle turns within the ttl: kept
        gc.collect()
        assert tensor() is not None
        now[0] = 61.0  # the ttl passes; no put, take, len or nbytes is called from here on
        assert wait_for(lambda: tensor() is None, timeout=5), "the idle prefill still holds the expired KV"
    assert store.nbytes == 0
    assert store.take(handle) is None


# --- 2. malformed KV bodies: ValueError, and the decode prefills itself ------------------------------


def _payload(header: bytes) -> bytes:
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


def deep_header() -> bytes:
    """A header nested 4000 arrays deep (json.loads: RecursionError), in 8 kB: within what the decode
    takes for PROMPT's KV, so the pull reads it whole and parses it."""
    depth = 4000
    return _payload(b'{"__metadata__": ' + b"[" * depth + b"]" * depth + b"}")


def infinite_number(field: str) -> bytes:
    """Metadata whose `field` JSON reads as inf (int(): OverflowError); no tensors."""
    meta = {"first_token": "7", "prompt_tokens": "0", "prompt_sha256": prompt_digest(PROMPT)}
    text = json.dumps({"__metadata__": {**meta, field: "INF"}}).replace('"INF"', "1e400")
    return _payload(text.encode())


MALFORMED = {
    "deep header": deep_header(),
    "first_token 1e400": infinite_number("first_token"),
    "prompt_tokens 1e400": infinite_number("prompt_tokens"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_payload_is_a_value_error(kind: str) -> None:
    with pytest.raises(ValueError, match="not a KV hand-off payload"):
        PrefilledKV.decode(MALFORMED[kind])


def test_a_malformed_answer_is_a_pull_error() -> None:
    peer = KVPeer()
    try:
        peer.routes["/v1/kv/h1"] = (200, None, MALFORMED["deep header"], False)
        with pytest.raises(KVPullError, match="RecursionError"):
            asyncio.run(KVPuller(timeout_s=5).pull(peer.params("h1")))
    finally:
        peer.close()


# --- 3. the handle is not shown whole -------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        return int(unused.getsockname()[1])


def test_a_failed_pull_does_not_show_the_whole_handle() -> None:
    handle = secrets.token_urlsafe(16)  # as KVStore hands them out
    params = {"remote_handle": handle, "remote_host": "127.0.0.1", "remote_port": closed_port()}
    with pytest.raises(KVPullError, match="connect: ConnectionRefusedError") as caught:
        asyncio.run(KVPuller(timeout_s=5).pull(params))
    assert handle not in str(caught.value)
    assert f"/v1/kv/{handle[:6]}..." in str(caught.value)


# --- 2 and 3 over HTTP: the decode answers 200, prefilling the prompt itself, and logs no handle --------


@pytest.fixture
def decode(
    qwen: Path, tokenizer: TextTokenizer, engine: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, ServingMetrics]]:
    """A decode: the torch engine's API on a scheduler with its engine loop, the deployment's key set."""
    monkeypatch.setenv(KV_KEY_ENV, KEY)
    metrics = ServingMetrics(MetricLabels(role="decode"))
    scheduler = make_scheduler(engine, tokenizer, metrics=metrics)
    state = ServerState(
        served_names=("m",),
        model_path=str(qwen),
        max_model_len=MAX_MODEL_LEN,
        vocab_size=engine.cfg.vocab_size,
        eos_token_ids=(),
        tokenizer=tokenizer,
        metrics=metrics,
        scheduler=scheduler,
    )
    with engine_loop(scheduler, keepalive_s=0.5), serving(build_app(state), lifespan="off") as port:
        yield f"http://127.0.0.1:{port}", metrics


def counter(metrics: ServingMetrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name, MetricLabels(role="decode").as_dict())
    return 0.0 if value is None else value


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("refused", "ConnectionRefusedError"),
        ("deep header", "RecursionError"),
        ("first_token 1e400", "OverflowError"),
    ],
)
def test_a_failed_pull_is_prefilled_here_and_logged_without_the_handle(
    decode: tuple[str, ServingMetrics], caplog: pytest.LogCaptureFixture, fault: str, error: str
) -> None:
    url, metrics = decode
    handle = secrets.token_urlsafe(16)
    peer = KVPeer()
    try:
        port = closed_port() if fault == "refused" else peer.port
        peer.routes[f"/v1/kv/{handle}"] = None if fault == "refused" else (200, None, MALFORMED[fault], False)
        params = {
            "do_remote_prefill": True,
            "remote_engine_id": "kubemoe-torch",
            "remote_handle": handle,
            "remote_host": "127.0.0.1",
            "remote_port": port,
        }
        body: dict[str, Any] = {
            "prompt": PROMPT,
            "max_tokens": 3,
            "temperature": 0,
            "kv_transfer_params": SIGNER.sign(params),
        }
        with caplog.at_level(logging.WARNING, logger="kubemoe_runtime"):
            status, answer = raw_post(f"{url}/v1/completions", body)
        assert status == 200, answer  # prefilled here
        assert json.loads(answer)["usage"]["completion_tokens"] == 3
        assert counter(metrics, "kubemoe_kv_pull_failures_total") == 1
        assert counter(metrics, "kubemoe_kv_pulled_tokens_total") == 0
        assert counter(metrics, "kubemoe_prompt_tokens_total") == len(PROMPT)
        assert "KV pull failed, prefilling here" in caplog.text
        assert error in caplog.text  # the fault itself, not some other refusal
        assert f"{handle[:6]}..." in caplog.text
        assert handle not in caplog.text
    finally:
        peer.close()


# --- 4. the prefill's answer has a deadline ---------------------------------------------------------------


class Finished:
    """ASGI middleware: sets `done` once the app has returned (or raised) for a request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.done = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                self.done.set()


def test_a_decode_that_stops_reading_is_cut_off(caplog: pytest.LogCaptureFixture) -> None:
    store = KVStore()
    kv = [{"k": torch.zeros(4, 1 << 22)}]  # 64 MiB: far more than the sockets' buffers hold
    handle = store.put(PrefilledKV(kv, first_token=1, prompt_tokens=4, prompt_sha256="x"))
    app = Finished(
        Starlette(routes=[Route("/v1/kv/{handle}", fetch_endpoint(lambda: store, send_timeout_s=0.5))])
    )
    with caplog.at_level(logging.WARNING, logger="kubemoe_runtime"), serving(app, lifespan="off") as port:
        client = socket.socket()
        try:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(("127.0.0.1", port))
            client.sendall(f"GET /v1/kv/{handle} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            start = time.monotonic()
            # ... and never reads, nor closes
            finished = app.done.wait(timeout=5)
            took = time.monotonic() - start
        finally:
            client.close()  # lets the old code's handler go too, so the server can stop
    assert finished, "the handler still sends to a decode that stopped reading"
    assert 0.4 <= took < 3, took
    assert len(store) == 0  # taken
    assert f"KV {handle[:6]}... not read by its decode in 0.5 s" in caplog.text
    assert handle not in caplog.text
