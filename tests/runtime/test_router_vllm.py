"""The router in front of a real vLLM pod (`serve --engine vllm`, the vLLM CPU build), driven by the official
openai client (#20): vLLM's own paths are forwarded and answered as vLLM answers them directly
(`/tokenize`, `/detokenize`, `/version`, `/v1/embeddings`), `/v1/models` says vLLM's max_model_len, and an
option vLLM implements but the torch engine does not (`logit_bias`) reaches vLLM unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.tools.checkpoints import write_tiny_checkpoint
from tests.engine_python import VLLM
from tests.runtime.routing import RouterProcess
from tests.runtime.serving import Server, http_get, http_post

MODEL = "tiny-qwen-vllm"
MAX_MODEL_LEN = 256

pytestmark = pytest.mark.slow


class Stack:
    def __init__(self, vllm: Server, router: RouterProcess, model: Path) -> None:
        self.vllm, self.router, self.model = vllm, router, model


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {
        "KUBEMOE_VLLM_PYTHON": VLLM.python(),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    logs = tmp_path_factory.mktemp("router-vllm")
    model = write_tiny_checkpoint(logs / "qwen", arch="qwen3_moe", dtype=torch.float32)
    args = ["--engine", "vllm", "--served-model-name", MODEL, "--role", "worker"]
    args += ["--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager"]
    vllm = Server(model, args=args, log_dir=logs, name="vllm", env=env)
    router = RouterProcess(
        args=["--served-model-name", MODEL, "--worker-service", f"127.0.0.1:{vllm.port}"], log_dir=logs
    )
    try:
        vllm.wait_ready(timeout=400)
        router.wait_ready()
        yield Stack(vllm, router, model)
    finally:
        router.stop()
        vllm.stop()


def client(url: str, *, root: bool = False) -> openai.OpenAI:
    return openai.OpenAI(base_url=url if root else f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_vllms_engine_paths_through_the_router(stack: Stack) -> None:
    root = client(stack.router.url, root=True)
    tokenized: Any = root.post("/tokenize", body={"model": MODEL, "prompt": "hello world"}, cast_to=object)
    assert tokenized["tokens"] == TextTokenizer.load(stack.model).encode("hello world")
    assert tokenized["max_model_len"] == MAX_MODEL_LEN
    detokenized: Any = root.post(
        "/detokenize", body={"model": MODEL, "tokens": tokenized["tokens"]}, cast_to=object
    )
    assert detokenized["prompt"] == "hello world"
    version: Any = root.get("/version", cast_to=object)
    assert version == json.loads(http_get(f"{stack.vllm.url}/version")[1])
    assert version["version"]


def test_models_say_vllms_max_model_len(stack: Stack) -> None:
    [card] = client(stack.router.url).models.list().data
    [theirs] = json.loads(http_get(f"{stack.vllm.url}/v1/models")[1])["data"]
    assert card.id == MODEL
    assert card.model_dump()["max_model_len"] == theirs["max_model_len"] == MAX_MODEL_LEN


def test_embeddings_get_vllms_own_answer(stack: Stack) -> None:
    """A generation model: vLLM refuses embeddings its own way, and that answer comes back as is."""
    body = {"model": MODEL, "input": "experts"}
    status, direct = http_post(f"{stack.vllm.url}/v1/embeddings", body)
    assert status >= 400
    with pytest.raises(openai.APIStatusError) as err:
        client(stack.router.url).embeddings.create(model=MODEL, input="experts")
    assert err.value.status_code == status
    assert err.value.response.json() == direct
    assert err.value.response.headers["x-kubemoe-worker-backend"] == f"127.0.0.1:{stack.vllm.port}"


def test_an_option_vllm_implements_passes_through(stack: Stack) -> None:
    """logit_bias (a 400 from the torch engine) reaches vLLM: +100 on one token makes it the answer."""
    favourite = 42
    tokenizer = TextTokenizer.load(stack.model)
    answer = client(stack.router.url).completions.create(
        model=MODEL,
        prompt="hello world",
        max_tokens=3,
        temperature=0,
        logit_bias={str(favourite): 100},
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert answer.choices[0].model_dump()["token_ids"] == [favourite] * 3
    assert answer.choices[0].text == tokenizer.decode([favourite] * 3)
