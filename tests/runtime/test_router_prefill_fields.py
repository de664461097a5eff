"""Disaggregated, the router refuses itself the generation fields the engine refuses and the prefill never
sees, before any backend is asked.

The prefill's request has max_tokens (and max_completion_tokens) 1, stream off and no stream_options
(router/proxy.py), so a bad max_tokens ("lots", 0, -5, true, 5.0), max_completion_tokens or stream_options
was refused only by the decode, after the prefill had computed the whole prompt and parked its KV. Now the
router answers the engine's own 400 (its message and `param`: pod/protocol.py) and neither the prefill nor
the decode gets anything; what the engine takes (null for the default, an include_usage of null, chat's
max_completion_tokens on the completions endpoint, which ignores it) still goes through.

The completion's length the router signs into the prefill's kv_transfer_params (so that a torch prefill
refuses, before computing anything, a request too long for the context) is the one the engine reads:
chat's max_completion_tokens unless null, else max_tokens; on the completions endpoint, max_tokens. A null
max_completion_tokens with a max_tokens of 10**6 used to sign no length: the prefill ran the prompt and the
decode refused it. Against a real torch prefill it is now refused with nothing computed.

Real router processes (`serve --role router`, P/D); stand-in prefill and decode that record what they get
(echo_backend.py); and the torch engine's API as a prefill, on a real scheduler, in this process.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.kv_auth import DECODE_MAX_TOKENS, KV_KEY_ENV, KVSigner
from kubemoe_runtime.pod.metrics import MetricLabels, ServingMetrics
from tests.runtime.echo_backend import EchoBackend
from tests.runtime.fake_backend import raw_post
from tests.runtime.routing import RouterProcess
from tests.runtime.torch_prefill import serve_torch_prefill

MODEL = "tiny-qwen"
KEY = "prefill-fields-key-0123456789abcdef"
SIGNER = KVSigner(KEY.encode())
MESSAGES = [{"role": "user", "content": "experts route tokens across ranks"}]
CHAT = {"model": MODEL, "messages": MESSAGES}
COMPLETION = {"model": MODEL, "prompt": "experts route tokens across ranks"}


def pd_router(prefill: str, decode: str, log_dir: Path) -> RouterProcess:
    args = ["--served-model-name", MODEL, "--policy", "round-robin"]
    args += ["--prefill-service", prefill, "--decode-service", decode]
    process = RouterProcess(args=args, log_dir=log_dir, env={KV_KEY_ENV: KEY})
    try:
        process.wait_ready()
    except BaseException:
        process.stop()
        raise
    return process


@pytest.fixture(scope="module")
def prefill() -> Iterator[EchoBackend]:
    backend = EchoBackend()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def decode() -> Iterator[EchoBackend]:
    backend = EchoBackend()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def router(
    prefill: EchoBackend, decode: EchoBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RouterProcess]:
    """P/D over the two stand-ins (the prefill's echo carries no kv_transfer_params: the decode gets the
    request as the client sent it)."""
    process = pd_router(prefill.address, decode.address, tmp_path_factory.mktemp("pd"))
    yield process
    process.stop()


def error_of(answer: bytes) -> dict[str, Any]:
    error = json.loads(answer)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


LENGTH_LOW = "Input should be greater than or equal to 1"
NOT_AN_INT = "Input should be a valid integer"
NOT_A_BOOL = "Input should be a valid boolean"


@pytest.mark.parametrize(
    ("body", "refused"),
    [
        ({**COMPLETION, "max_tokens": -5}, ("max_tokens", LENGTH_LOW)),
        ({**COMPLETION, "max_tokens": 0}, ("max_tokens", LENGTH_LOW)),
        ({**COMPLETION, "max_tokens": "lots"}, ("max_tokens", NOT_AN_INT)),
        ({**COMPLETION, "max_tokens": True}, ("max_tokens", NOT_AN_INT)),
        ({**COMPLETION, "max_tokens": 5.0}, ("max_tokens", NOT_AN_INT)),
        ({**CHAT, "max_tokens": -5}, ("max_tokens", LENGTH_LOW)),
        ({**CHAT, "max_completion_tokens": 0, "max_tokens": 10}, ("max_completion_tokens", LENGTH_LOW)),
        ({**CHAT, "max_completion_tokens": "lots"}, ("max_completion_tokens", NOT_AN_INT)),
        (
            {**COMPLETION, "stream_options": {"include_usage": "yes"}},
            ("stream_options.include_usage", NOT_A_BOOL),
        ),
        (
            {**CHAT, "stream": True, "stream_options": {"include_usage": 1}},
            ("stream_options.include_usage", NOT_A_BOOL),
        ),
        ({**CHAT, "stream_options": "yes"}, ("stream_options", "Input should be an object")),
        ({**COMPLETION, "stream": 1}, ("stream", NOT_A_BOOL)),
    ],
)
def test_a_field_the_engine_refuses_is_refused_before_any_backend_is_asked(
    router: RouterProcess,
    prefill: EchoBackend,
    decode: EchoBackend,
    body: dict[str, Any],
    refused: tuple[str, str],
) -> None:
    """The engine's 400: "where: what", `param` the top-level field; no backend asked."""
    where, what = refused
    asked = len(prefill.seen), len(decode.seen)
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    status, answer = raw_post(f"{router.url}{path}", body)
    assert status == 400, answer
    error = error_of(answer)
    param = where.split(".")[0]
    assert (error["param"], error["message"], error["type"]) == (
        param,
        f"{where}: {what}",
        "invalid_request_error",
    )
    assert (len(prefill.seen), len(decode.seen)) == asked, "a backend was asked"


def signed_length(seen: bytes) -> Any:
    """The completion length the router signed into a prefill's request (None: none)."""
    params = SIGNER.verify(json.loads(seen)["kv_transfer_params"])
    return params.get(DECODE_MAX_TOKENS)


@pytest.mark.parametrize(
    ("body", "length"),
    [
        ({**CHAT, "max_completion_tokens": None, "max_tokens": 10**6}, 10**6),  # null: not given
        ({**CHAT, "max_completion_tokens": 2, "max_tokens": 10**6}, 2),
        ({**CHAT, "max_tokens": None}, None),
        ({**COMPLETION, "max_completion_tokens": "lots", "max_tokens": 3}, 3),  # not the endpoint's field
        ({**COMPLETION, "max_completion_tokens": 2, "max_tokens": 10**6}, 10**6),
        ({**COMPLETION, "stream_options": {"include_usage": None, "continuous_usage_stats": True}}, None),
        ({**CHAT, "stream_options": None, "max_tokens": 4}, 4),
    ],
)
def test_what_the_engine_takes_goes_through_with_the_length_it_reads(
    router: RouterProcess, prefill: EchoBackend, decode: EchoBackend, body: dict[str, Any], length: Any
) -> None:
    asked = len(prefill.seen), len(decode.seen)
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    status, answer = raw_post(f"{router.url}{path}", body)
    assert status == 200, answer
    assert (len(prefill.seen), len(decode.seen)) == (asked[0] + 1, asked[1] + 1)
    sent = json.loads(prefill.seen[-1].body)
    assert (sent["max_tokens"], sent["stream"], "stream_options" in sent) == (1, False, False)
    assert signed_length(prefill.seen[-1].body) == length


# --- against a real torch prefill --------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_prefill(
    qwen: Path, tokenizer: TextTokenizer, engine: TorchEngine
) -> Iterator[tuple[str, ServingMetrics]]:
    """The torch engine's API as a prefill pod runs it (EP=1, a 64-token context), with the deployment's
    key: its address and metrics."""
    with serve_torch_prefill(model_path=qwen, tokenizer=tokenizer, engine=engine, key=KEY) as (
        port,
        state,
    ):
        yield f"127.0.0.1:{port}", state.metrics


def prompt_tokens(metrics: ServingMetrics) -> float:
    value = metrics.registry.get_sample_value(
        "kubemoe_prompt_tokens_total", MetricLabels(role="prefill").as_dict()
    )
    assert value is not None
    return value


def test_a_null_max_completion_tokens_leaves_max_tokens_to_the_prefills_check(
    torch_prefill: tuple[str, ServingMetrics], decode: EchoBackend, tmp_path: Path
) -> None:
    address, metrics = torch_prefill
    router = pd_router(address, decode.address, tmp_path)
    try:
        asked, computed = len(decode.seen), prompt_tokens(metrics)
        body = {**CHAT, "max_completion_tokens": None, "max_tokens": 10**6}
        status, answer = raw_post(f"{router.url}/v1/chat/completions", body)
        assert status == 400, answer
        error = error_of(answer)
        assert (error["param"], error["code"]) == ("max_tokens", "context_length_exceeded")
        assert prompt_tokens(metrics) == computed, "the prefill computed the prompt"
        assert len(decode.seen) == asked, "the decode was asked"
        status, answer = raw_post(f"{router.url}/v1/chat/completions", {**body, "max_tokens": 2})
        assert status == 200, answer  # the same request, within the context: prefilled, then decoded
        assert prompt_tokens(metrics) > computed
        assert len(decode.seen) == asked + 1
    finally:
        router.stop()
