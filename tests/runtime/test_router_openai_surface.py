"""The router's whole OpenAI surface, driven by the official openai client (#20).

In front of a real torch-engine worker (a `serve` process) behind a real router process with API keys:
`/v1/models` says the backend's own max_model_len; every option the torch engine does not implement is a
400 naming it and the fix, a harmless value of one passes; vLLM's paths (`/v1/embeddings`, `/tokenize`,
`/detokenize`, `/version`) are forwarded and answered by the backend's own 404; the operator's and the pods'
own paths (`/v1/experts/*`, `/v1/kv/*`, `/metrics`, `/health*`) never reach it; the API key guards every
forwarded path.

In front of a stand-in that echoes what it gets (echo_backend.py): method, path, query, body and headers
arrive as sent (the router's key not among them), the backend's status and headers come back, an SSE answer
is relayed as it comes, an answer cut mid-body is never a whole-looking one, a body past 8 MiB is a 413.
(The same paths against a real vLLM: test_router_vllm.py.)
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from starlette.testclient import TestClient

from kubemoe_runtime.router.app import build_router_app
from kubemoe_runtime.router.main import RouterSettings, build
from tests.runtime.echo_backend import EchoBackend
from tests.runtime.routing import RouterProcess
from tests.runtime.serving import Server, http_get

MODEL = "tiny-qwen"
MAX_MODEL_LEN = 192  # not the checkpoint's 512 positions: the router must ask, not guess
KEY = "surface-key"
MESSAGES: list[Any] = [{"role": "user", "content": "experts route tokens"}]


@pytest.fixture(scope="module")
def worker(qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = ["--served-model-name", MODEL, "--role", "worker", "--max-model-len", str(MAX_MODEL_LEN)]
    server = Server(qwen, args=args, log_dir=tmp_path_factory.mktemp("surface"), name="worker")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def router(worker: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    logs = tmp_path_factory.mktemp("surface-router")
    keys = logs / "keys"
    keys.write_text(f"{KEY}\n")
    router = RouterProcess(
        args=[
            "--served-model-name",
            MODEL,
            "--worker-service",
            f"127.0.0.1:{worker.port}",
            "--api-key-file",
            str(keys),
        ],
        log_dir=logs,
    )
    try:
        router.wait_ready()
        yield router
    finally:
        router.stop()


def client(url: str, *, api_key: str = KEY, root: bool = False) -> openai.OpenAI:
    """The openai client on the router's /v1 (or, `root`, on / for vLLM's engine paths)."""
    base = url if root else f"{url}/v1"
    return openai.OpenAI(base_url=base, api_key=api_key, max_retries=0, timeout=60)


# --- /v1/models --------------------------------------------------------------------------------------


def test_models_say_the_backends_max_model_len(router: RouterProcess, worker: Server) -> None:
    c = client(router.url)
    [card] = c.models.list().data
    backend = json.loads(http_get(f"{worker.url}/v1/models")[1])["data"][0]
    assert card.id == MODEL
    assert card.model_dump()["max_model_len"] == backend["max_model_len"] == MAX_MODEL_LEN
    assert c.models.retrieve(MODEL).model_dump()["max_model_len"] == MAX_MODEL_LEN
    with pytest.raises(openai.NotFoundError) as err:
        c.models.retrieve("gpt-4")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        client(router.url, api_key="wrong").models.list()


def test_models_say_null_until_a_backend_has_answered() -> None:
    settings = RouterSettings(
        served_model_names=(MODEL,),
        host="127.0.0.1",
        port=0,
        policy="round-robin",
        services={"worker": ("127.0.0.1:9",)},  # nothing listens there
        refresh_interval=60,
        health_interval=60,
        max_attempts=1,
    )
    with TestClient(build_router_app(build(settings, environ={}))) as http:
        answer = http.get("/v1/models")
        assert answer.status_code == 200
        assert answer.json()["data"][0]["max_model_len"] is None  # unknown, not a made-up 0


# --- what the torch engine does not implement ----------------------------------------------------------

COMPLETION_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"logprobs": 2}, "logprobs"),
    ({"echo": True}, "echo"),
    ({"best_of": 2}, "best_of"),
    ({"suffix": " end"}, "suffix"),
    ({"n": 2}, "n"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -0.5}, "frequency_penalty"),
    ({"extra_body": {"response_format": {"type": "json_object"}}}, "response_format"),
    ({"extra_body": {"guided_regex": "[a-z]+"}}, "guided_regex"),
    ({"extra_body": {"min_p": 0.1}}, "min_p"),
    ({"extra_body": {"repetition_penalty": 1.2}}, "repetition_penalty"),
    ({"extra_body": {"use_beam_search": True}}, "use_beam_search"),
    ({"extra_body": {"add_special_tokens": False}}, "add_special_tokens"),
]
TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
CHAT_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
        "response_format",
    ),
    ({"logit_bias": {"5": -100}}, "logit_bias"),
    ({"tools": [TOOL]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [TOOL["function"]]}, "functions"),
    ({"function_call": {"name": "weather"}}, "function_call"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"n": 3}, "n"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}, "chat_template_kwargs"),
    ({"extra_body": {"guided_json": {"type": "object"}}}, "guided_json"),
    ({"extra_body": {"continue_final_message": True}}, "continue_final_message"),
    (
        {"messages": [*MESSAGES, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]}]},
        "messages",  # an earlier tool call, which the chat template would drop
    ),
]


def _refused(err: openai.BadRequestError, field: str) -> None:
    assert err.param == field
    assert err.type == "invalid_request_error"
    assert isinstance(err.body, dict)
    message = err.body["message"]
    assert message.startswith(f"{field}"), message
    assert "not supported by the torch engine" in message
    assert "engine.kind: vllm" in message  # the fix


@pytest.mark.parametrize(("fields", "field"), COMPLETION_REFUSED, ids=[f for _, f in COMPLETION_REFUSED])
def test_completion_options_the_engine_lacks_are_400s_naming_them(
    router: RouterProcess, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(router.url).completions.create(model=MODEL, prompt="hello", max_tokens=2, **fields)
    _refused(err.value, field)


@pytest.mark.parametrize(
    ("fields", "field"), CHAT_REFUSED, ids=[f"{f}{i}" for i, (_, f) in enumerate(CHAT_REFUSED)]
)
def test_chat_options_the_engine_lacks_are_400s_naming_them(
    router: RouterProcess, fields: dict[str, Any], field: str
) -> None:
    body = {"messages": MESSAGES, **fields}
    with pytest.raises(openai.BadRequestError) as err:
        client(router.url).chat.completions.create(model=MODEL, max_tokens=2, **body)
    _refused(err.value, field)


def test_harmless_values_of_those_options_change_nothing(router: RouterProcess) -> None:
    c = client(router.url)
    plain = c.completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0)
    same = c.completions.create(
        model=MODEL,
        prompt="hello",
        max_tokens=4,
        temperature=0,
        n=1,
        best_of=1,
        echo=False,
        logit_bias={},
        presence_penalty=0,
        extra_body={"response_format": {"type": "text"}, "repetition_penalty": 1.0, "min_p": 0},
    )
    assert same.choices[0].text == plain.choices[0].text
    chat = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
    chat_same = c.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        response_format={"type": "text"},
        tool_choice="none",
        logprobs=False,
        n=1,
        extra_body={"chat_template_kwargs": {}, "add_generation_prompt": True},
    )
    assert chat_same.choices[0].message.content == chat.choices[0].message.content


@pytest.mark.parametrize("via", ["router", "worker"])
def test_null_is_the_default(router: RouterProcess, worker: Server, via: str) -> None:
    """`null` for an option is its default, as OpenAI and vLLM read it: the same answer as leaving it out,
    from the engine and through the router (which reads `stream` itself)."""
    url = router.url if via == "router" else worker.url
    nulls = {
        "stream": None,
        "ignore_eos": None,
        "n": None,
        "presence_penalty": None,
        "frequency_penalty": None,
    }
    with httpx2.Client(base_url=f"{url}/v1", headers={"authorization": f"Bearer {KEY}"}, timeout=60) as http:
        plain = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0}
        expected = http.post("/completions", json=plain)
        assert expected.status_code == 200, expected.text
        for name, value in [*nulls.items(), ("echo", None), ("stream_options", {"include_usage": None})]:
            got = http.post("/completions", json={**plain, name: value})
            assert got.status_code == 200, (name, got.text)
            assert got.json()["choices"][0]["text"] == expected.json()["choices"][0]["text"]
        plain = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
        expected = http.post("/chat/completions", json=plain)
        assert expected.status_code == 200, expected.text
        got = http.post("/chat/completions", json={**plain, **nulls, "logprobs": None})
        assert got.status_code == 200, got.text
        assert got.json()["choices"][0]["message"] == expected.json()["choices"][0]["message"]


# --- forwarded paths -----------------------------------------------------------------------------------


def _from_backend(err: openai.APIStatusError, worker: Server) -> None:
    """The error is the backend's own answer, passed through (the router names the backend it used)."""
    assert err.response.headers["x-kubemoe-worker-backend"] == f"127.0.0.1:{worker.port}"


def test_vllm_paths_are_forwarded_and_answered_by_the_backend(router: RouterProcess, worker: Server) -> None:
    """The torch engine serves none of vLLM's other paths: its own 404 comes back through the router."""
    latency_before = router.metric("kubemoe_router_request_latency_seconds_count")
    with pytest.raises(openai.NotFoundError) as err:
        client(router.url).embeddings.create(model=MODEL, input="experts")
    _from_backend(err.value, worker)
    assert err.value.type == "not_found_error"
    root = client(router.url, root=True)
    with pytest.raises(openai.NotFoundError) as err:
        root.post("/tokenize", body={"model": MODEL, "prompt": "experts"}, cast_to=object)
    _from_backend(err.value, worker)
    with pytest.raises(openai.NotFoundError) as err:
        root.post("/detokenize", body={"model": MODEL, "tokens": [1, 2]}, cast_to=object)
    _from_backend(err.value, worker)
    with pytest.raises(openai.NotFoundError) as err:
        root.get("/version", cast_to=object)
    _from_backend(err.value, worker)
    assert router.metric("kubemoe_router_requests_total", endpoint="/tokenize", code="404") == 1
    assert router.metric("kubemoe_router_requests_total", endpoint="/v1/*", code="404") == 1
    assert router.metric("kubemoe_router_requests_in_flight") == 0
    # The request latency histogram is the completions': forwarded requests stay out of it.
    assert router.metric("kubemoe_router_request_latency_seconds_count") == latency_before


def test_forwarded_paths_need_the_api_key(router: RouterProcess) -> None:
    wrong = client(router.url, api_key="wrong")
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.embeddings.create(model=MODEL, input="experts")
    assert "x-kubemoe-worker-backend" not in err.value.response.headers
    with pytest.raises(openai.AuthenticationError):
        client(router.url, api_key="wrong", root=True).get("/version", cast_to=object)


def test_the_operators_and_the_pods_own_paths_are_not_forwarded(
    router: RouterProcess, worker: Server
) -> None:
    assert http_get(f"{worker.url}/v1/experts/load")[0] == 200  # the backend serves it, to the operator
    c = client(router.url)
    calls: list[Callable[[], object]] = [
        lambda: c.get("/experts/load", cast_to=object),
        lambda: c.post("/experts/placement", body={"generation": 1}, cast_to=object),
        lambda: c.get("/kv/some-handle", cast_to=object),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert "x-kubemoe-worker-backend" not in err.value.response.headers
        assert "not served through the router" in str(err.value.body)
    status, text = http_get(f"{router.url}/metrics")  # the router's own series, not the backend's
    assert status == 200
    assert "kubemoe_router_requests_total" in text
    assert "kubemoe_requests_running" not in text
    assert http_get(f"{router.url}/health/live")[0] == 404


# --- forwarding, in detail, against a stand-in that echoes ---------------------------------------------


@pytest.fixture(scope="module")
def echo_router(echo: EchoBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    router = RouterProcess(
        args=["--served-model-name", MODEL, "--worker-service", echo.address],
        log_dir=tmp_path_factory.mktemp("echo-router"),
    )
    try:
        router.wait_ready()
        yield router
    finally:
        router.stop()


def test_method_path_query_body_and_headers_arrive_as_sent(
    echo_router: RouterProcess, echo: EchoBackend
) -> None:
    c = client(echo_router.url)
    options: Any = {"params": {"a": "1", "b": "x y"}, "headers": {"x-custom": "kept"}}
    answers: dict[str, Any] = {
        "GET": c.get("/files/f%2F1", cast_to=object, options=options),
        "POST": c.post("/embeddings", body={"input": "é"}, cast_to=object, options=options),
        "PUT": c.put("/things/1", body={"v": 1}, cast_to=object, options=options),
        "PATCH": c.patch("/things/1", body={"v": 2}, cast_to=object, options=options),
        "DELETE": c.delete("/things/1", cast_to=object, options=options),
    }
    for method, answer in answers.items():
        assert isinstance(answer, dict)
        assert answer["method"] == method
        assert answer["target"].endswith("?a=1&b=x+y")
        headers = answer["headers"]
        assert headers["x-custom"] == "kept"
        assert headers["x-request-id"]
        assert "authorization" not in headers  # the router's key stays with the router
    assert answers["GET"]["target"].startswith("/v1/files/f%2F1?")  # the path as sent, not decoded
    assert json.loads(answers["POST"]["body"].encode("latin-1")) == {"input": "é"}
    assert answers["DELETE"]["body"] == ""
    response = c.get("/anything", cast_to=httpx2.Response)
    assert response.headers["x-echo"] == "yes"  # the backend's headers come back
    assert response.headers["x-kubemoe-worker-backend"] == echo.address
    root = client(echo_router.url, root=True)
    for path in ("/tokenize", "/detokenize", "/version"):
        answer = root.post(path, body={"prompt": "x"}, cast_to=object)
        assert isinstance(answer, dict)
        assert answer["target"] == path


def test_the_backends_status_comes_back(echo_router: RouterProcess, echo: EchoBackend) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        client(echo_router.url).get("/anything", cast_to=object, options={"params": {"status": "418"}})
    assert err.value.status_code == 418
    assert err.value.response.headers["x-kubemoe-worker-backend"] == echo.address


def test_a_streamed_answer_is_relayed_as_it_comes(echo_router: RouterProcess) -> None:
    c = client(echo_router.url)
    start = time.monotonic()
    stream = c.post(
        "/stream",
        body={"stream": True},
        cast_to=object,
        options={"params": {"n": "4"}},
        stream=True,
        stream_cls=openai.Stream[object],
    )
    arrivals = [(tick["i"], time.monotonic() - start) for tick in stream if isinstance(tick, dict)]
    assert [i for i, _ in arrivals] == [0, 1, 2, 3]
    # The backend sends one event every 0.4 s: the first arrives long before the last was sent.
    assert arrivals[-1][1] - arrivals[0][1] > 0.8, arrivals


def test_an_answer_cut_mid_body_is_no_whole_answer(echo_router: RouterProcess) -> None:
    with pytest.raises(openai.APIConnectionError):
        client(echo_router.url).get("/cut", cast_to=object)
    assert "Traceback" not in echo_router.log()
    echo_router.wait_ready()  # the backend was ejected; its next probe re-admits it


def test_a_body_past_8_mib_is_a_413(echo_router: RouterProcess, echo: EchoBackend) -> None:
    seen = len(echo.seen)
    with pytest.raises(openai.APIStatusError) as err:
        client(echo_router.url).post("/embeddings", body={"input": "x" * (9 << 20)}, cast_to=object)
    assert err.value.status_code == 413
    assert len(echo.seen) == seen


def _raw(url: str, method: str, target: str) -> tuple[int, dict[str, str]]:
    """A request whose target goes out exactly as written (no client normalises it)."""
    host, _, port = url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, target)
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


@pytest.mark.parametrize(
    "target",
    [
        "/v1/experts/load",
        "/v1/experts/placement",
        "/v1/experts",
        "/v1/kv/handle",
        "/v1/%65xperts/load",  # what the backend decodes to /v1/experts/load
        "/v1//experts/load",
        "/v1/x/../experts/load",
        "/v1/./kv/handle",
        "/metrics/extra",
        "/health/live",
        "/ready/x",
    ],
)
def test_no_spelling_of_a_private_path_reaches_the_backend(
    echo_router: RouterProcess, echo: EchoBackend, target: str
) -> None:
    seen = len(echo.seen)
    for method in ("GET", "POST"):
        status, headers = _raw(echo_router.url, method, target)
        assert status == 404, (method, target)
        assert "x-kubemoe-worker-backend" not in headers
    assert len(echo.seen) == seen


def test_head_is_refused(echo_router: RouterProcess, echo: EchoBackend) -> None:
    seen = len(echo.seen)
    assert _raw(echo_router.url, "HEAD", "/v1/anything")[0] == 405
    assert len(echo.seen) == seen
