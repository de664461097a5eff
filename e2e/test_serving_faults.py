"""Serving faults, on real processes: torch engine servers behind the router, the official OpenAI client.

Each test causes one fault, asserts what must hold, and records what a client saw, requests lost and the
seconds to recover (e2e/reliability.py; the README's reliability table is made from these records):

- a backend SIGKILLed mid-stream under 32 concurrent streams: its streams end with an error event (never a
  200 cut short without one), the other backend's streams finish, and no request sent after the kill is
  lost (the router moves a refused connection to the survivor and ejects the dead backend);
- a hung backend (SIGSTOP: it accepts connections and never answers): the router's read timeout answers
  its requests 504 and ejects it; requests after that go to the live backend; SIGCONT re-admits it;
- a prefill that dies between its answer and the decode's pull: the decode's pull is refused and it
  prefills the prompt itself, so the client gets the same answer, a little later;
- a KV peer that drips bytes: the pull is cut off at its deadline, the decode prefills the prompt itself,
  and serves other requests meanwhile;
- a corrupt shard: the engine refuses to start, naming the file, within seconds (no half-loaded server).

No cluster: processes on 127.0.0.1, so these run in seconds and on any machine (the real-node faults are
in test_faults.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from e2e.reliability import Outcome, RecordProperty, record
from kubemoe_runtime.engines.torch.serve.kv.pull import PULL_TIMEOUT_S
from kubemoe_runtime.pod.kv_auth import KV_KEY_ENV, KVSigner
from kubemoe_runtime.router.proxy import REMOTE_DECODE
from kubemoe_runtime.tools.checkpoints import write_tiny_checkpoint
from tests.runtime.routing import RouterProcess, sample
from tests.runtime.serving import Server, http_get

MODEL = "tiny-qwen"
STREAMS = 32
KV_KEY = "faults-kv-key-0123456789abcdef"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen", arch="qwen3_moe", seed=0)


SERVE = (sys.executable, "-m", "kubemoe_runtime.cli", "serve")


def serve_args(role: str, *extra: str) -> list[str]:
    return ["--served-model-name", MODEL, "--role", role, "--max-model-len", "512", *extra]


def client(url: str, *, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)


def kill(server: Server, sig: signal.Signals) -> float:
    os.killpg(server.process.pid, sig)  # the server's session: its rank processes too
    return time.monotonic()


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str) -> float:
    """Seconds until predicate() held; AssertionError naming `what` after `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def running(server: Server) -> int:
    """Requests the server is running or has queued, from its /metrics."""
    text = http_get(f"{server.url}/metrics")[1]
    return int(
        sum(sample(text, name) or 0 for name in ("kubemoe_requests_running", "kubemoe_requests_waiting"))
    )


def healthy(router: RouterProcess, server: Server, role: str = "worker") -> float | None:
    return router.metric("kubemoe_router_backend_healthy", role=role, backend=f"127.0.0.1:{server.port}")


@pytest.fixture
def pair(qwen: Path, tmp_path: Path) -> Iterator[tuple[list[Server], RouterProcess]]:
    """Two colocated workers (16 KV slots each) behind a least-load router probing every second, whose
    read timeout is 3 s (the hung backend's test waits for it)."""
    with _pair(qwen, tmp_path, read_timeout_s=3) as found:
        yield found


@pytest.fixture
def patient_pair(qwen: Path, tmp_path: Path) -> Iterator[tuple[list[Server], RouterProcess]]:
    """As `pair`, with a 60 s read timeout: requests queued on the survivor of a kill wait for a KV slot
    while its streams run, sending nothing meanwhile, longer than 3 s on a loaded machine."""
    with _pair(qwen, tmp_path, read_timeout_s=60) as found:
        yield found


@contextlib.contextmanager
def _pair(qwen: Path, tmp_path: Path, *, read_timeout_s: int) -> Iterator[tuple[list[Server], RouterProcess]]:
    workers = [
        Server(qwen, args=serve_args("worker", "--max-num-seqs", "16"), log_dir=tmp_path, name=f"w{i}")
        for i in range(2)
    ]
    router = RouterProcess(
        args=[
            "--served-model-name",
            MODEL,
            "--policy",
            "least-load",
            "--worker-service",
            ",".join(f"127.0.0.1:{w.port}" for w in workers),
            "--health-interval",
            "1",
            "--upstream-read-timeout",
            str(read_timeout_s),
        ],
        log_dir=tmp_path,
    )
    try:
        for w in workers:
            w.wait_ready()
        router.wait_ready()
        # The router is ready with one healthy backend; these tests need both.
        wait_for(lambda: both_admitted(router, workers), timeout=30, what="both workers admitted")
        yield workers, router
    finally:
        router.stop()
        for w in workers:
            if w.process.poll() is None:
                os.killpg(w.process.pid, signal.SIGCONT)
            w.stop()


def both_admitted(router: RouterProcess, workers: list[Server]) -> bool:
    return all(healthy(router, w) == 1 for w in workers)


def complete(c: openai.OpenAI, i: int, *, max_tokens: int = 8) -> int:
    r = c.completions.create(
        model=MODEL,
        prompt=f"faults {i}",
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage is not None
    return r.usage.completion_tokens


def test_a_backend_killed_mid_stream_under_32_streams(
    patient_pair: tuple[list[Server], RouterProcess], record_property: RecordProperty
) -> None:
    (_, victim), router = patient_pair
    c = client(router.url)
    max_tokens = 400  # long enough that every stream is still running when the kill lands
    started = threading.Semaphore(0)

    def stream(i: int) -> tuple[str, int]:
        """("done" or the error, tokens the usage chunk counted)."""
        chunks = c.completions.create(
            model=MODEL,
            prompt=f"stream {i}",
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        tokens = 0
        try:
            for n, chunk in enumerate(chunks):
                if n == 0:
                    started.release()
                tokens = chunk.usage.completion_tokens if chunk.usage else tokens
        except openai.APIError as err:
            return f"error: {err.message}", tokens
        return "done", tokens

    with ThreadPoolExecutor(max_workers=STREAMS) as pool:
        futures = [pool.submit(stream, i) for i in range(STREAMS)]
        for _ in range(STREAMS):
            assert started.acquire(timeout=120), "every stream started"
        on_victim = running(victim)
        killed_at = kill(victim, signal.SIGKILL)
        # Sent after the kill, before the router has noticed: none may be lost.
        with ThreadPoolExecutor(max_workers=16) as after:
            late = list(after.map(lambda i: _outcome(lambda: complete(c, i)), range(STREAMS)))
        wait_for(lambda: healthy(router, victim) == 0, timeout=10, what="the killed backend ejected")
        ejected_s = time.monotonic() - killed_at
        results = [f.result(timeout=300) for f in futures]

    assert 0 < on_victim < STREAMS, f"least-load spread the streams over both backends: {on_victim} on one"
    done = [r for r in results if r[0] == "done"]
    cut = [r for r in results if r[0] != "done"]
    assert all(tokens == max_tokens for _, tokens in done), done
    assert len(cut) == on_victim, (
        f"every stream on the killed backend ({on_victim}) ends with an error: {cut}"
    )
    assert all("backend failed" in error for error, _ in cut), cut
    late_lost = [r for r in late if r != 8]
    assert not late_lost, f"requests sent after the kill: {late}"
    record(
        record_property,
        Outcome(
            fault=f"a backend SIGKILLed mid-stream under {STREAMS} concurrent streams",
            client_saw=(
                f"its {len(cut)} streams ended with an error event ({cut[0][0].split(': ')[1]}); "
                f"the other {len(done)} finished; requests sent after the kill were answered"
            ),
            lost=f"{len(cut)} of {STREAMS} streams in flight on it; 0 of {len(late)} sent after the kill",
            recover_s=ejected_s,
        ),
    )


def _outcome(call: Callable[[], int]) -> int | str:
    try:
        return call()
    except openai.APIError as err:
        return f"{type(err).__name__}: {err.message}"


def test_a_hung_backend_is_timed_out_ejected_and_readmitted(
    pair: tuple[list[Server], RouterProcess], record_property: RecordProperty
) -> None:
    (_, hung), router = pair
    c = client(router.url)
    assert complete(c, 0) == 8
    stopped_at = kill(hung, signal.SIGSTOP)
    with ThreadPoolExecutor(max_workers=8) as pool:
        first = list(pool.map(lambda i: _outcome(lambda: complete(c, i)), range(8)))
    wait_for(lambda: healthy(router, hung) == 0, timeout=15, what="the hung backend ejected")
    ejected_s = time.monotonic() - stopped_at
    timed_out = [r for r in first if r != 8]
    assert all("timed out" in str(r) or "504" in str(r) or "Timeout" in str(r) for r in timed_out), first
    # Ejected: everything now goes to the live backend.
    with ThreadPoolExecutor(max_workers=8) as pool:
        after = list(pool.map(lambda i: _outcome(lambda: complete(c, i)), range(16)))
    assert after == [8] * 16, after
    kill(hung, signal.SIGCONT)
    readmitted_s = wait_for(lambda: healthy(router, hung) == 1, timeout=15, what="readmitted after SIGCONT")
    assert complete(c, 99) == 8
    record(
        record_property,
        Outcome(
            fault="a hung backend (SIGSTOP: accepts connections, never answers)",
            client_saw=(
                f"{len(timed_out)} of {len(first)} requests sent while it hung got a 504 after the router's "
                "read timeout (3 s here, --upstream-read-timeout; 600 s by default); once ejected, all "
                f"went to the live backend; SIGCONT re-admitted it in {readmitted_s:.1f} s"
            ),
            lost=f"{len(timed_out)} of {len(first)} sent before the ejection (504); 0 of {len(after)} after",
            recover_s=ejected_s,
        ),
    )


@pytest.fixture
def pd(qwen: Path, tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    """A prefill and a decode server, the hand-off signed with KV_KEY (the test plays the router)."""
    env = {KV_KEY_ENV: KV_KEY}
    producer = '{"kv_connector":"ExampleConnector","kv_role":"kv_producer"}'
    consumer = '{"kv_connector":"ExampleConnector","kv_role":"kv_consumer"}'
    prefill = Server(
        qwen,
        args=serve_args("prefill", "--kv-transfer-config", producer),
        log_dir=tmp_path,
        name="p",
        env=env,
    )
    decode = Server(
        qwen, args=serve_args("decode", "--kv-transfer-config", consumer), log_dir=tmp_path, name="d", env=env
    )
    try:
        prefill.wait_ready()
        decode.wait_ready()
        yield prefill, decode
    finally:
        prefill.stop()
        decode.stop()


def post(url: str, body: dict[str, Any], *, timeout: float = 60) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as err:
        return int(err.code), json.loads(err.read())


def hand_off(prefill: Server, body: dict[str, Any]) -> dict[str, Any]:
    """What the router does first: a one-token prefill that keeps its KV for the decode; the signed
    kv_transfer_params the router then passes to the decode."""
    signer = KVSigner(KV_KEY.encode())
    status, answer = post(
        f"{prefill.url}/v1/completions",
        {**body, "max_tokens": 1, "kv_transfer_params": signer.sign(REMOTE_DECODE)},
    )
    assert status == 200, answer
    return signer.sign(answer["kv_transfer_params"])


def test_a_prefill_scaled_down_before_the_pull_waits_for_it(
    pd: tuple[Server, Server], record_property: RecordProperty
) -> None:
    """Scale-down: SIGTERM (the pod's deletion) after the prefill answered, before the decode pulled
    (its queue held the request). The prefill drains: new requests 503, but it stays up past its quiet
    period while the KV waits, serves the pull, and only then exits 0. Without `Drain.pending` it
    exited after QUIET_S (1 s) and the decode had to prefill the prompt again."""
    prefill, decode = pd
    body = {"model": MODEL, "prompt": "the prefill is scaled down", "max_tokens": 8, "temperature": 0}
    status, live = post(
        f"{decode.url}/v1/completions", {**body, "kv_transfer_params": hand_off(prefill, body)}
    )
    assert status == 200, live
    failures, pulled = pull_failures(decode), pulled_tokens(decode)
    params = hand_off(prefill, body)
    prefill.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_for(lambda: http_get(f"{prefill.url}/ready")[0] == 503, timeout=10, what="the prefill to drain")
    time.sleep(3.0)  # three quiet periods: the KV, not a request in flight, is what keeps it up
    assert prefill.process.poll() is None, prefill.log()
    status, answer = post(f"{decode.url}/v1/completions", {**body, "kv_transfer_params": params})
    assert status == 200, answer
    assert answer["choices"][0]["text"] == live["choices"][0]["text"], (answer, live)
    assert pull_failures(decode) == failures  # the pull was served: no prefill again
    assert pulled_tokens(decode) > pulled
    assert prefill.process.wait(timeout=15) == 0, prefill.log()
    record(
        record_property,
        Outcome(
            fault="a prefill scaled down (SIGTERM) between its answer and the decode's KV pull",
            client_saw="HTTP 200, the same greedy answer from the pulled KV; the prefill exited 0 after it",
            lost="0 of 1",
            recover_s=time.monotonic() - signalled,
        ),
    )


def test_a_prefill_dying_before_the_pull_is_prefilled_by_the_decode(
    pd: tuple[Server, Server], record_property: RecordProperty
) -> None:
    prefill, decode = pd
    body = {"model": MODEL, "prompt": "the prefill dies", "max_tokens": 8, "temperature": 0}
    # The hand-off works while the prefill lives.
    status, live = post(
        f"{decode.url}/v1/completions", {**body, "kv_transfer_params": hand_off(prefill, body)}
    )
    assert status == 200, live
    assert live["usage"]["completion_tokens"] == 8, live
    failures = pull_failures(decode)
    params = hand_off(prefill, body)
    killed_at = kill(prefill, signal.SIGKILL)
    prefill.process.wait(timeout=10)
    status, answer = post(f"{decode.url}/v1/completions", {**body, "kv_transfer_params": params})
    answered_s = time.monotonic() - killed_at
    # The pull fails (connection refused) and the decode prefills the prompt itself: same greedy answer.
    assert status == 200, answer
    assert answer["choices"][0]["text"] == live["choices"][0]["text"], (answer, live)
    assert pull_failures(decode) == failures + 1
    assert answered_s < 10, f"answered fast, not after a long timeout: {answered_s:.1f}s"
    assert http_get(f"{decode.url}/health")[0] == 200
    record(
        record_property,
        Outcome(
            fault="a prefill SIGKILLed between its answer and the decode's KV pull",
            client_saw=(
                "HTTP 200, the same greedy answer: the decode's pull was refused and it prefilled the "
                "prompt itself (kubemoe_kv_pull_failures_total +1)"
            ),
            lost="0 of 1",
            recover_s=answered_s,
        ),
    )


def test_a_dripping_kv_peer_is_cut_off_and_the_decode_serves_meanwhile(
    pd: tuple[Server, Server], record_property: RecordProperty
) -> None:
    """A "prefill" that answers the KV pull one byte every 50 ms: a stand-in socket, since a real prefill
    cannot be made to drip on demand. The decode's pull is cut off at its deadline (PULL_TIMEOUT_S), the
    request is prefilled on the decode instead, and other requests are served while the pull drips."""
    prefill, decode = pd
    signer = KVSigner(KV_KEY.encode())
    body = {"model": MODEL, "prompt": "a dripping peer", "max_tokens": 8, "temperature": 0}
    status, first = post(
        f"{prefill.url}/v1/completions",
        {**body, "max_tokens": 1, "kv_transfer_params": signer.sign(REMOTE_DECODE)},
    )
    assert status == 200, first
    status, live = post(
        f"{decode.url}/v1/completions",
        {**body, "kv_transfer_params": signer.sign(first["kv_transfer_params"])},
    )
    assert status == 200, live
    with dripping_peer() as port:
        params = signer.sign({**first["kv_transfer_params"], "remote_port": port})
        failures = pull_failures(decode)
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=1) as pool:
            dripped = pool.submit(
                post, f"{decode.url}/v1/completions", {**body, "kv_transfer_params": params}
            )
            wait_for(lambda: dripping_peer.serving, timeout=10, what="the decode to start its pull")
            other_start = time.monotonic()
            status, other = post(f"{decode.url}/v1/completions", {**body, "prompt": "meanwhile"})
            other_s = time.monotonic() - other_start
            assert status == 200, other
            assert not dripped.done(), "the pull was still dripping while the other request was served"
            status, answer = dripped.result(timeout=PULL_TIMEOUT_S + 30)
        answered_s = time.monotonic() - start
    assert status == 200, answer
    assert answer["choices"][0]["text"] == live["choices"][0]["text"], (answer, live)
    assert pull_failures(decode) == failures + 1
    assert PULL_TIMEOUT_S <= answered_s < PULL_TIMEOUT_S + 15, answered_s
    record(
        record_property,
        Outcome(
            fault="a KV peer that drips its answer (1 byte / 50 ms)",
            client_saw=(
                f"HTTP 200, the same answer, {answered_s:.0f} s later: the pull was cut off at its "
                f"{PULL_TIMEOUT_S:g} s deadline and the decode prefilled the prompt; a request sent "
                f"meanwhile was answered in {other_s * 1e3:.0f} ms"
            ),
            lost="0 of 2",
            recover_s=answered_s,
        ),
    )


class _DrippingPeer:
    """A socket that answers one HTTP request with a 200 and then one byte every 50 ms."""

    serving = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[int]:
        listener = socket.create_server(("127.0.0.1", 0))
        stop = threading.Event()

        def drip() -> None:
            listener.settimeout(60)
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2000\r\n\r\n")
                    type(self).serving = True
                    while not stop.is_set():
                        conn.sendall(b"x")
                        time.sleep(0.05)

        thread = threading.Thread(target=drip, daemon=True)
        thread.start()
        try:
            yield int(listener.getsockname()[1])
        finally:
            stop.set()
            listener.close()
            thread.join(5)
            type(self).serving = False


dripping_peer = _DrippingPeer()


def pull_failures(server: Server) -> float:
    return sample(http_get(f"{server.url}/metrics")[1], "kubemoe_kv_pull_failures_total") or 0.0


def pulled_tokens(server: Server) -> float:
    return sample(http_get(f"{server.url}/metrics")[1], "kubemoe_kv_pulled_tokens_total") or 0.0


def test_a_corrupt_shard_stops_the_engine_naming_the_file(
    qwen: Path, tmp_path: Path, record_property: RecordProperty
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    shard = sorted(qwen.glob("*.safetensors"))[-1]
    for f in qwen.iterdir():
        if f != shard:
            (broken / f.name).write_bytes(f.read_bytes())
    data = shard.read_bytes()
    (broken / shard.name).write_bytes(data[: len(data) // 2])  # cut short: a download that stopped
    start = time.monotonic()
    done = subprocess.run(
        [*SERVE, "--model", str(broken), "--port", "0", "--dtype", "float32", *serve_args("worker")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    failed_s = time.monotonic() - start
    assert done.returncode != 0, done.stderr[-2000:]
    assert shard.name in done.stderr, done.stderr[-2000:]
    line = next(line for line in done.stderr.splitlines() if shard.name in line)
    said = line[line.index("WeightLoadError") :].replace(str(broken), "CHECKPOINT")
    record(
        record_property,
        Outcome(
            fault="a corrupt shard (a safetensors file cut in half)",
            client_saw=f"the engine exited {done.returncode} before serving: {said[:110]}",
            lost="none: it never became ready, so no request reached it",
            recover_s=None,
        ),
    )
    print(f"corrupt shard refused in {failed_s:.1f}s")
