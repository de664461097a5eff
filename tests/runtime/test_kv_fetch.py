"""GET /v1/kv/{handle} on a prefill (serve/kv/fetch.py), over HTTP to the torch engine's real API: a KV is
read once, and a HEAD, which Starlette routes to every GET handler, is refused (405) without taking it, so
the decode's GET still finds it. Before, a HEAD took the KV out of the store and answered no body: the
decode's GET then got a 404 and prefilled the prompt again."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.serve.app import ServerState, build_app
from kubemoe_runtime.engines.torch.serve.kv.handoff import KVStore, PrefilledKV, prompt_digest
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from tests.runtime.api_state import api_state
from tests.runtime.app_thread import serving


@pytest.fixture(scope="module")
def prefill(qwen: Path, tokenizer: TextTokenizer, engine: TorchEngine) -> Iterator[tuple[int, ServerState]]:
    state = api_state(engine, tokenizer, qwen)  # no engine thread: the KV is put in the store by hand
    with serving(build_app(state), lifespan="off", what="the prefill") as port:
        yield port, state


def store(state: ServerState) -> KVStore:
    assert state.scheduler is not None
    return state.scheduler.kv_store


def keep_kv(state: ServerState) -> tuple[str, int]:
    """A prefilled prompt's KV in the store, as a prefill step keeps it; its handle and wire size."""
    prompt = [5, 6, 7]
    kv = [{"k": torch.arange(24, dtype=torch.float32).reshape(3, 2, 4), "v": torch.ones(3, 2, 4)}]
    prefilled = PrefilledKV(kv=kv, first_token=9, prompt_tokens=3, prompt_sha256=prompt_digest(prompt))
    return store(state).put(prefilled), prefilled.wire()[1]


def request(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_head_leaves_the_kv_for_its_get(prefill: tuple[int, ServerState]) -> None:
    port, state = prefill
    handle, size = keep_kv(state)
    status, headers, body = request(port, "HEAD", f"/v1/kv/{handle}")
    assert status == 405
    assert headers["allow"] == "GET, DELETE"
    assert body == b""  # a HEAD answer has none
    assert len(store(state)) == 1  # still there

    status, headers, body = request(port, "GET", f"/v1/kv/{handle}")
    assert status == 200
    assert headers["content-type"] == "application/octet-stream"
    assert len(body) == size
    assert PrefilledKV.decode(body).first_token == 9
    assert len(store(state)) == 0  # read once
    assert request(port, "GET", f"/v1/kv/{handle}")[0] == 404


def test_head_of_an_unknown_handle_is_refused_too(prefill: tuple[int, ServerState]) -> None:
    port, _ = prefill
    assert request(port, "HEAD", "/v1/kv/no-such-handle")[0] == 405
    status, _, body = request(port, "GET", "/v1/kv/no-such-handle")
    assert status == 404
    assert b'"not_found_error"' in body
