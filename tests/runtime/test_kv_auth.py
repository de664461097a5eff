"""The KV hand-off, authenticated and bounded: servers act only on kv_transfer_params the router signed
(pod/kv_auth.py); the host, port and handle are checked before any socket is opened; the answer's size is
capped by what the prompt's KV can take (serve/kv/layout.py), and its time by one deadline; a pulled KV that
does not fit the model (first token, shapes, dtype) fails the pull, never the engine thread; and the
router drops kv_transfer_params a client sends, colocated included."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel
from kubemoe_runtime.engines.torch.serve.group import GroupLeader, RankRunner
from kubemoe_runtime.engines.torch.serve.kv.handoff import KV, PrefilledKV, prompt_digest
from kubemoe_runtime.engines.torch.serve.kv.layout import KVLayout
from kubemoe_runtime.engines.torch.serve.kv.pull import KVPuller, KVPullError, pull_target
from kubemoe_runtime.engines.torch.serve.scheduler import (
    GenerationRequest,
    Output,
    Scheduler,
    SchedulerLimits,
)
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.kv_auth import KV_KEY_ENV, SIGNATURE_FIELD, KVAuthError, KVSigner
from kubemoe_runtime.router.main import build, parse_args
from tests.runtime.kv_peer import KVPeer
from tests.runtime.routing import RouterProcess, sample
from tests.runtime.serving import Server, http_get, http_post

KEY = "kv-test-key-0123456789abcdef"
SIGNER = KVSigner(KEY.encode())
PROMPT = [5, 17, 42, 99]


def pull_params(port: int, handle: str = "h1", host: str = "127.0.0.1") -> dict[str, Any]:
    return {
        "do_remote_prefill": True,
        "remote_engine_id": "kubemoe-torch",
        "remote_handle": handle,
        "remote_host": host,
        "remote_port": port,
    }


@pytest.fixture
def peer() -> Iterator[KVPeer]:
    server = KVPeer()
    yield server
    server.close()


# --- signatures -------------------------------------------------------------------------------------


def test_signed_params_verify_and_anything_else_is_refused() -> None:
    params = pull_params(8000)
    signed = SIGNER.sign(params)
    assert SIGNER.verify(signed) == params
    assert SIGNER.verify(SIGNER.sign(signed)) == params  # signing again replaces the signature
    refused = [
        params,  # unsigned
        {**signed, "remote_port": 8001},  # changed
        {**signed, "remote_host": "169.254.169.254"},
        {**signed, "extra": 1},  # added
        {k: v for k, v in signed.items() if k != "remote_handle"},  # dropped
        {**signed, SIGNATURE_FIELD: 7},
        KVSigner(b"another-deployment-key").sign(params),
        {**signed, "remote_port": float("nan")},
        {**signed, SIGNATURE_FIELD: "\ud800"},  # a lone surrogate (JSON's "\\ud800"): no UTF-8 at all
        {**signed, SIGNATURE_FIELD: signed[SIGNATURE_FIELD][:-1] + "\u00e9"},  # not hex
        {**signed, "nested": _nested(5000)},  # deeper than the canonical JSON can be written
    ]
    for bad in refused:
        with pytest.raises(KVAuthError):
            SIGNER.verify(bad)


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def test_the_key_comes_from_the_environment() -> None:
    assert KVSigner.from_env({}) is None
    assert KVSigner.from_env({KV_KEY_ENV: ""}) is None
    signer = KVSigner.from_env({KV_KEY_ENV: KEY})
    assert signer is not None
    assert SIGNER.verify(signer.sign({"a": 1})) == {"a": 1}
    with pytest.raises(ValueError, match=f"{KV_KEY_ENV} has 5 bytes"):
        KVSigner.from_env({KV_KEY_ENV: "short"})


def test_a_disaggregated_router_needs_the_key() -> None:
    settings, _ = parse_args(["--role", "router", "--prefill-service", "p:1", "--decode-service", "d:1"])
    with pytest.raises(ValueError, match=KV_KEY_ENV):
        build(settings, environ={})


# --- where to pull from: checked before any socket --------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "handle"),
    [
        ("10.0.0.7", 8000, "AbC-_9"),
        ("[fd00::1]", 1, "h"),
        ("fd00::1", 65535, "h"),
        ("p-0.svc.local.", 80, "h"),
    ],
)
def test_well_formed_targets(host: str, port: int, handle: str) -> None:
    target = pull_target(pull_params(port, handle=handle, host=host))
    assert (target.port, target.handle) == (port, handle)
    assert target.url.endswith(f":{port}/v1/kv/{handle}")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("remote_handle", "h HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /x"),
        ("remote_handle", "../../admin"),
        ("remote_handle", "h?x=1"),
        ("remote_handle", "h" * 129),
        ("remote_handle", ""),
        ("remote_handle", 7),
        ("remote_host", "evil.example\r\nHost: x"),
        ("remote_host", "a b"),
        ("remote_host", "user@10.0.0.1"),
        ("remote_host", "10.0.0.1:22"),
        ("remote_host", "-leading-dash"),
        ("remote_host", "fe80::1%eth0"),
        ("remote_host", ""),
        ("remote_host", ["10.0.0.1"]),
        ("remote_port", 0),
        ("remote_port", 65536),
        ("remote_port", "8000"),
        ("remote_port", True),
        ("remote_port", 8000.0),
    ],
)
def test_malformed_targets_are_refused_before_any_connection(peer: KVPeer, field: str, value: object) -> None:
    params = {**pull_params(peer.port), field: value}
    with pytest.raises(ValueError, match=field):
        pull_target(params)
    with pytest.raises(KVPullError, match=f"kv_transfer_params: {field}"):
        asyncio.run(KVPuller(timeout_s=2).pull(params))
    assert peer.connections == 0


# --- bounded reads ------------------------------------------------------------------------------------


def cache_kv(engine: TorchEngine, tokens: int) -> KV:
    """A KV of the model's exact layout (zeros), as a prefill of `tokens` positions exports it."""
    return engine.model.new_cache(slots=1, max_len=tokens + 1, dtype=engine.dtype).export_slot(
        0, length=tokens
    )


def layout_of(engine: TorchEngine) -> KVLayout:
    return RankRunner(engine, slots=1, max_len=8).kv_layout()


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_the_size_cap_fits_a_real_hand_off(checkpoints: dict[str, Path], arch: str) -> None:
    engine = TorchEngine.load(checkpoints[arch], dtype=torch.float32)
    layout = layout_of(engine)
    for tokens in (1, 100):
        wire = PrefilledKV(
            cache_kv(engine, tokens), first_token=1, prompt_tokens=tokens, prompt_sha256="x" * 64
        )
        size = len(wire.encode())
        assert size <= layout.max_wire_bytes(tokens) < size + 64 * 1024


def test_a_content_length_above_the_cap_is_refused_before_allocating(peer: KVPeer) -> None:
    peer.routes["/v1/kv/h1"] = (200, 1 << 34, b"", True)  # 16 GiB announced, nothing sent
    with pytest.raises(KVPullError, match=r"Content-Length 17179869184 is above 123456"):
        asyncio.run(KVPuller().pull(pull_params(peer.port), max_bytes=123456))


def test_a_dripping_prefill_is_cut_off_at_the_deadline() -> None:
    """One byte every 50 ms: each read makes progress, but the whole GET must end within its deadline."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
            while not stop.is_set():
                try:
                    conn.sendall(b"x")
                except OSError:
                    return
                time.sleep(0.05)

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    start = time.monotonic()
    try:
        with pytest.raises(KVPullError, match=r"not complete in 0\.5 s"):
            asyncio.run(KVPuller(timeout_s=0.5).pull(pull_params(port)))
        assert time.monotonic() - start < 2
    finally:
        stop.set()
        listener.close()
        thread.join(5)


# --- a pulled KV that does not fit the model --------------------------------------------------------


def misfits(engine: TorchEngine, vocab: int) -> dict[str, PrefilledKV]:
    n, digest = len(PROMPT), prompt_digest(PROMPT)
    kv = cache_kv(engine, n)

    def with_kv(changed: KV, first_token: Any = 7) -> PrefilledKV:
        return PrefilledKV(kv=changed, first_token=first_token, prompt_tokens=n, prompt_sha256=digest)

    name = next(iter(kv[0]))
    wide = [{**layer, name: torch.zeros(*layer[name].shape[:-1], layer[name].shape[-1] + 1)} for layer in kv]
    return {
        "first token out of the vocabulary": with_kv(kv, first_token=vocab),
        "negative first token": with_kv(kv, first_token=-1),
        "first token not an int": with_kv(kv, first_token="7"),
        "a layer short": with_kv(kv[:-1]),
        "a field too wide": with_kv(wide),
        "another dtype": with_kv([{k: t.bfloat16() for k, t in layer.items()} for layer in kv]),
        "a field missing": with_kv([dict(list(layer.items())[1:]) for layer in kv]),
    }


def test_a_misfit_pulled_kv_is_refused_and_the_engine_runs_on(
    engine: TorchEngine, tokenizer: TextTokenizer
) -> None:
    scheduler = Scheduler(
        GroupLeader(RankRunner(engine, slots=2, max_len=64), ep=ExpertParallel()),
        tokenizer=tokenizer,
        limits=SchedulerLimits(max_model_len=64, max_num_seqs=2),
        eos_token_ids=(),
    )
    for problem, pulled in misfits(engine, engine.cfg.vocab_size).items():
        with pytest.raises(ValueError):  # noqa: PT011  (each says what differs)
            scheduler.submit(
                GenerationRequest(prompt_ids=PROMPT, max_tokens=3, pulled=pulled), lambda _: None
            )
        assert not scheduler.has_work(), problem
    outputs: list[Output] = []
    scheduler.submit(GenerationRequest(prompt_ids=PROMPT, max_tokens=3), outputs.append)
    while scheduler.has_work():
        scheduler.step()
    assert outputs[-1].finish_reason == "length"


# --- a decode server with the key -------------------------------------------------------------------


@pytest.fixture(scope="module")
def decode(qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = ["--served-model-name", "m", "--role", "decode", "--max-model-len", "64"]
    server = Server(
        qwen, args=args, log_dir=tmp_path_factory.mktemp("decode"), name="d", env={KV_KEY_ENV: KEY}
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def counter(server: Server, name: str) -> float:
    return sample(http_get(f"{server.url}/metrics")[1], name) or 0.0


def complete(url: str, params: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0}
    if params is not None:
        body["kv_transfer_params"] = params
    return http_post(f"{url}/v1/completions", body)


def test_the_decode_pulls_with_signed_params(decode: Server, engine: TorchEngine, peer: KVPeer) -> None:
    wire = PrefilledKV(cache_kv(engine, len(PROMPT)), 7, len(PROMPT), prompt_digest(PROMPT)).encode()
    peer.routes["/v1/kv/h1"] = (200, None, wire, False)
    pulled = counter(decode, "kubemoe_kv_pulled_tokens_total")
    status, answer = complete(decode.url, SIGNER.sign(pull_params(peer.port)))
    assert status == 200, answer
    assert counter(decode, "kubemoe_kv_pulled_tokens_total") == pulled + len(PROMPT)
    assert peer.connections == 1


@pytest.mark.parametrize("kind", ["unsigned", "forged", "tampered"])
def test_unsigned_or_forged_params_are_400s_and_nothing_is_fetched(
    decode: Server, peer: KVPeer, kind: str
) -> None:
    params = {
        "unsigned": pull_params(peer.port),
        "forged": KVSigner(b"another-deployment-key").sign(pull_params(peer.port)),
        "tampered": {**SIGNER.sign(pull_params(1)), "remote_port": peer.port},
    }[kind]
    status, answer = complete(decode.url, params)
    assert status == 400, answer
    assert answer["error"]["param"] == "kv_transfer_params"
    assert answer["error"]["type"] == "invalid_request_error"
    assert peer.connections == 0


@pytest.mark.parametrize(
    "problem", ["first token out of the vocabulary", "a field too wide", "another dtype"]
)
def test_a_misfit_payload_fails_the_pull_not_the_engine(
    decode: Server, engine: TorchEngine, peer: KVPeer, problem: str
) -> None:
    misfit = misfits(engine, engine.cfg.vocab_size)[problem]
    peer.routes["/v1/kv/h1"] = (200, None, misfit.encode(), False)
    failures = counter(decode, "kubemoe_kv_pull_failures_total")
    status, answer = complete(decode.url, SIGNER.sign(pull_params(peer.port)))
    assert status == 200, answer  # prefilled here instead
    assert counter(decode, "kubemoe_kv_pull_failures_total") == failures + 1
    assert http_get(f"{decode.url}/health")[0] == 200
    assert complete(decode.url, None)[1]["choices"] == answer["choices"]  # the same greedy answer


def test_the_router_drops_client_kv_transfer_params(decode: Server, peer: KVPeer, tmp_path: Path) -> None:
    router = RouterProcess(
        args=["--served-model-name", "m", "--worker-service", f"127.0.0.1:{decode.port}"], log_dir=tmp_path
    )
    try:
        router.wait_ready()
        status, answer = complete(router.url, SIGNER.sign(pull_params(peer.port)))  # even validly signed
        assert status == 200, answer
        assert peer.connections == 0
    finally:
        router.stop()
