"""The router as a real process in front of real `serve` processes, driven by the official openai client.

Disaggregated: prefill (EP=1) and decode (EP=2, two rank processes), vLLM's P/D proxy protocol. Sixteen
concurrent requests, streaming and not, return exactly the greedy tokens of the colocated engine
(TorchEngine.generate, float32), and the decode computes no prompt token (its prompt-token counter stays
0 while its pulled-token counter counts every prompt). Colocated: two workers behind one router, API keys,
OpenAI-shaped 4xx answers, and a worker killed under load: no request lost, the worker ejected within 5 s.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.kv_auth import KV_KEY_ENV
from tests import openai_calls
from tests.runtime.routing import RouterProcess, sample
from tests.runtime.serving import Server, http_get

MODEL = "tiny-qwen"
MAX_MODEL_LEN = 128
WORDS = [
    "experts",
    "route",
    "tokens",
    "across",
    "ranks",
    "while",
    "the",
    "cache",
    "holds",
    "every",
    "layer",
    "state",
    "for",
    "decode",
]
PROMPTS = [" ".join(WORDS[i % 7 : i % 7 + 3 + i % 5]) + f" {i}" for i in range(16)]
MAX_TOKENS = [4 + (i * 5) % 9 for i in range(16)]
KV_PRODUCER = '{"kv_connector":"ExampleConnector","kv_role":"kv_producer"}'
KV_CONSUMER = '{"kv_connector":"ExampleConnector","kv_role":"kv_consumer"}'
KV_KEY = {KV_KEY_ENV: "test-kv-key-0123456789abcdef"}  # the router signs the hand-off, the servers check it


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


@pytest.fixture(scope="module")
def expected(engine: TorchEngine, tokenizer: TextTokenizer) -> dict[str, list[tuple[str, int]]]:
    """The colocated engine's greedy answers (text, tokens): completions and chat, each prompt alone."""
    answers: dict[str, list[tuple[str, int]]] = {"completion": [], "chat": []}
    for prompt, n in zip(PROMPTS, MAX_TOKENS, strict=True):
        chat_ids = tokenizer.encode(tokenizer.apply_chat_template(messages(prompt)), add_special_tokens=False)
        for kind, ids in (("completion", tokenizer.encode(prompt)), ("chat", chat_ids)):
            [out] = engine.generate([ids], max_new_tokens=n, stop_token_ids=engine.cfg.eos_token_ids)
            answers[kind].append((tokenizer.decode(out), len(out)))
    return answers


def serve_args(role: str, *extra: str) -> list[str]:
    return ["--served-model-name", MODEL, "--role", role, "--max-model-len", str(MAX_MODEL_LEN), *extra]


class PD:
    def __init__(self, prefill: Server, decode: Server, router: RouterProcess) -> None:
        self.prefill, self.decode, self.router = prefill, decode, router


@pytest.fixture(scope="module")
def pd(qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PD]:
    logs = tmp_path_factory.mktemp("pd")
    prefill = Server(
        qwen,
        args=serve_args("prefill", "--kv-transfer-config", KV_PRODUCER),
        log_dir=logs,
        name="p",
        env=KV_KEY,
    )
    decode = Server(
        qwen,
        args=serve_args(
            "decode",
            "--data-parallel-size",
            "2",
            "--enable-expert-parallel",
            "--kv-transfer-config",
            KV_CONSUMER,
        ),
        log_dir=logs,
        name="d",
        env=KV_KEY,
    )
    router = RouterProcess(
        args=[
            "--served-model-name",
            MODEL,
            "--policy",
            "round-robin",
            "--prefill-service",
            f"127.0.0.1:{prefill.port}",
            "--decode-service",
            f"127.0.0.1:{decode.port}",
        ],
        log_dir=logs,
        env=KV_KEY,
    )
    try:
        prefill.wait_ready()
        decode.wait_ready()
        router.wait_ready()
        yield PD(prefill, decode, router)
    finally:
        router.stop()
        prefill.stop()
        decode.stop()


def client(url: str, *, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120)


def complete(c: openai.OpenAI, i: int) -> tuple[str, int]:
    return openai_calls.complete(c, model=MODEL, prompt=PROMPTS[i], max_tokens=MAX_TOKENS[i])[:2]


def chat_stream(c: openai.OpenAI, i: int) -> tuple[str, int]:
    return openai_calls.chat_stream(c, model=MODEL, prompt=PROMPTS[i], max_tokens=MAX_TOKENS[i])[:2]


def concurrently(fn: object, c: openai.OpenAI, n: int = len(PROMPTS)) -> list[tuple[str, int]]:
    assert callable(fn)
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(lambda i: fn(c, i), range(n)))


def decode_counter(server: Server, name: str) -> float:
    value = sample(http_get(f"{server.url}/metrics")[1], name)
    assert value is not None, name
    return value


def test_pd_matches_colocated_concurrently_streaming_and_not(
    pd: PD, expected: dict[str, list[tuple[str, int]]]
) -> None:
    c = client(pd.router.url)
    # Counted from here: other tests of this module share the router.
    requests_before = pd.router.metric(
        "kubemoe_router_requests_total", endpoint="/v1/completions", code="200"
    )
    ttft_before = pd.router.metric("kubemoe_router_time_to_first_token_seconds_count") or 0
    start = time.monotonic()
    assert concurrently(complete, c) == expected["completion"]
    middle = time.monotonic()
    assert concurrently(chat_stream, c) == expected["chat"]
    print(
        f"P/D through the router: 16 concurrent completions {middle - start:.2f}s, "
        f"16 concurrent streaming chats {time.monotonic() - middle:.2f}s"
    )
    # The no-recompute proof: the decode ran no prompt token, yet continued every prompt.
    assert decode_counter(pd.decode, "kubemoe_prompt_tokens_total") == 0
    assert decode_counter(pd.decode, "kubemoe_kv_pull_failures_total") == 0
    pulled = decode_counter(pd.decode, "kubemoe_kv_pulled_tokens_total")
    assert pulled == decode_counter(pd.prefill, "kubemoe_prompt_tokens_total") > 0
    # The router saw it all.
    requests = pd.router.metric("kubemoe_router_requests_total", endpoint="/v1/completions", code="200")
    assert (requests or 0) - (requests_before or 0) == 16
    assert (pd.router.metric("kubemoe_router_time_to_first_token_seconds_count") or 0) - ttft_before >= 16
    assert (pd.router.metric("kubemoe_router_inter_token_latency_seconds_count") or 0) > 0
    assert pd.router.metric("kubemoe_router_requests_in_flight") == 0


def test_pd_timing_headers(pd: PD) -> None:
    raw = client(pd.router.url).completions.with_raw_response.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=3, temperature=0
    )
    assert float(raw.headers["x-kubemoe-prefill-ms"]) > 0
    assert float(raw.headers["x-kubemoe-decode-ms"]) > 0
    assert raw.headers["x-kubemoe-decode-backend"] == f"127.0.0.1:{pd.decode.port}"


def test_a_request_the_decode_would_refuse_is_refused_before_the_prefill_runs(pd: PD) -> None:
    # the prefill is asked for one token, so it took a request whose max_tokens the decode refuses:
    # the whole prompt was computed and its KV parked for nothing. The router now hands the client's
    # max_tokens to the prefill (signed), which refuses up front as the decode would.
    prompt_before = decode_counter(pd.prefill, "kubemoe_prompt_tokens_total")
    c = client(pd.router.url)
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=10**12)
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "max_tokens")
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPTS[2]}],
            max_completion_tokens=MAX_MODEL_LEN,
        )
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "max_tokens")
    assert decode_counter(pd.prefill, "kubemoe_prompt_tokens_total") == prompt_before  # nothing ran
    ok = client(pd.router.url).completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=2, temperature=0)
    assert ok.usage is not None
    assert ok.usage.completion_tokens <= 2
    assert decode_counter(pd.prefill, "kubemoe_prompt_tokens_total") > prompt_before


def test_short_prompts_skip_the_hand_off_when_asked(
    pd: PD, tmp_path: Path, expected: dict[str, list[tuple[str, int]]]
) -> None:
    """--pd-min-prompt-tokens: a prompt estimated shorter goes to the decode alone, which prefills it
    itself; a longer one takes the hand-off. Same answers either way. (Run after the P/D test above,
    which counts the decode's prompt tokens from zero.)"""
    router = RouterProcess(
        args=[
            "--served-model-name",
            MODEL,
            "--prefill-service",
            f"127.0.0.1:{pd.prefill.port}",
            "--decode-service",
            f"127.0.0.1:{pd.decode.port}",
            "--pd-min-prompt-tokens",
            "64",
        ],
        log_dir=tmp_path,
        env=KV_KEY,
    )
    try:
        router.wait_ready()
        c = client(router.url)
        prefilled = decode_counter(pd.prefill, "kubemoe_prompt_tokens_total")
        on_decode = decode_counter(pd.decode, "kubemoe_prompt_tokens_total")
        raw = c.completions.with_raw_response.create(
            model=MODEL, prompt=PROMPTS[1], max_tokens=MAX_TOKENS[1], temperature=0
        )
        answer = raw.parse()
        assert answer.usage is not None
        assert (answer.choices[0].text, answer.usage.completion_tokens) == expected["completion"][1]
        assert raw.headers["x-kubemoe-path"] == "decode_only"
        assert "x-kubemoe-prefill-ms" not in raw.headers
        assert decode_counter(pd.prefill, "kubemoe_prompt_tokens_total") == prefilled
        assert decode_counter(pd.decode, "kubemoe_prompt_tokens_total") > on_decode, "the decode prefilled"
        long_ids = list(range(10, 90))  # 80 token ids: counted exactly, above the threshold
        raw = c.completions.with_raw_response.create(
            model=MODEL, prompt=long_ids, max_tokens=2, temperature=0
        )
        assert raw.headers["x-kubemoe-path"] == "prefill_decode"
        assert decode_counter(pd.prefill, "kubemoe_prompt_tokens_total") == prefilled + 80
        assert router.metric("kubemoe_router_pd_path_total", path="decode_only") == 1
        assert router.metric("kubemoe_router_pd_path_total", path="prefill_decode") == 1
    finally:
        router.stop()


def raw_post(
    url: str, body: bytes, *, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as err:
        return int(err.code), json.loads(err.read())


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"model": "tiny-qwen"}', 400, "messages"),
        (b'{"messages": [], "model": "tiny-qwen"}', 400, "messages"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', 400, "stream"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}', 404, "model"),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}',
            400,
            "temperature",
        ),  # engine's
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "messages"),  # engine's
    ],
)
def test_malformed_requests_get_openai_errors(pd: PD, body: bytes, status: int, param: str | None) -> None:
    code, answer = raw_post(f"{pd.router.url}/v1/chat/completions", body)
    assert code == status
    error = answer["error"]
    assert isinstance(error, dict)
    assert error["message"]
    assert error["type"] in ("invalid_request_error", "not_found_error")
    assert error["param"] == param


def test_other_paths_go_to_a_decode_and_models_say_its_max_model_len(pd: PD) -> None:
    """Disaggregated, a forwarded path (here vLLM's /v1/embeddings, which the torch engine does not serve)
    goes to a decode, which holds the whole model: its own OpenAI-shaped 404 comes back. /v1/models says
    the decode's max_model_len."""
    c = client(pd.router.url)
    prefilled = decode_counter(pd.prefill, "kubemoe_prompt_tokens_total")
    with pytest.raises(openai.NotFoundError) as err:
        c.embeddings.create(model=MODEL, input="experts")
    assert err.value.response.headers["x-kubemoe-decode-backend"] == f"127.0.0.1:{pd.decode.port}"
    assert "x-kubemoe-prefill-backend" not in err.value.response.headers
    assert err.value.type == "not_found_error"
    assert decode_counter(pd.prefill, "kubemoe_prompt_tokens_total") == prefilled
    [card] = c.models.list().data
    assert card.model_dump()["max_model_len"] == MAX_MODEL_LEN


# --- colocated ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workers(qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    logs = tmp_path_factory.mktemp("workers")
    servers = [Server(qwen, args=serve_args("worker"), log_dir=logs, name=f"w{i}") for i in range(2)]
    try:
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


def colocated_router(workers: list[Server], logs: Path, *extra: str) -> RouterProcess:
    service = ",".join(f"127.0.0.1:{w.port}" for w in workers)
    return RouterProcess(
        args=["--served-model-name", MODEL, "--policy", "least-load", "--worker-service", service, *extra],
        log_dir=logs,
    )


def test_colocated_api_keys(
    workers: list[Server], tmp_path: Path, expected: dict[str, list[tuple[str, int]]]
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# one key per line\nsecret-one\n\nsecret-two\n")
    router = colocated_router(workers, tmp_path, "--api-key-file", str(keys))
    try:
        router.wait_ready()
        assert complete(client(router.url, api_key="secret-two"), 1) == expected["completion"][1]
        with pytest.raises(openai.AuthenticationError):
            complete(client(router.url, api_key="wrong"), 1)
        keys.write_text("rotated\n")  # a Secret update: read again, old keys gone
        time.sleep(0.05)
        with pytest.raises(openai.AuthenticationError):
            complete(client(router.url, api_key="secret-two"), 1)
        assert complete(client(router.url, api_key="rotated"), 1) == expected["completion"][1]
        assert http_get(f"{router.url}/health")[0] == 200  # probes need no key
    finally:
        router.stop()


def test_killed_worker_loses_no_request_and_is_ejected(
    workers: list[Server], tmp_path: Path, expected: dict[str, list[tuple[str, int]]]
) -> None:
    router = colocated_router(workers, tmp_path, "--health-interval", "1")
    victim = workers[1]
    try:
        router.wait_ready()
        c = client(router.url)
        results: list[tuple[str, int]] = []
        killed_at: list[float] = []

        def kill_soon() -> None:
            time.sleep(0.5)
            os.killpg(victim.process.pid, signal.SIGKILL)
            killed_at.append(time.monotonic())

        killer = threading.Thread(target=kill_soon)
        killer.start()
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda i: complete(c, i % 16), range(32)))
        killer.join()
        assert results == [expected["completion"][i % 16] for i in range(32)]
        backend = f"127.0.0.1:{victim.port}"
        while router.metric("kubemoe_router_backend_healthy", role="worker", backend=backend) != 0:
            assert time.monotonic() - killed_at[0] < 5, "not ejected within 5 s"
            time.sleep(0.1)
        print(f"ejected {time.monotonic() - killed_at[0]:.2f}s after the kill")
    finally:
        router.stop()
