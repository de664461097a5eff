"""P/D KV hand-off in process (EP=1): a prefill scheduler keeps the prompt's KV under a handle, a decode
scheduler imports it and continues — the same greedy tokens as the prompt run in one place, and no prompt
token computed on the decode side (its prompt-token counter stays 0). Also the store's TTL and read-once
rule and the wire format's round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.group import GroupLeader, RankRunner
from kubemoe_runtime.engines.torch.parallel import ExpertParallel
from kubemoe_runtime.engines.torch.scheduler import GenerationRequest, Output, Scheduler, SchedulerLimits
from kubemoe_runtime.kv.handoff import KVStore, PrefilledKV, prompt_digest
from kubemoe_runtime.kv.pull import kv_url, wants_pull
from kubemoe_runtime.metrics import MetricLabels, ServingMetrics
from kubemoe_runtime.tokenizer import TextTokenizer

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
