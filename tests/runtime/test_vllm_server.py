"""`kubemoe-runtime serve --engine vllm` running the real vLLM CPU build, driven by the `openai` client.

One server for the module (vLLM takes 30-90 s to start here): --enforce-eager, 1 GiB of KV cache, one
OpenMP thread. The checkpoint is a tiny random Qwen3-MoE in float32 (head_dim 32: vLLM's CPU attention
rejects 16) whose vocabulary is exactly the tokenizer's, so every sampled id decodes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.tools.checkpoints import write_tiny_checkpoint
from tests.engine_python import VLLM
from tests.runtime.serving import Server, http_get, http_post

MODEL = "tiny-qwen-vllm"
MAX_TOKENS = 16
PROMPTS = [
    "The experts route tokens",
    "hello world",
    "Kubernetes pods serve a large model with many experts and",
    "What is the cache?",
]

pytestmark = pytest.mark.slow


def vllm_env() -> dict[str, str]:
    return {
        "KUBEMOE_VLLM_PYTHON": VLLM.python(),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def qwen32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_tiny_checkpoint(
        tmp_path_factory.mktemp("vllm") / "qwen", arch="qwen3_moe", dtype=torch.float32
    )
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == TextTokenizer.load(path).vocab_size
    assert config["head_dim"] == 32
    return path


class Started:
    """The shared server and what /ready said before vLLM was up."""

    def __init__(self, server: Server, first_ready_status: int) -> None:
        self.server = server
        self.first_ready_status = first_ready_status


@pytest.fixture(scope="module")
def vllm_server(qwen32: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Started]:
    env = vllm_env()
    args = ["--engine", "vllm", "--served-model-name", MODEL, "--role", "decode"]
    args += ["--max-model-len", "256", "--enforce-eager"]
    server = Server(qwen32, args=args, log_dir=tmp_path_factory.mktemp("vllm-log"), name="vllm", env=env)
    try:
        server.wait_listening(timeout=120)
        first = http_get(f"{server.url}/ready")[0]
        server.wait_ready(timeout=400)
        yield Started(server, first)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(vllm_server: Started) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{vllm_server.server.url}/v1", api_key="unused", max_retries=0)


def test_probes_and_models(vllm_server: Started, client: openai.OpenAI) -> None:
    assert vllm_server.first_ready_status == 503  # the front answers before vLLM has loaded
    assert http_get(f"{vllm_server.server.url}/health")[0] == 200
    assert http_get(f"{vllm_server.server.url}/ready") == (200, "ready")
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_and_chat_with_the_openai_client(vllm_server: Started, client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL, prompt="hello world", max_tokens=8, temperature=0)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 8
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the cache?"}],
        max_tokens=6,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    # Errors pass through the front in OpenAI's shape.
    status, body = http_post(f"{vllm_server.server.url}/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404
    assert "error" in body


def test_torch_greedy_tokens_equal_vllm(qwen32: Path, client: openai.OpenAI) -> None:
    """Both float32, greedy, 16 tokens, EOS ignored: the same ids from the same prompt ids."""
    tokenizer = TextTokenizer.load(qwen32)
    engine = TorchEngine.load(qwen32, dtype=torch.float32)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        [ours] = engine.generate([ids], max_new_tokens=MAX_TOKENS)
        response = client.completions.create(
            model=MODEL,
            prompt=ids,
            max_tokens=MAX_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        theirs = response.choices[0].model_dump()["token_ids"]
        assert theirs == ours, f"{prompt!r}: vLLM {theirs} != torch {ours}"


def _sample(text: str, name: str) -> float:
    match = re.search(
        rf'^{name}\{{deployment="tiny",group="3",rank="0",role="decode"\}} (\S+)$', text, re.MULTILINE
    )
    assert match, f"{name} with the pod's labels not in /metrics"
    return float(match.group(1))


def test_metrics_pass_vllm_through_and_add_kubemoe_series(
    vllm_server: Started, client: openai.OpenAI
) -> None:
    client.completions.create(model=MODEL, prompt="one two three", max_tokens=4, temperature=0)
    status, text = http_get(f"{vllm_server.server.url}/metrics")
    assert status == 200
    assert re.search(r"^vllm:num_requests_waiting\{", text, re.MULTILINE)  # vLLM's own, unchanged
    assert _sample(text, "kubemoe_requests_waiting") == 0
    assert _sample(text, "kubemoe_requests_running") == 0
    assert 0 <= _sample(text, "kubemoe_kv_cache_usage_ratio") <= 1
    assert _sample(text, "kubemoe_time_to_first_token_seconds_count") >= 1
    assert _sample(text, "kubemoe_inter_token_latency_seconds_count") >= 3
    assert _sample(text, "kubemoe_generation_tokens_total") >= 4
    assert "# TYPE kubemoe_time_to_first_token_seconds histogram" in text
    assert 'kubemoe_inter_token_latency_seconds_bucket{deployment="tiny",group="3",le="+Inf"' in text


def test_sigterm_drains_then_stops_vllm_and_the_pod_exits_zero(
    vllm_server: Started, client: openai.OpenAI
) -> None:
    """Last in the module: the pod's normal end. The front drains first (a stream in flight finishes,
    a new request is a 503 the router retries elsewhere), then vLLM and its engine processes go."""
    server = vllm_server.server
    stream = client.completions.create(
        model=MODEL,
        prompt=PROMPTS[0],
        max_tokens=200,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    first = next(chunks)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the signal handler runs on the front's main thread
    status, body = http_post(
        f"{server.url}/v1/completions", {"model": MODEL, "prompt": "new", "max_tokens": 2}
    )
    assert status == 503, body
    assert body["error"]["code"] == "draining"
    assert http_get(f"{server.url}/ready")[0] == 503
    rest = list(chunks)
    usage = next(c.usage for c in reversed([first, *rest]) if c.usage is not None)
    assert usage.completion_tokens == 200, "the stream in flight at SIGTERM finished"
    assert server.process.wait(timeout=90) == 0, server.log()[-4000:]
    deadline = time.monotonic() + 30
    while _group_alive(server.process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_alive(server.process.pid), "vLLM processes outlived the pod"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_pod_exits_when_vllm_fails(qwen32: Path, tmp_path: Path) -> None:
    """vLLM refuses a context longer than the model's (512): it exits, and so does the pod, non-zero."""
    args = ["--engine", "vllm", "--served-model-name", MODEL, "--max-model-len", "100000", "--enforce-eager"]
    server = Server(qwen32, args=args, log_dir=tmp_path, name="bad", env=vllm_env())
    try:
        code = server.process.wait(timeout=300)
    finally:
        server.stop()
    assert code not in (0, None), server.log()[-4000:]
    assert "max_model_len" in server.log() or "max-model-len" in server.log()
