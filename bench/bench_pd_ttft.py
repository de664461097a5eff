"""Time to first token: prefill/decode disaggregation against colocated serving, across prompt lengths.

Five processes on 127.0.0.1, all the runtime's own (`kubemoe-runtime serve`, torch engine, float32, one
OMP thread each) on the tests' tiny Qwen3-MoE with its positions raised to 4096 (loopback.py):

    P/D        router -> prefill (max_tokens=1, keeps the KV) -> router -> decode (pulls the KV over
               GET /v1/kv/{handle}, imports it, emits the prefill's first token) -> streamed to the client
    colocated  router -> worker (prefill, first token) -> streamed to the client

Every request is alone on an idle system (one at a time), a streaming completion of random token ids
(max_tokens=2, ignore_eos), so TTFT is the time from sending the request to the first SSE event;
each length is measured REPEATS times per mode after one warm-up request (the first prompt of a new
length allocates and page-faults its buffers), modes interleaved; the best of the REPEATS is reported,
as in bench_engine.py: both modes run the same prefill, and on 2 shared cores its time varies by more
than P/D's whole extra cost, so medians cross back and forth where the best times do not. The P/D column
"prefill" is the router's own timing of its prefill call (x-kubemoe-prefill-ms); the rest of P/D's TTFT
is the decode hop: KV pull, import, first event. "crossover": the shortest prompt from which P/D's TTFT
is within CROSSOVER of colocated's, if any.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final

import httpx2
from loopback import completion_body, engine, log_dir, router, tiny_checkpoint, wait_ready

POSITIONS: Final = 4096
LENGTHS: Final = (16, 64, 256, 1024, 2048, 4000)
REPEATS: Final = 5
CROSSOVER: Final = 1.10  # "competitive": P/D's TTFT at most 10% above colocated's


async def ttft(client: httpx2.AsyncClient, url: str, *, tokens: int, seed: int) -> tuple[float, float]:
    """Seconds to the first SSE event, and the router's prefill milliseconds (0 when colocated)."""
    body = completion_body(tokens=tokens, seed=seed, max_tokens=2, ignore_eos=True, stream=True)
    started = time.perf_counter()
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {(await response.aread())[:300]!r}")
        first = None
        async for chunk in response.aiter_raw():
            if first is None and b"data: {" in chunk:
                first = time.perf_counter() - started
        if first is None:
            raise RuntimeError(f"{url}: no SSE event")
        return first, float(response.headers.get("x-kubemoe-prefill-ms", 0))


async def measure(urls: dict[str, str]) -> dict[int, dict[str, float]]:
    results: dict[int, dict[str, float]] = {}
    async with httpx2.AsyncClient(timeout=120.0) as client:
        for url in urls.values():  # warm-up: connections, and each process's first forward
            await ttft(client, url, tokens=32, seed=-1)
        for tokens in LENGTHS:
            samples: dict[str, list[float]] = {"colocated": [], "pd": [], "prefill_ms": []}
            for mode in ("colocated", "pd"):  # warm-up at this length: first-touch of its buffers
                await ttft(client, urls[mode], tokens=tokens, seed=-2)
            for i in range(REPEATS):
                for mode in ("colocated", "pd") if i % 2 == 0 else ("pd", "colocated"):
                    seconds, prefill_ms = await ttft(client, urls[mode], tokens=tokens, seed=i)
                    samples[mode].append(seconds * 1e3)
                    if mode == "pd":
                        samples["prefill_ms"].append(prefill_ms)
            results[tokens] = {name: min(values) for name, values in samples.items()}
    return results


def main() -> None:
    model = tiny_checkpoint(positions=POSITIONS)
    limits = ["--max-model-len", str(POSITIONS), "--max-num-batched-tokens", str(POSITIONS)]
    limits += ["--max-num-seqs", "4"]
    with log_dir() as logs, contextlib.ExitStack() as stack:
        prefill = engine(model, role="prefill", logs=logs, stack=stack, args=limits)
        decode = engine(model, role="decode", logs=logs, stack=stack, args=limits)
        worker = engine(model, role="worker", logs=logs, stack=stack, args=limits)
        wait_ready(prefill, decode, worker)
        pd = router(
            services={"prefill": f"127.0.0.1:{prefill.port}", "decode": f"127.0.0.1:{decode.port}"},
            logs=logs,
            stack=stack,
        )
        colocated = router(services={"worker": f"127.0.0.1:{worker.port}"}, logs=logs, stack=stack)
        wait_ready(pd, colocated)
        results = asyncio.run(measure({"colocated": colocated.url, "pd": pd.url}))

    print(f"# TTFT in ms, best of {REPEATS}, one request at a time; P/D = prefill hop + decode hop")
    print(
        f"{'prompt':>7} | {'colocated':>9} | {'P/D':>7} {'prefill':>8} {'decode':>7} | "
        f"{'P/D - col':>9} {'P/D / col':>9}"
    )
    crossover = None
    for tokens, r in results.items():
        ratio = r["pd"] / r["colocated"]
        if ratio <= CROSSOVER and crossover is None:
            crossover = tokens
        elif ratio > CROSSOVER:
            crossover = None  # competitive only if it stays so for every longer prompt
        print(
            f"{tokens:>7} | {r['colocated']:>9.1f} | {r['pd']:>7.1f} {r['prefill_ms']:>8.1f} "
            f"{r['pd'] - r['prefill_ms']:>7.1f} | {r['pd'] - r['colocated']:>9.1f} {ratio:>8.2f}x"
        )
    if crossover is None:
        print(f"# crossover: none up to {LENGTHS[-1]} tokens (P/D never within {CROSSOVER - 1:.0%})")
    else:
        print(f"# crossover: from {crossover} tokens P/D's TTFT is within {CROSSOVER - 1:.0%} of colocated")


if __name__ == "__main__":
    main()
