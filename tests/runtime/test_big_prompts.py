"""Huge text prompts against the torch engine's API (serve/prompt_limits.py, tokenizer.py): a request body
holds up to 8 MB of text, whose tokenization takes seconds of CPU.

- Tokenizing releases the GIL, so while a 7 MB prompt is tokenized the server goes on answering /health
  and serving completions. Before, `Tokenizer.encode` held the GIL throughout: the worker thread it ran on
  froze the event loop and the engine thread alike (a 100-token stream stalled 22 s, /health took 24 s).
- A prompt that provably cannot fit the context (the tokenizer bounds the characters per token) is refused
  at once, without being tokenized; the context is checked before the ids are scanned one by one.
- Long prompts are tokenized one at a time, and past a bound of characters waiting a request gets 503
  rather than queueing minutes of CPU.

The API is the real one on the tiny engine, served by uvicorn in this process (so a test can swap the
tokenizer for one whose normalizer may remove text, Strip: no bound applies to it, and a huge prompt must
then be tokenized and counted, as for such a checkpoint)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.serve.app import ServerState, build_app
from kubemoe_runtime.engines.torch.serve.prompt_limits import INLINE_TOKENIZE_CHARS, PromptLimits
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.api_error import ApiError
from tests.runtime.api_state import MODEL, api_state, engine_thread
from tests.runtime.app_thread import serving
from tests.runtime.serving import http_post

MAX_MODEL_LEN = 64
HUGE = "word " * (7_000_000 // 5)  # 7 MB: seconds of BPE
PROMPT_WAIT_S = 2.0  # what a probe may take while a huge prompt is tokenized (it takes milliseconds)


def unbounded(tokenizer: TextTokenizer) -> TextTokenizer:
    """The checkpoint's tokenizer with a Strip normalizer: it may remove any amount of text, so no bound
    on characters per token applies, and every prompt is tokenized."""
    spec = json.loads(tokenizer.tokenizer.to_str())
    spec["normalizer"] = {"type": "Strip", "strip_left": True, "strip_right": True}
    stripping = TextTokenizer(Tokenizer.from_str(json.dumps(spec)), chat_template=None, special={})
    assert stripping.max_chars_per_token is None
    return stripping


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return http_post(url, body, timeout=120)


def context_error(status: int, answer: dict[str, Any], *, param: str) -> str:
    assert status == 400, answer
    error = answer["error"]
    assert error["code"] == "context_length_exceeded", error
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in error["message"]
    return str(error["message"])


# --- the tokenizer and the limits, alone ------------------------------------------------------------


def test_encoding_a_long_text_lets_other_threads_run(tokenizer: TextTokenizer) -> None:
    text = "word " * 400_000
    assert tokenizer.encode(text[:20_000]) == tokenizer.tokenizer.encode(text[:20_000]).ids
    ticks: list[float] = []
    done = threading.Event()

    def tick() -> None:
        while not done.is_set():
            time.sleep(0.005)
            ticks.append(time.monotonic())

    ticker = threading.Thread(target=tick)
    ticker.start()
    began = time.monotonic()
    ids = tokenizer.encode(text)
    ended = time.monotonic()
    done.set()
    ticker.join()
    during = [t for t in ticks if began < t < ended]
    assert len(ids) >= 400_000
    # Before, the encode held the GIL: the ticker ran once or twice in seconds.
    assert len(during) >= 20, f"{len(during)} ticks in {ended - began:.1f} s of encoding"


async def test_long_prompts_are_tokenized_one_at_a_time_and_their_queue_is_bounded(
    tokenizer: TextTokenizer,
) -> None:
    stripping = unbounded(tokenizer)
    text = "word " * (INLINE_TOKENIZE_CHARS // 2)  # over the inline limit: tokenized on a worker thread
    limits = PromptLimits(
        stripping, max_model_len=10**9, vocab_size=10**9, max_tokenizing_chars=int(2.5 * len(text))
    )
    running, most = 0, 0
    lock = threading.Lock()
    encode = stripping.encode

    def counting(text: str, *, add_special_tokens: bool = True) -> list[int]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            time.sleep(0.2)  # long enough for the others to be waiting meanwhile
            return encode(text, add_special_tokens=add_special_tokens)
        finally:
            with lock:
                running -= 1

    stripping.encode = counting  # type: ignore[method-assign]
    results = await asyncio.gather(
        *(limits.encode(text, param="prompt") for _ in range(3)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, ApiError)]
    assert len(refused) == 1  # the third: 3 texts waiting would be over the bound
    assert refused[0].status == 503
    assert refused[0].body()["error"]["code"] == "queue_full"
    assert [len(r) for r in results if isinstance(r, list)] == [len(encode(text))] * 2
    assert most == 1
    assert limits.tokenizing_chars == 0
    assert await limits.encode(text, param="prompt") == encode(text)  # the queue empties


# --- over HTTP ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bounded_api(
    qwen: Path, tokenizer: TextTokenizer, engine: TorchEngine
) -> Iterator[tuple[str, ServerState]]:
    """The API with the checkpoint's tokenizer (byte-level BPE: at most 13 characters a token). No engine
    thread: every request here is refused before it reaches the scheduler."""
    state = api_state(engine, tokenizer, qwen, max_model_len=MAX_MODEL_LEN)
    with serving(build_app(state), lifespan="off", what="the API") as port:
        yield f"http://127.0.0.1:{port}", state


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(
    bounded_api: tuple[str, ServerState], tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = bounded_api
    per_token = tokenizer.max_chars_per_token
    assert per_token is not None
    encoded: list[int] = []
    encode = tokenizer.encode

    def spy(text: str, *, add_special_tokens: bool = True) -> list[int]:
        encoded.append(len(text))
        return encode(text, add_special_tokens=add_special_tokens)

    monkeypatch.setattr(tokenizer, "encode", spy)
    status, answer = post(f"{url}/v1/completions", {"model": MODEL, "prompt": HUGE, "max_tokens": 1})
    message = context_error(status, answer, param="prompt")
    assert f"is {len(HUGE)} characters long, at least {len(HUGE) // per_token} tokens" in message
    chat = {"model": MODEL, "messages": [{"role": "user", "content": HUGE}]}
    context_error(*post(f"{url}/v1/chat/completions", chat), param="messages")
    assert encoded == []  # neither was tokenized

    # Just under the bound: tokenized and counted (13 characters a token cannot be had with these words).
    fits = "word " * (per_token * MAX_MODEL_LEN // 5 - 1)
    status, answer = post(f"{url}/v1/completions", {"model": MODEL, "prompt": fits, "max_tokens": 1})
    assert "tokens. However, your prompt has" in context_error(status, answer, param="prompt")
    assert encoded == [len(fits)]


def test_the_context_is_checked_before_each_id(bounded_api: tuple[str, ServerState]) -> None:
    url, state = bounded_api
    outside = [state.vocab_size + 1] * MAX_MODEL_LEN  # too long, and no id in the vocabulary
    status, answer = post(f"{url}/v1/completions", {"model": MODEL, "prompt": outside, "max_tokens": 1})
    assert "your prompt has 64 tokens" in context_error(status, answer, param="prompt")
    status, answer = post(f"{url}/v1/completions", {"model": MODEL, "prompt": outside[:3], "max_tokens": 1})
    assert status == 400
    assert answer["error"]["message"] == f"prompt token ids must be in [0, {state.vocab_size})"


def test_the_server_answers_while_a_huge_prompt_is_tokenized(
    qwen: Path, tokenizer: TextTokenizer, engine: TorchEngine
) -> None:
    state = api_state(engine, unbounded(tokenizer), qwen, max_model_len=MAX_MODEL_LEN)
    with engine_thread(state), serving(build_app(state), lifespan="off", what="the API") as port:
        url = f"http://127.0.0.1:{port}"
        huge: list[tuple[int, dict[str, Any]]] = []
        sender = threading.Thread(
            target=lambda: huge.append(
                post(f"{url}/v1/completions", {"model": MODEL, "prompt": HUGE, "max_tokens": 1})
            )
        )
        began = time.monotonic()
        sender.start()
        probes: list[float] = []
        while sender.is_alive():
            start = time.monotonic()
            with urllib.request.urlopen(f"{url}/health", timeout=120) as response:
                assert response.status == 200
            small = {"model": MODEL, "prompt": "hello experts", "max_tokens": 2, "temperature": 0}
            status, answer = post(f"{url}/v1/completions", small)
            assert status == 200, answer
            probes.append(time.monotonic() - start)
            time.sleep(0.1)
        took = time.monotonic() - began
        [(status, answer)] = huge
        # Tokenized (no bound applies), then refused by its count.
        assert "your prompt has" in context_error(status, answer, param="prompt")
        worst = max(probes)
        assert worst < PROMPT_WAIT_S, f"a probe took {worst:.1f} s (the huge prompt took {took:.1f} s)"
        assert len(probes) >= 3, f"{len(probes)} probes while the huge prompt took {took:.1f} s"
        print(
            f"huge prompt: {took:.1f} s; {len(probes)} probes of /health + a completion, worst {worst:.2f} s"
        )
