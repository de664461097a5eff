"""Hostile request bodies against `kubemoe-runtime serve` (a real process): every out-of-range,
wrong-typed or huge value is an OpenAI-shaped 400 naming its parameter, or a valid answer; never a 500,
and never a dead engine thread (the server answers normally afterwards). Also: arbitrary JSON bodies
(hypothesis), and a client that leaves a non-streaming request has it aborted."""

from __future__ import annotations

import json
import math
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
from tests.runtime.routing import sample
from tests.runtime.serving import Server, http_get

MODEL = "tiny-qwen"
MAX_MODEL_LEN = 512  # the tiny checkpoint's positions: a long answer takes about a second


@pytest.fixture(scope="module")
def worker(qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = ["--served-model-name", MODEL, "--role", "worker", "--max-model-len", str(MAX_MODEL_LEN)]
    server = Server(qwen, args=args, log_dir=tmp_path_factory.mktemp("hostile"), name="worker")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def vocab(qwen: Path) -> int:
    return ModelConfig.load(qwen).vocab_size


def post(url: str, body: bytes, *, timeout: float = 60) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()


def complete(server: Server, fields: dict[str, Any] | bytes) -> tuple[int, dict[str, Any]]:
    """POST /v1/completions (a short greedy prompt, then `fields`); NaN and Infinity go out as such."""
    body = (
        fields
        if isinstance(fields, bytes)
        else json.dumps({"prompt": "hi", "max_tokens": 2, **fields}).encode()
    )
    status, data = post(f"{server.url}/v1/completions", body)
    return status, json.loads(data)


def assert_healthy(server: Server) -> None:
    """The engine thread lives: /health is 200 and a request is answered."""
    assert http_get(f"{server.url}/health")[0] == 200, server.log()
    status, answer = complete(server, {"temperature": 0})
    assert status == 200, answer
    assert answer["choices"][0]["finish_reason"] == "length"


def assert_openai_error(answer: dict[str, Any], *, param: str | None) -> None:
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert error["message"]


BAD: list[tuple[dict[str, Any], str | None]] = [
    ({"seed": 2**64}, "seed"),  # the engine's generator takes 64 bits; this one killed the engine thread
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": 10**4000}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_p": -math.inf}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": "5"}, "top_k"),
    ({"presence_penalty": math.nan}, "presence_penalty"),
    ({"max_tokens": 10**30}, "max_tokens"),  # more than the context: context_length_exceeded
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"n": 10**30}, "n"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop": [["nested"]]}, "stop"),
    ({"stop_token_ids": [1] * 2000}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"logprobs": 5}, "logprobs"),
    ({"logit_bias": {"1": 100}}, "logit_bias"),  # refused, never silently ignored (#20)
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": "text"}, "response_format"),
    ({"min_p": 0.5}, "min_p"),
    ({"use_beam_search": 1}, "use_beam_search"),
    ({"echo": 1}, "echo"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options"),
    ({"prompt": [2**70]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": [[1, 2], [3]]}, "prompt"),
    ({"prompt": {"text": "hi"}}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"kv_transfer_params": {"do_remote_prefill": True, "remote_host": "10.0.0.1"}}, "kv_transfer_params"),
]


@pytest.mark.parametrize(
    ("fields", "param"), BAD, ids=[next(iter(f)) + str(i) for i, (f, _) in enumerate(BAD)]
)
def test_bad_values_are_400s_naming_the_parameter(
    worker: Server, fields: dict[str, Any], param: str | None
) -> None:
    status, answer = complete(worker, fields)
    assert status == 400, answer
    assert_openai_error(answer, param=param)


def test_out_of_vocabulary_prompt_ids_are_400s(worker: Server, vocab: int) -> None:
    status, answer = complete(worker, {"prompt": [1, vocab]})
    assert status == 400
    assert_openai_error(answer, param="prompt")
    assert_healthy(worker)


def test_a_bad_seed_leaves_the_engine_alive(worker: Server) -> None:
    status, _ = complete(worker, {"seed": 18446744073709551616, "temperature": 1.0})
    assert status == 400
    assert_healthy(worker)


GOOD: list[dict[str, Any]] = [
    {"seed": 2**64 - 1, "temperature": 1.0},
    {"seed": -(2**63), "temperature": 1.0},
    {"temperature": 1e-300},  # greedy: logits / T overflowed, and the sampler stopped the engine thread
    {"temperature": 2.0, "top_p": 1e-9},
    {
        "temperature": 1.0,
        "top_p": 5e-324,
    },  # 0 in float32: the sampler dropped every token (found by hypothesis)
    {"top_k": 1, "temperature": 1.0},
    {"top_k": 10**9, "temperature": 1.0},
    {"top_k": -1},
    {"stop_token_ids": [10**12]},
    {"stop": "\u0000\ud7ff"},
    {"prompt": [[1, 2, 3]]},
    {"user": "x" * 100_000},
    {"unknown": [[[[{"deep": None}]]]]},
    {"logit_bias": {}, "response_format": {"type": "text"}, "n": 1, "best_of": 1, "echo": False},
    {"logit_bias": None, "repetition_penalty": 1, "min_p": 0.0, "skip_special_tokens": True},
    {"metadata": {"k": "v"}, "store": False, "service_tier": "auto", "priority": 3},  # change no output
]


@pytest.mark.parametrize("fields", GOOD, ids=[next(iter(f)) + str(i) for i, f in enumerate(GOOD)])
def test_extreme_but_valid_values_are_answered(worker: Server, fields: dict[str, Any]) -> None:
    status, answer = complete(worker, fields)
    assert status == 200, answer
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")


def test_malformed_bodies_are_400s(worker: Server) -> None:
    deep = b'{"prompt": "hi", "junk": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for body in (
        b"",
        b"{",
        b'{"prompt": "hi"',
        b"\xff\xfe",
        b"[]",
        b"null",
        b'"text"',
        deep,
        b'{"prompt": NaN}',
    ):
        status, answer = complete(worker, body)
        assert status == 400, body[:40]
        assert_openai_error(answer, param=None if body != b'{"prompt": NaN}' else "prompt")
    status, answer = complete(worker, {"model": "m" * 1_000_000})
    assert status == 404
    assert len(answer["error"]["message"]) < 400  # the unknown name is not echoed back whole
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
    }
    status, data = post(f"{worker.url}/v1/chat/completions", json.dumps(chat).encode())
    assert status == 400
    assert_openai_error(json.loads(data), param="messages")
    assert_healthy(worker)


def test_a_huge_prompt_is_a_400_and_the_server_stays_responsive(worker: Server) -> None:
    body = json.dumps({"prompt": "hello world " * 300_000, "max_tokens": 1}).encode()  # 3.6 MB
    status, answer = complete(worker, body)
    assert status == 400
    assert answer["error"]["code"] == "context_length_exceeded"
    assert_healthy(worker)


def test_a_client_that_leaves_a_non_streaming_request_has_it_aborted(worker: Server) -> None:
    def metric(name: str, **labels: str) -> float:
        return sample(http_get(f"{worker.url}/metrics")[1], name, **labels) or 0.0

    def wait_for(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 20
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.02)

    aborted = metric("kubemoe_requests_finished_total", finish_reason="abort")
    body = {"prompt": "hi", "max_tokens": MAX_MODEL_LEN - 8, "ignore_eos": True, "temperature": 0}
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", worker.port)) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {len(data)}\r\n\r\n"
        sock.sendall(head.encode() + data)
        wait_for(lambda: metric("kubemoe_requests_running") == 1)
    wait_for(lambda: metric("kubemoe_requests_finished_total", finish_reason="abort") > aborted)
    assert metric("kubemoe_requests_finished_total", finish_reason="abort") == aborted + 1


# --- arbitrary JSON -----------------------------------------------------------------------------------

FIELDS = [
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stream",
    "stream_options", "logprobs", "echo", "best_of", "suffix", "presence_penalty", "frequency_penalty",
    "user", "stop_token_ids", "ignore_eos", "kv_transfer_params", "logit_bias", "response_format",
    "min_p", "repetition_penalty", "use_beam_search", "guided_json", "add_special_tokens",
]  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and the infinities included
    | st.text(max_size=12)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {  # near and across each field's bounds
    "model": st.sampled_from([MODEL, "other"]),
    "temperature": st.floats(min_value=-0.5, max_value=2.5),
    "top_p": st.floats(min_value=-0.1, max_value=1.1),
    "top_k": st.integers(min_value=-2, max_value=2000),
    "seed": st.integers(min_value=0, max_value=1000) | st.integers(min_value=-(2**65), max_value=2**65),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3),
    "stream": st.booleans(),
    "stop_token_ids": st.lists(st.integers(min_value=-1, max_value=1000), max_size=3),
    "ignore_eos": st.booleans(),
}
REQUESTS = st.fixed_dictionaries(
    {
        "prompt": st.text(min_size=1, max_size=20)
        | st.lists(st.integers(min_value=-1, max_value=520), min_size=1, max_size=6),
        "max_tokens": st.integers(min_value=1, max_value=4),
    },
    optional=PLAUSIBLE,
)
BODIES = st.one_of(
    JSON,  # anything at all
    REQUESTS,  # requests near the bounds: many are answered
    st.tuples(REQUESTS, st.sampled_from(FIELDS), JSON).map(lambda r: {**r[0], r[1]: r[2]}),  # one field junk
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODIES)
def test_any_json_body_is_a_400_404_or_an_answer(worker: Server, body: Any) -> None:
    status, data = post(f"{worker.url}/v1/completions", json.dumps(body).encode())
    event(f"HTTP {status} {json.loads(data)['error']['param'] if status != 200 else ''}")
    assert status in (200, 400, 404), (status, data[:300])
    if status != 200:
        assert set(json.loads(data)["error"]) == {"message", "type", "param", "code"}


def test_healthy_after_the_arbitrary_bodies(worker: Server) -> None:
    assert_healthy(worker)
