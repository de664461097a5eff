"""KV hand-off throughput: a prefill's KV pulled over GET /v1/kv/{handle}, against plain loopback TCP.

One torch-engine prefill process (`serve --role prefill`, float32) on the tests' tiny Qwen3-MoE with
its positions raised to 16384 (loopback.py): 3 layers x (K, V) x 2 KV heads x 32 x 4 bytes = 1536 bytes of
KV per token, so prompts of 1000, 4000 and 16000 tokens hand off ~1.5, 6 and 25 MB. Each repetition
prefills a fresh prompt (random token ids; the router's prefill request: max_tokens=1,
kv_transfer_params {"do_remote_decode": true}) and then pulls its KV the way a decode does, timing only
the pull:

    KVPuller.pull   the decode's code path (serve/kv/pull.py): GET on a kept-alive connection -> the prefill's
                    handler (KVStore.take, PrefilledKV.wire: the tensors' memory, no copy) -> uvicorn
                    sends the pieces -> the body read into one buffer -> PrefilledKV.decode (checks,
                    then views); bytes/s = payload bytes / pull time
    loopback TCP    the same number of bytes from a plain socket server in another process: the client
                    sends 8 bytes (the length), the server sendall()s a ready buffer, the client
                    recv_into()s a buffer of its own; the reference, measured next to each pull

After each prefill the pull and the TCP transfer run one after the other, the pull first on even
repetitions and TCP first on odd ones: whichever runs first finds the processes and threads idle since
the prefill's answer (on a 2-core box that alone can cost a transfer 1 ms or more), so neither side always
pays it.

Medians over REPEATS (fewer at 16000 tokens, whose prefill takes seconds). Per row, the pull's own
stages are timed apart on the same payload: "wire" (the prefill's header and piece list) and "decode"
(the decode's checks and views); "HTTP" is the rest: the request, the prefill's handling of it, moving
the bytes through uvicorn and the socket reads on this process's event loop. Below the rows, a
least-squares line through them splits each side into a fixed cost per transfer (ms) and a per-byte rate
(GB/s), so a fixed cost that dominates small KVs and a per-byte cost that dominates large ones show
apart. The prefill's uvicorn runs on httptools and uvloop (runtime dependencies, as in the runtime
images; without them, h11 and asyncio); the first line says which.
Goal (issue 5): the pull >= 50% of loopback TCP bytes/s, judged two ways: on the per-byte rates of the
fitted lines (throughput, once a KV is large enough for it to matter) and end to end at every size (where
the small KVs show the fixed cost).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from loopback import completion_body, engine, log_dir, tiny_checkpoint, wait_ready

from kubemoe_runtime.engines.torch.serve.kv.handoff import PrefilledKV
from kubemoe_runtime.engines.torch.serve.kv.pull import KVPuller
from kubemoe_runtime.pod.kv_auth import KVSigner
from kubemoe_runtime.router.proxy import REMOTE_DECODE
from tests.runtime.serving import http_post

POSITIONS: Final = 16384
PROMPT_TOKENS: Final = (1000, 4000, 16000)
REPEATS: Final = 6  # even: as many pulls first as TCP transfers first
REPEATS_LONG: Final = 4  # at 16000 tokens (each prefill takes seconds)
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
    signer = KVSigner.from_env()  # the key loopback.py gave every process here
    assert signer is not None
    body = completion_body(
        tokens=tokens, seed=seed, max_tokens=1, kv_transfer_params=signer.sign(REMOTE_DECODE)
    )
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
    times: dict[str, list[float]] = {"pull": [], "tcp": [], "wire": [], "decode": []}
    repeats = REPEATS if tokens < 10_000 else REPEATS_LONG
    size = 0  # the payload's bytes (the same, to a few header bytes, for every prompt of this length)
    with socket.create_connection(("127.0.0.1", tcp_port)) as sock:
        for seed in range(-1, repeats):  # seed -1: warm-up, not counted
            params = prefill(url, tokens=tokens, seed=seed)
            tcp_first = seed % 2 == 1  # whichever runs first after the prefill finds the processes idle
            if tcp_first:
                tcp_s = tcp_seconds(sock, memoryview(bytearray(size)), size)
            pull_s, pulled = await pull_seconds(puller, params)
            payload = bytearray(pulled.encode())  # what the prefill sent (the same pieces, joined)
            size = len(payload)
            if not tcp_first:
                tcp_s = tcp_seconds(sock, memoryview(bytearray(size)), size)
            if seed >= 0:
                times["pull"].append(pull_s)
                times["tcp"].append(tcp_s)
                times["wire"].append(timed(pulled.wire))
                times["decode"].append(timed(lambda payload=payload: PrefilledKV.decode(payload)))  # type: ignore[misc]
    puller.close()
    result = {name: statistics.median(values) for name, values in times.items()}
    result["bytes"] = len(payload)
    return result


def line_fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


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
        http_impl = "httptools" if importlib.util.find_spec("httptools") else "h11"
        loop_impl = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
        print(
            f"# median of {REPEATS} ({REPEATS_LONG} at 16000 tokens); MB = 1e6 bytes; "
            f"uvicorn on {http_impl} and {loop_impl}"
        )
        print(
            f"{'prompt':>7} {'KV bytes':>11} | {'loopback TCP':>12} {'KVPuller.pull':>13} {'pull/TCP':>8} | "
            f"{'pull ms':>7} = {'wire':>5} + {'HTTP':>6} + {'decode':>6} | {'TCP ms':>6}"
        )
        ok = True
        rows = []
        for tokens in PROMPT_TOKENS:
            r = asyncio.run(measure(server.url, tokens=tokens, tcp_port=tcp_port))
            rows.append(r)
            n = r["bytes"]
            share = r["tcp"] / r["pull"]
            ok = ok and share >= 0.5
            http_s = r["pull"] - r["wire"] - r["decode"]
            print(
                f"{tokens:>7} {n:>11,.0f} | {n / r['tcp'] / 1e6:>7.0f} MB/s "
                f"{n / r['pull'] / 1e6:>8.0f} MB/s {share:>8.0%} | {r['pull'] * 1e3:>7.2f} = "
                f"{r['wire'] * 1e3:>5.2f} + {http_s * 1e3:>6.2f} + {r['decode'] * 1e3:>6.2f} | "
                f"{r['tcp'] * 1e3:>6.2f}"
            )
        sizes = [r["bytes"] for r in rows]
        rates = {}
        for name, label in (("tcp", "loopback TCP"), ("pull", "KVPuller.pull")):
            fixed, per_byte = line_fit(sizes, [r[name] for r in rows])
            rates[name] = 1 / per_byte
            print(f"# {label:>13}: {fixed * 1e3:5.2f} ms fixed + {rates[name] / 1e9:4.2f} GB/s")
        streaming = rates["pull"] / rates["tcp"]
        print(
            f"# goal, KV hand-off >= 50% of loopback TCP: per-byte rate {streaming:.0%} "
            f"({'met' if streaming >= 0.5 else 'NOT met'}); end to end at every size "
            f"{'met' if ok else 'NOT met: the fixed cost per pull dominates the small KVs'}"
        )


if __name__ == "__main__":
    main()
