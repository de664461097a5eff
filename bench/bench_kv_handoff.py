"""KV hand-off throughput: a prefill's KV pulled over GET /v1/kv/{handle}, against plain loopback TCP.

One torch-engine prefill process (`serve --role prefill`, float32) on the tests' tiny Qwen3-MoE with
its positions raised to 4096 (loopback.py): 3 layers x (K, V) x 2 KV heads x 32 x 4 bytes = 1536 bytes of
KV per token, so a 4000-token prompt hands off ~6 MB. Each repetition prefills a fresh prompt (random
token ids; the router's prefill request: max_tokens=1, kv_transfer_params {"do_remote_decode": true}) and
then pulls its KV the way a decode does, timing only the pull:

    KVPuller.pull   the decode's code path (kv/pull.py): GET -> the prefill's handler (KVStore.take,
                    PrefilledKV.encode in a thread) -> uvicorn sends the body -> the body read ->
                    PrefilledKV.decode; bytes/s = payload bytes / pull time
    loopback TCP    the same number of bytes from a plain socket server in another process: the client
                    sends 8 bytes (the length), the server sendall()s a ready buffer, the client
                    recv_into()s a fresh buffer of its own; the reference, measured right after each pull

Medians over REPEATS. The pull is split by timing here, on the same payload, the encode (prefill side)
and the decode (decode side) it includes; "HTTP" is the rest: the request, the thread hops, and moving
the bytes through uvicorn and the client. Goal (issue 5): the pull >= 50% of loopback TCP bytes/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from loopback import MODEL, engine, log_dir, tiny_checkpoint, wait_ready

from kubemoe_runtime.kv.handoff import PrefilledKV
from kubemoe_runtime.kv.pull import KVPuller
from kubemoe_runtime.router.proxy import REMOTE_DECODE
from tests.runtime.serving import http_post

POSITIONS: Final = 4096
PROMPT_TOKENS: Final = (1000, 4000)
REPEATS: Final = 5
TCP_CHUNK: Final = 1 << 20

TCP_SERVER: Final = """
import socket, sys
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
data = bytes(int(sys.argv[1]))
while True:
    conn, _ = srv.accept()
    with conn:
        while header := conn.recv(8):
            conn.sendall(memoryview(data)[: int.from_bytes(header, "little")])
"""


def prefill(url: str, *, tokens: int, seed: int) -> dict[str, Any]:
    """Run one prompt on the prefill as the router does; return its kv_transfer_params."""
    rng = random.Random(seed)
    body = {
        "model": MODEL,
        "prompt": [rng.randrange(10, 500) for _ in range(tokens)],
        "max_tokens": 1,
        "temperature": 0,
        "kv_transfer_params": dict(REMOTE_DECODE),
    }
    status, answer = http_post(f"{url}/v1/completions", body)
    if status != 200:
        raise RuntimeError(f"prefill answered {status}: {answer}")
    params: dict[str, Any] = answer["kv_transfer_params"]
    return params


def tcp_seconds(sock: socket.socket, buffer: memoryview, n: int) -> float:
    started = time.perf_counter()
    sock.sendall(n.to_bytes(8, "little"))
    got = 0
    while got < n:
        got += sock.recv_into(buffer[got : min(n, got + TCP_CHUNK)])
    return time.perf_counter() - started


async def pull_seconds(puller: KVPuller, params: dict[str, Any]) -> tuple[float, PrefilledKV]:
    started = time.perf_counter()
    pulled = await puller.pull(params)
    return time.perf_counter() - started, pulled


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


async def measure(url: str, *, tokens: int, tcp_port: int) -> dict[str, float]:
    """Seconds per stage (medians) and the payload size, for `tokens`-token prompts."""
    puller = KVPuller()
    times: dict[str, list[float]] = {"pull": [], "tcp": [], "encode": [], "decode": []}
    with socket.create_connection(("127.0.0.1", tcp_port)) as sock:
        for seed in range(-1, REPEATS):  # seed -1: warm-up, not counted
            pull_s, pulled = await pull_seconds(puller, prefill(url, tokens=tokens, seed=seed))
            payload = pulled.encode()  # what the prefill sent (the same encoder)
            tcp_s = tcp_seconds(sock, memoryview(bytearray(len(payload))), len(payload))
            if seed >= 0:
                times["pull"].append(pull_s)
                times["tcp"].append(tcp_s)
                times["encode"].append(timed(pulled.encode))
                times["decode"].append(timed(lambda payload=payload: PrefilledKV.decode(payload)))  # type: ignore[misc]
    result = {name: statistics.median(values) for name, values in times.items()}
    result["bytes"] = len(payload)
    return result


def main() -> None:
    model = tiny_checkpoint(positions=POSITIONS)
    limits = ["--max-model-len", str(POSITIONS), "--max-num-batched-tokens", str(POSITIONS)]
    limits += ["--max-num-seqs", "2"]
    with log_dir() as logs, contextlib.ExitStack() as stack:
        server = engine(model, role="prefill", logs=logs, stack=stack, args=limits)
        tcp = subprocess.Popen(
            [sys.executable, "-c", TCP_SERVER, str(max(PROMPT_TOKENS) * 1536 + (1 << 20))],
            stdout=subprocess.PIPE,
            text=True,
        )
        stack.callback(tcp.wait, timeout=10)
        stack.callback(tcp.kill)
        assert tcp.stdout is not None
        tcp_port = int(tcp.stdout.readline())
        wait_ready(server)
        print(f"# median of {REPEATS}; MB = 1e6 bytes; a fresh prefill before each pull")
        print(
            f"{'prompt':>7} {'KV bytes':>10} {'B/token':>8} | {'loopback TCP':>12} {'KVPuller.pull':>13} "
            f"{'pull/TCP':>8} | {'pull ms':>7} = {'encode':>6} + {'HTTP':>6} + {'decode':>6} | {'TCP ms':>6}"
        )
        ok = True
        for tokens in PROMPT_TOKENS:
            r = asyncio.run(measure(server.url, tokens=tokens, tcp_port=tcp_port))
            n = r["bytes"]
            share = r["tcp"] / r["pull"]
            ok = ok and share >= 0.5
            http_s = r["pull"] - r["encode"] - r["decode"]
            print(
                f"{tokens:>7} {n:>10,.0f} {n / tokens:>8.0f} | {n / r['tcp'] / 1e6:>7.0f} MB/s "
                f"{n / r['pull'] / 1e6:>8.0f} MB/s {share:>8.0%} | {r['pull'] * 1e3:>7.1f} = "
                f"{r['encode'] * 1e3:>6.1f} + {http_s * 1e3:>6.1f} + {r['decode'] * 1e3:>6.1f} | "
                f"{r['tcp'] * 1e3:>6.1f}"
            )
        print(f"# goal: KV hand-off >= 50% of loopback TCP: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
