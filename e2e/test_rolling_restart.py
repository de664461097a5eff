"""A rolling restart under load loses nothing: real processes, no cluster.

Two colocated torch workers behind the router (least-load, health probes every second). Eight clients
loop on the official openai client (no retries of its own), streaming and not, greedy with ignore_eos so
every answer has exactly max_tokens tokens, for the whole rollout. Each worker in turn is restarted as a
Deployment's rolling update restarts a pod: SIGTERM (it drains, pod/drain.py: /ready and new requests
503, which the router ejects and retries elsewhere; requests in flight finish), wait for it to exit, start
its replacement on the same port, wait until it is ready and the router has it back in rotation.

Held: no request failed, every answer is complete (its token count, finish_reason `length`, and the same
greedy text as every other answer to the same prompt), every stream in flight at a SIGTERM on that worker
finished, the router took each worker out on its drain's 503 (no refused or reset connection), both
replacements served, and the router's count of answered requests grew.

Without the drain (uvicorn's own shutdown: stop listening, let open requests finish for up to 5 s) these
short requests are still answered, the router retrying refused ones elsewhere, but the router learns of
each restart from a refused connection: the assertion on its backend errors is what fails then.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from e2e.reliability import Outcome, RecordProperty, record
from kubemoe_runtime.tools.checkpoints import write_tiny_checkpoint
from tests.runtime.routing import RouterProcess
from tests.runtime.serving import Server, http_get

MODEL = "tiny-qwen"
CLIENTS = 8
TOKENS = (16, 24, 32)
PROMPTS = [f"rolling restart request {i}: the experts of layer {i % 3} route tokens" for i in range(6)]
BACKEND_HEADER = "x-kubemoe-worker-backend"
ROUTER_HEALTH_S = "1"
SETTLE_S = 1.0  # load before the first SIGTERM and after the last replacement is back
NICE = 5  # the servers yield to the clients and the router on a small machine


@dataclass(frozen=True)
class Call:
    """One request as a client saw it."""

    start: float
    end: float
    stream: bool
    prompt: int
    max_tokens: int
    backend: str | None = None
    text: str = ""
    tokens: int = -1
    finish_reason: str | None = None
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and self.tokens == self.max_tokens and self.finish_reason == "length"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("rolling") / "qwen", arch="qwen3_moe", seed=0)


def start_worker(checkpoint: Path, logs: Path, name: str, *, port: int | None = None) -> Server:
    args = ["--role", "worker", "--served-model-name", MODEL, "--max-model-len", "128"]
    server = Server(checkpoint, args=args, log_dir=logs, name=name, port=port)
    with contextlib.suppress(OSError):  # before it loads: the clients and the router keep their share
        os.setpriority(os.PRIO_PROCESS, server.process.pid, NICE)
    return server


def call(c: openai.OpenAI, i: int) -> Call:
    """The i-th request of a client: streaming or not, one of PROMPTS, one of TOKENS."""
    stream, prompt, n = i % 2 == 0, (i // 2) % len(PROMPTS), TOKENS[i % len(TOKENS)]
    start = time.monotonic()
    fixed = {"ignore_eos": True}  # exactly n tokens
    text, tokens, reason = "", -1, None
    try:
        if stream:
            raw_stream = c.completions.with_raw_response.create(
                model=MODEL,
                prompt=PROMPTS[prompt],
                max_tokens=n,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=fixed,
            )
            backend = raw_stream.headers.get(BACKEND_HEADER)
            for chunk in raw_stream.parse():  # an error event raises openai.APIError
                for choice in chunk.choices:
                    text += choice.text
                    if choice.finish_reason:  # typed as always set; None until the last event
                        reason = choice.finish_reason
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
        else:
            raw = c.completions.with_raw_response.create(
                model=MODEL, prompt=PROMPTS[prompt], max_tokens=n, temperature=0, extra_body=fixed
            )
            backend = raw.headers.get(BACKEND_HEADER)
            answer = raw.parse()
            text, reason = answer.choices[0].text, answer.choices[0].finish_reason
            tokens = answer.usage.completion_tokens if answer.usage is not None else -1
    except (openai.APIError, OSError) as err:
        error = f"{type(err).__name__}: {err}"
        return Call(start, time.monotonic(), stream, prompt, n, error=error)
    return Call(
        start,
        time.monotonic(),
        stream,
        prompt,
        n,
        backend=backend,
        text=text,
        tokens=tokens,
        finish_reason=reason,
    )


class Load:
    """CLIENTS threads, each looping on `call` until stopped."""

    def __init__(self, url: str) -> None:
        self.calls: list[Call] = []
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, args=(url, k), name=f"client-{k}", daemon=True)
            for k in range(CLIENTS)
        ]
        for t in self._threads:
            t.start()

    def _loop(self, url: str, k: int) -> None:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        i = k
        while not self.stopped.is_set():
            seen = call(c, i)
            with self._lock:
                self.calls.append(seen)
            i += CLIENTS

    def stop(self) -> list[Call]:
        self.stopped.set()
        for t in self._threads:
            t.join(timeout=90)
        with self._lock:
            return list(self.calls)


@dataclass(frozen=True)
class Restart:
    backend: str
    sigterm: float
    exited: float
    ready: float
    in_rotation: float


def backend_errors(router: RouterProcess) -> dict[str, float]:
    """The router's kubemoe_router_backend_errors_total, summed by kind (503, connect, read, ...)."""
    _, text = http_get(f"{router.url}/metrics")
    errors: dict[str, float] = {}
    for line in text.splitlines():
        match = re.fullmatch(r"kubemoe_router_backend_errors_total\{(.*)\} (\S+)", line)
        if match is not None:
            kind = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))["kind"]
            errors[kind] = errors.get(kind, 0) + float(match.group(2))
    return errors


def wait_until(condition: object, *, timeout: float, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def servers(checkpoint: Path, tmp_path: Path) -> Iterator[tuple[list[Server], RouterProcess]]:
    workers = [start_worker(checkpoint, tmp_path, f"w{k}") for k in range(2)]
    service = ",".join(f"127.0.0.1:{w.port}" for w in workers)
    router = RouterProcess(
        args=[
            "--served-model-name",
            MODEL,
            "--policy",
            "least-load",
            "--worker-service",
            service,
            "--health-interval",
            ROUTER_HEALTH_S,
        ],
        log_dir=tmp_path,
    )
    try:
        for w in workers:
            w.wait_ready()
        router.wait_ready()
        yield workers, router
    finally:
        router.stop()
        for w in workers:
            w.stop()


def test_a_rolling_restart_under_load_loses_no_request(
    servers: tuple[list[Server], RouterProcess],
    checkpoint: Path,
    tmp_path: Path,
    record_property: RecordProperty,
) -> None:
    workers, router = servers
    served = "kubemoe_router_requests_total"
    answered_before = router.metric(served, endpoint="/v1/completions", code="200") or 0
    load = Load(router.url)
    restarts: list[Restart] = []
    try:
        time.sleep(SETTLE_S)
        rollout_start = time.monotonic()
        for k in range(len(workers)):
            old = workers[k]
            backend = f"127.0.0.1:{old.port}"
            sigterm = time.monotonic()
            old.process.send_signal(signal.SIGTERM)
            code = old.process.wait(timeout=60)
            exited = time.monotonic()
            old.stop()  # its log closed; nothing of its session left
            assert code == 0, old.log()
            workers[k] = start_worker(checkpoint, tmp_path, f"w{k}-new", port=old.port)
            workers[k].wait_ready()
            ready = time.monotonic()
            wait_until(
                lambda b=backend: (
                    router.metric("kubemoe_router_backend_healthy", role="worker", backend=b) == 1
                ),
                timeout=30,
                what=f"the router taking {backend} back",
            )
            restarts.append(Restart(backend, sigterm, exited, ready, time.monotonic()))
        rollout_s = time.monotonic() - rollout_start
        time.sleep(SETTLE_S)
    finally:
        calls = load.stop()
    answered = sum(c.complete for c in calls)
    with contextlib.suppress(AssertionError):  # the router counts a stream once it has relayed its end
        wait_until(
            lambda: (
                (router.metric(served, endpoint="/v1/completions", code="200") or 0) - answered_before
                >= answered
            ),
            timeout=5,
            what="the router's count",
        )
    answered_after = router.metric(served, endpoint="/v1/completions", code="200") or 0
    errors = backend_errors(router)

    failed = [c for c in calls if not c.complete]
    texts: dict[tuple[int, int], set[str]] = {}
    for c in calls:
        if c.complete:
            texts.setdefault((c.prompt, c.max_tokens), set()).add(c.text)
    in_flight = [
        c
        for r in restarts
        for c in calls
        if c.stream and c.backend == r.backend and c.start < r.sigterm < c.end
    ]
    for r in restarts:
        print(
            f"{r.backend}: exited {r.exited - r.sigterm:.2f}s after SIGTERM, replacement ready "
            f"{r.ready - r.exited:.2f}s later, back in rotation after {r.in_rotation - r.ready:.2f}s"
        )
    print(
        f"rolling restart of {len(restarts)} workers in {rollout_s:.1f}s under {CLIENTS} clients: "
        f"{len(calls)} requests, {len(failed)} failed, {len(in_flight)} streams in flight at a SIGTERM; "
        f"the router's backend errors by kind: {errors}"
    )
    record(
        record_property,
        Outcome(
            fault=f"rolling restart of 2 colocated torch workers (SIGTERM, replaced) under {CLIENTS} clients",
            client_saw=(
                f"{len(calls) - len(failed)} complete answers; {len(in_flight)} streams in flight at a "
                "SIGTERM finished"
                if not failed
                else f"{len(failed)} failed or incomplete: {failed[0].error or 'incomplete'}"
            ),
            lost=f"{len(failed)} of {len(calls)}",
            recover_s=rollout_s,
        ),
    )
    assert not failed, failed[:5]
    # Each worker went out of rotation on its drain's 503, never on a refused or reset connection (which
    # is how the router learns of a worker that just stops: uvicorn's own shutdown closes its socket).
    assert set(errors) <= {"503"}, errors
    assert all(len(seen) == 1 for seen in texts.values()), "one greedy text per prompt and length"
    assert in_flight, "no stream was in flight at either SIGTERM: the test proved nothing about draining"
    assert all(c.complete for c in in_flight)
    for r in restarts:
        assert any(c.backend == r.backend and c.start > r.in_rotation for c in calls), (
            f"the replacement on {r.backend} served nothing"
        )
    assert answered_after - answered_before == answered == len(calls)
