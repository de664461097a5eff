"""P/D KV hand-off in process (EP=1): a prefill scheduler keeps the prompt's KV under a handle, a decode
scheduler imports it and continues — the same greedy tokens as the prompt run in one place, and no prompt
token computed on the decode side (its prompt-token counter stays 0). Also the store's TTL and read-once
rule, the wire format's round trip, a malformed (untrusted) payload refused with a clear error, and the
puller over real HTTP: kept-alive connections, and a bad answer (an error status, a cut body, offsets out
of range, an unreasonable length) is a KVPullError."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel
from kubemoe_runtime.engines.torch.serve.group import GroupLeader, RankRunner
from kubemoe_runtime.engines.torch.serve.kv.handoff import KVStore, PrefilledKV, prompt_digest
from kubemoe_runtime.engines.torch.serve.kv.pull import KVPuller, KVPullError, kv_url, wants_pull
from kubemoe_runtime.engines.torch.serve.scheduler import (
    GenerationRequest,
    Output,
    Scheduler,
    SchedulerLimits,
)
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.metrics import MetricLabels, ServingMetrics
from tests.runtime.kv_peer import KVPeer

PROMPTS = [
    [493, 71, 460, 317, 71, 479, 264, 81, 268, 71, 373, 16],
    [12, 99, 480, 3, 77],
    [5, 100, 200, 300, 17, 42, 7, 99, 311],
]
NEW = 9


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def model_dir(request: pytest.FixtureRequest, checkpoints: dict[str, Path]) -> Path:
    return checkpoints[request.param]


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> TorchEngine:
    return TorchEngine.load(model_dir, dtype=torch.float32)


def make_scheduler(engine: TorchEngine, model_dir: Path, metrics: ServingMetrics | None = None) -> Scheduler:
    return Scheduler(
        GroupLeader(RankRunner(engine, slots=4, max_len=128), ep=ExpertParallel()),
        tokenizer=TextTokenizer.load(model_dir),
        limits=SchedulerLimits(max_model_len=128, max_num_seqs=4),
        eos_token_ids=(),
        metrics=metrics,
    )


def drain(scheduler: Scheduler) -> None:
    while scheduler.has_work():
        scheduler.step()


def counter(metrics: ServingMetrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name, MetricLabels(role="decode").as_dict())
    assert value is not None
    return value


def test_decode_continues_from_pulled_kv_without_recomputing(engine: TorchEngine, model_dir: Path) -> None:
    expected = engine.generate(PROMPTS, max_new_tokens=NEW)
    prefill = make_scheduler(engine, model_dir)
    answers: list[list[Output]] = [[] for _ in PROMPTS]
    for prompt, sink in zip(PROMPTS, answers, strict=True):
        request = GenerationRequest(
            prompt_ids=prompt, max_tokens=1, kv_transfer_params={"do_remote_decode": True}
        )
        prefill.submit(request, sink.append)
    drain(prefill)
    handles = []
    for sink in answers:
        [out] = sink
        assert out.finish_reason == "length"
        assert out.kv_transfer_params is not None
        assert out.kv_transfer_params["do_remote_prefill"] is True
        handles.append(out.kv_transfer_params["remote_handle"])
    assert len(prefill.kv_store) == len(PROMPTS)

    metrics = ServingMetrics(MetricLabels(role="decode"))
    decode = make_scheduler(engine, model_dir, metrics)
    outputs: list[list[Output]] = [[] for _ in PROMPTS]
    for prompt, handle, sink in zip(PROMPTS, handles, outputs, strict=True):
        taken = prefill.kv_store.take(handle)
        assert taken is not None
        pulled = PrefilledKV.decode(taken.encode())  # through the wire format
        assert pulled.prompt_tokens == len(prompt)
        decode.submit(GenerationRequest(prompt_ids=prompt, max_tokens=NEW, pulled=pulled), sink.append)
    drain(decode)
    assert [[t for o in sink for t in o.token_ids] for sink in outputs] == expected
    assert counter(metrics, "kubemoe_prompt_tokens_total") == 0  # no prompt token ran on decode
    assert counter(metrics, "kubemoe_kv_pulled_tokens_total") == sum(map(len, PROMPTS))
    assert counter(metrics, "kubemoe_generation_tokens_total") == NEW * len(PROMPTS)
    assert len(prefill.kv_store) == 0  # read once


def test_pulled_kv_for_another_prompt_is_refused(engine: TorchEngine, model_dir: Path) -> None:
    kv = [{"k": torch.zeros(3, 1)}]
    pulled = PrefilledKV(kv=kv, first_token=1, prompt_tokens=3, prompt_sha256=prompt_digest([1, 2, 3]))
    with pytest.raises(ValueError, match="another prompt"):
        make_scheduler(engine, model_dir).submit(
            GenerationRequest(prompt_ids=[1, 2, 4], max_tokens=2, pulled=pulled), lambda _: None
        )


def test_store_ttl_and_bound() -> None:
    now = [0.0]
    store = KVStore(ttl_s=10, max_entries=2, clock=lambda: now[0])
    item = PrefilledKV(kv=[], first_token=0, prompt_tokens=0, prompt_sha256="")
    a, b, c = store.put(item), store.put(item), store.put(item)
    assert store.take(a) is None  # evicted: at most two
    now[0] = 11.0
    assert store.take(b) is None  # expired
    assert store.take(c) is None


def test_store_bytes_bound() -> None:
    # prefills whose decode never comes (it refused the request, the client left) were bounded only
    # by count: 1024 copies of long prompts' KV. Now the oldest go once the bytes pass the bound.
    store = KVStore(ttl_s=60, max_bytes=3000)
    kv = [{"k": torch.zeros(250, 1)}]  # 1000 bytes
    item = PrefilledKV(kv=kv, first_token=0, prompt_tokens=250, prompt_sha256="")
    assert item.nbytes == 1000
    handles = [store.put(item) for _ in range(5)]
    assert store.nbytes == 3000
    assert [store.take(h) is not None for h in handles] == [False, False, True, True, True]
    assert store.nbytes == 0
    big = PrefilledKV(kv=[{"k": torch.zeros(2000, 1)}], first_token=0, prompt_tokens=2000, prompt_sha256="")
    h = store.put(big)  # one entry over the bound on its own is still kept (its decode may come)
    assert store.take(h) is big


def test_the_scheduler_bounds_parked_kv_by_one_ranks_cache(engine: TorchEngine, model_dir: Path) -> None:
    scheduler = make_scheduler(engine, model_dir)
    layout = scheduler.kv_layout
    limits = scheduler.limits
    assert scheduler.kv_store.max_bytes == layout.bytes_per_token * limits.max_model_len * limits.max_num_seqs


def test_wire_format_round_trip() -> None:
    kv = [{"k": torch.randn(5, 2, 4), "v": torch.randn(5, 2, 4)}, {"latent": torch.randn(5, 8).bfloat16()}]
    item = PrefilledKV(kv=kv, first_token=42, prompt_tokens=5, prompt_sha256=prompt_digest([1, 2, 3, 4, 5]))
    back = PrefilledKV.decode(item.encode())
    assert (back.first_token, back.prompt_tokens, back.prompt_sha256) == (42, 5, item.prompt_sha256)
    assert [sorted(layer) for layer in back.kv] == [["k", "v"], ["latent"]]
    assert all(torch.equal(back.kv[i][n], kv[i][n]) for i in range(2) for n in kv[i])
    with pytest.raises(ValueError, match="not a KV hand-off payload"):
        PrefilledKV.decode(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")


def test_pull_parameters() -> None:
    params = {
        "do_remote_prefill": True,
        "remote_engine_id": "kubemoe-torch",
        "remote_handle": "h",
        "remote_host": "10.0.0.7",
        "remote_port": 8000,
    }
    assert wants_pull(params)
    assert kv_url(params) == "http://10.0.0.7:8000/v1/kv/h"
    assert not wants_pull({**params, "remote_engine_id": "vllm-nixl"})  # another engine's protocol
    assert not wants_pull({"do_remote_decode": True})


# --- untrusted bytes: a malformed payload is refused with a clear error --------------------------------


def _payload(header: dict[str, object], data: bytes) -> bytes:
    head = json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + data


def _valid() -> tuple[dict[str, object], bytes]:
    """A well-formed header for two float32 tensors of shape [2, 2] (16 bytes each)."""
    meta = {"first_token": "7", "prompt_tokens": "2", "prompt_sha256": prompt_digest([1, 2])}
    header: dict[str, object] = {
        "__metadata__": meta,
        "0.k": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "0.v": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]},
    }
    return header, bytes(range(32))


def _with(key: str, **entry: object) -> bytes:
    header, data = _valid()
    header[key] = {**header[key], **entry}  # type: ignore[dict-item]
    return _payload(header, data)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "shorter than the 8-byte header length"),
        (b"\xff" * 8 + b"{}", "does not fit"),
        (_payload(*_valid())[:-1], "[16, 32] out of the 31-byte data section"),  # truncated
        (_payload(*_valid())[:20], "does not fit"),  # cut inside the header
        (_payload(*_valid()) + b"\0", "cover 32 bytes of a 33-byte data section"),
        (b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}", "JSONDecodeError"),
        (_payload([], b""), "not a JSON object"),  # type: ignore[arg-type]
        (_with("0.v", data_offsets=[16, 48]), "[16, 48] out of the 32-byte data section"),  # out of range
        (_with("0.v", data_offsets=[-16, 0]), "[-16, 0] out of the 32-byte data section"),
        (
            _with("0.v", data_offsets=[8, 24]),
            "start at 8, not where the previous tensor ends (16)",
        ),  # overlap
        (_with("0.v", data_offsets=[16]), "is not [begin, end]"),
        (_with("0.v", dtype="I64"), "dtype 'I64' is not a KV dtype"),
        (_with("0.v", shape=[2, 3]), "16 bytes for shape [2, 3]"),
        (_with("0.v", shape=[3, 1, 1]), "is not [prompt_tokens=2, ...]"),
        (_with("0.v", shape=[2, -2]), "is not a list of sizes"),
        (_with("0.v", shape="2x2"), "is not a list of sizes"),
        (_payload({"0.k": _valid()[0]["0.k"]}, bytes(16)), "no __metadata__"),
    ],
)
def test_malformed_payload_is_refused(payload: bytes, message: str) -> None:
    with pytest.raises(ValueError, match="not a KV hand-off payload") as caught:
        PrefilledKV.decode(payload)
    assert message in str(caught.value)


def test_layers_must_run_from_zero() -> None:
    header, data = _valid()
    header["2.v"] = header.pop("0.v")
    with pytest.raises(ValueError, match=r"layers \[0, 2\] are not 0\.\.1"):
        PrefilledKV.decode(_payload(header, data))


def test_decoded_tensors_are_views_of_the_buffer() -> None:
    kv = [{"k": torch.randn(3, 2), "v": torch.randn(3, 2).bfloat16()}]
    item = PrefilledKV(kv=kv, first_token=1, prompt_tokens=3, prompt_sha256="x")
    buffer = bytearray(item.encode())
    back = PrefilledKV.decode(buffer)
    assert torch.equal(back.kv[0]["k"], kv[0]["k"])
    assert torch.equal(back.kv[0]["v"], kv[0]["v"])
    buffer[-1] ^= 0xFF  # the last byte of "v": the decoded tensor sees it
    assert not torch.equal(back.kv[0]["v"], kv[0]["v"])
    assert back.kv[0]["k"].untyped_storage().nbytes() == 3 * 2 * 4  # its own storage: its slice only


# --- KVPuller against a real HTTP server -----------------------------------------------------------


@pytest.fixture
def kv_server() -> Iterator[KVPeer]:
    server = KVPeer()
    yield server
    server.close()


def test_puller_reads_and_reuses_the_connection(kv_server: KVPeer) -> None:
    kv = [{"k": torch.randn(4, 3), "v": torch.randn(4, 3)}]
    item = PrefilledKV(kv=kv, first_token=9, prompt_tokens=4, prompt_sha256="d")
    kv_server.routes["/v1/kv/a"] = (200, None, item.encode(), False)
    kv_server.routes["/v1/kv/b"] = (200, None, item.encode(), True)  # then the server closes it
    puller = KVPuller()
    for handle in ("a", "a", "b", "a"):
        back = asyncio.run(puller.pull(kv_server.params(handle)))
        assert back.first_token == 9
        assert torch.equal(back.kv[0]["v"], kv[0]["v"])
    # a, a over one connection; b over it too, then closed by the server; the last a on a new one
    assert kv_server.connections == 2
    puller.close()


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ((404, None, b"{}", False), "HTTP 404"),
        ((200, 40, _payload(*_valid())[:30], True), "the body ends after 30 of 40 bytes"),  # truncated
        ((200, None, _with("0.v", data_offsets=[16, 4096]), False), "[16, 4096] out of the 32-byte"),
        ((200, 1 << 40, b"", True), "Content-Length 1099511627776 is above 1073741824"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", "not a Content-Length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc", "is not one length"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n", "is not one length"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n", "EOFError"),  # cut inside the head
        (b"", "closed before any answer"),
        (None, "not complete in 0.5 s"),
    ],
)
def test_puller_refuses_a_bad_answer(
    kv_server: KVPeer, route: tuple[int, int | None, bytes, bool] | bytes | None, message: str
) -> None:
    kv_server.routes["/v1/kv/h"] = route
    with pytest.raises(KVPullError, match=r"GET http://127\.0\.0\.1:\d+/v1/kv/h") as caught:
        asyncio.run(KVPuller(max_bytes=1 << 30, timeout_s=0.5).pull(kv_server.params("h")))
    assert message in str(caught.value)


def test_puller_refused_connection() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    params = {"remote_handle": "h", "remote_host": "127.0.0.1", "remote_port": port}
    with pytest.raises(KVPullError, match="connect: ConnectionRefusedError"):
        asyncio.run(KVPuller().pull(params))
