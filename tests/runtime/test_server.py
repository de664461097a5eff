"""`kubemoe-runtime serve --engine torch` as real processes, driven by the official `openai` client.

Greedy answers are checked token-for-token (as text and usage counts) against TorchEngine.generate in
float32, alone and under concurrency (continuous batching), at EP=1, at EP=2 in one pod, and at EP=2
split over two "pods" (a leader and a --headless process meeting at one address and port).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.ports import free_port
from tests.runtime.serving import Server, http_get, http_post

MODEL = "tiny-qwen"
MAX_MODEL_LEN = 128
PROMPTS = [
    "The experts route tokens",
    "hello world",
    "Kubernetes pods serve a large model with many experts and",
    "one two three",
    "What is the cache?",
    "prefill then decode",
    "sparse mixture",
    "Gather the hidden states across ranks, then reduce",
]
MAX_TOKENS = [12, 7, 9, 12, 5, 10, 8, 11]


def greedy(engine: TorchEngine, prompt_ids: list[int], max_tokens: int) -> list[int]:
    [out] = engine.generate([prompt_ids], max_new_tokens=max_tokens, stop_token_ids=engine.cfg.eos_token_ids)
    return out


@pytest.fixture(scope="module")
def expected(engine: TorchEngine, tokenizer: TextTokenizer) -> list[tuple[str, int]]:
    """(text, completion tokens) of each prompt's greedy continuation, decoded alone."""
    answers = []
    for prompt, n in zip(PROMPTS, MAX_TOKENS, strict=True):
        ids = greedy(engine, tokenizer.encode(prompt), n)
        answers.append((tokenizer.decode(ids), len(ids)))
    return answers


def serve_args(*extra: str) -> list[str]:
    return ["--served-model-name", MODEL, "--role", "decode", "--max-model-len", str(MAX_MODEL_LEN), *extra]


@pytest.fixture(scope="module")
def ep1(qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(qwen, args=serve_args(), log_dir=tmp_path_factory.mktemp("ep1"), name="ep1")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def client_for(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def complete(client: openai.OpenAI, prompt: str, max_tokens: int) -> tuple[str, int]:
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
    assert response.usage is not None
    return response.choices[0].text, response.usage.completion_tokens


def complete_concurrently(client: openai.OpenAI) -> list[tuple[str, int]]:
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        return list(pool.map(lambda pm: complete(client, *pm), zip(PROMPTS, MAX_TOKENS, strict=True)))


def test_models_health_ready(ep1: Server) -> None:
    assert [m.id for m in client_for(ep1).models.list().data] == [MODEL]
    assert http_get(f"{ep1.url}/health")[0] == 200
    assert http_get(f"{ep1.url}/ready")[0] == 200


def test_completion_equals_engine_greedy(ep1: Server, expected: list[tuple[str, int]]) -> None:
    client = client_for(ep1)
    response = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS[0], temperature=0
    )
    assert (response.choices[0].text, response.usage and response.usage.completion_tokens) == expected[0]
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.object == "text_completion"
    for i in (1, 2):
        assert complete(client, PROMPTS[i], MAX_TOKENS[i]) == expected[i]


def test_streaming_completion(ep1: Server, expected: list[tuple[str, int]]) -> None:
    stream = client_for(ep1).completions.create(
        model=MODEL,
        prompt=PROMPTS[0],
        max_tokens=MAX_TOKENS[0],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    assert usage is not None
    assert (text, usage.completion_tokens) == expected[0]
    assert len(finish) == 1
    assert len(chunks) > 2  # streamed in pieces, not one blob


def test_chat_streaming_and_not(ep1: Server, engine: TorchEngine, tokenizer: TextTokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello experts"}]
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    ids = greedy(engine, prompt_ids, 10)
    client = client_for(ep1)
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello experts"}],
        max_tokens=10,
        temperature=0,
    )
    assert response.choices[0].message.content == tokenizer.decode(ids)
    assert response.choices[0].message.role == "assistant"
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == len(ids)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello experts"}],
        max_completion_tokens=10,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == tokenizer.decode(ids)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_seeded_sampling_through_the_server(ep1: Server) -> None:
    client = client_for(ep1)

    def sample(seed: int) -> str:
        r = client.completions.create(
            model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=1.3, top_p=0.95, seed=seed
        )
        return r.choices[0].text

    assert sample(5) == sample(5)
    assert {sample(5), sample(6), sample(7)} != {sample(5)}


def test_stop_string_through_the_server(ep1: Server, expected: list[tuple[str, int]]) -> None:
    full = expected[0][0]
    stop = full[4:7]
    response = client_for(ep1).completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS[0], temperature=0, stop=[stop]
    )
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].text == full[: full.index(stop)]


def test_concurrent_requests_each_get_their_answer_alone(
    ep1: Server, expected: list[tuple[str, int]]
) -> None:
    client = client_for(ep1)
    start = time.monotonic()
    answers = complete_concurrently(client)
    elapsed = time.monotonic() - start
    tokens = sum(n for _, n in answers)
    print(
        f"EP=1: {len(PROMPTS)} concurrent requests, {tokens} tokens in {elapsed:.2f}s "
        f"= {tokens / elapsed:.0f} tok/s"
    )
    assert answers == expected


def finished_count(server: Server, reason: str) -> float:
    text = http_get(f"{server.url}/metrics")[1]
    lines = [line for line in text.splitlines() if line.startswith("kubemoe_requests_finished_total")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if f'finish_reason="{reason}"' in line)


def test_a_client_that_goes_away_frees_its_slot(ep1: Server) -> None:
    aborted = finished_count(ep1, "abort")
    stream = client_for(ep1).completions.create(
        model=MODEL,
        prompt=PROMPTS[0],
        max_tokens=120,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 30
    while finished_count(ep1, "abort") == aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert finished_count(ep1, "abort") == aborted + 1


def test_errors_in_openai_shape(ep1: Server) -> None:
    client = client_for(ep1)
    with pytest.raises(openai.BadRequestError) as long_prompt:
        client.completions.create(model=MODEL, prompt=[7] * MAX_MODEL_LEN, max_tokens=1)
    assert long_prompt.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as no_room:
        client.completions.create(model=MODEL, prompt=[7] * 100, max_tokens=MAX_MODEL_LEN)
    assert no_room.value.code == "context_length_exceeded"
    bad: list[dict[str, object]] = [
        {"temperature": -0.5},
        {"max_tokens": 0},
        {"n": 2},
        {"top_p": 0},
        {"stop": [""]},
        {"prompt": [7, 100000]},
        {"prompt": ["one", "two"]},
        {"logprobs": 2},
    ]
    for fields in bad:
        status, body = http_post(f"{ep1.url}/v1/completions", {"model": MODEL, "prompt": "hi", **fields})
        assert status == 400, fields
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["param"] in (*fields, None)
    with pytest.raises(openai.BadRequestError) as bad_temperature:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=-1
        )
    assert bad_temperature.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
    assert unknown.value.code == "model_not_found"
    status, body = http_post(f"{ep1.url}/v1/chat/completions", {"model": MODEL, "messages": []})
    assert (status, body["error"]["param"]) == (400, "messages")
    status, body = http_post(f"{ep1.url}/v1/completions", "not an object")
    assert status == 400
    assert http_get(f"{ep1.url}/v1/nothing-here")[0] == 404


def test_metrics_carry_serving_series_and_labels(ep1: Server) -> None:
    complete(client_for(ep1), PROMPTS[3], 4)
    status, text = http_get(f"{ep1.url}/metrics")
    assert status == 200
    labels = 'deployment="tiny",group="3",rank="0",role="decode"'
    for series in (
        "kubemoe_requests_waiting",
        "kubemoe_requests_running",
        "kubemoe_kv_cache_usage_ratio",
        "kubemoe_time_to_first_token_seconds_count",
        "kubemoe_inter_token_latency_seconds_count",
        "kubemoe_generation_tokens_total",
    ):
        assert f"{series}{{{labels}}}" in text, series
    values = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kubemoe_") and labels in line
    }
    assert values["kubemoe_generation_tokens_total"] >= 4
    assert values["kubemoe_time_to_first_token_seconds_count"] >= 1
    # vLLM's names carry the served model's name, as vLLM labels them (so vLLM dashboards match it)
    vllm = [line for line in text.splitlines() if line.startswith("vllm:generation_tokens_total{")]
    assert vllm, "no vllm:generation_tokens_total"
    assert all(f'model_name="{MODEL}"' in line for line in vllm), vllm


@pytest.mark.slow
def test_ep2_in_one_pod_answers_as_ep1(qwen: Path, expected: list[tuple[str, int]], tmp_path: Path) -> None:
    args = serve_args("--data-parallel-size", "2", "--enable-expert-parallel")
    server = Server(qwen, args=args, log_dir=tmp_path, name="ep2")
    try:
        server.wait_ready()
        client = client_for(server)
        start = time.monotonic()
        answers = complete_concurrently(client)  # spread over both ranks
        elapsed = time.monotonic() - start
        tokens = sum(n for _, n in answers)
        print(f"EP=2: {len(PROMPTS)} concurrent requests, {tokens} tokens in {elapsed:.2f}s")
        assert answers == expected
        assert complete(client, PROMPTS[0], MAX_TOKENS[0]) == expected[0]
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.slow
def test_ep2_split_over_two_pods_answers_as_ep1(
    qwen: Path, expected: list[tuple[str, int]], tmp_path: Path
) -> None:
    group = ["--data-parallel-size", "2", "--data-parallel-size-local", "1", "--enable-expert-parallel"]
    group += ["--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(free_port())]
    leader = Server(
        qwen, args=serve_args(*group, "--data-parallel-start-rank", "0"), log_dir=tmp_path, name="leader"
    )
    worker: Server | None = None
    try:
        # Alone, the leader is up but not ready: its group is missing a rank.
        leader.wait_listening()
        assert http_get(f"{leader.url}/health")[0] == 200
        assert http_get(f"{leader.url}/ready")[0] == 503
        status, body = http_post(f"{leader.url}/v1/completions", {"model": MODEL, "prompt": "hi"})
        assert status == 503
        assert body["error"]["code"] == "model_loading"

        args = serve_args(*group, "--data-parallel-start-rank", "1", "--headless")
        worker = Server(qwen, args=args, log_dir=tmp_path, name="headless")
        leader.wait_ready()
        worker.wait_ready()
        assert complete_concurrently(client_for(leader)) == expected
        assert http_get(f"{worker.url}/v1/models")[0] == 404  # headless: no API
        # The leader's normal end shuts the group down: the headless pod exits cleanly by itself.
        assert leader.stop() == 0, leader.log()
        assert worker.process.wait(timeout=60) == 0, worker.log()
    finally:
        leader.stop()
        if worker is not None:
            worker.stop()
