"""A P/D decode that would refuse a request refuses it before it pulls the prompt's KV.

The prefill hands a KV out once (GET /v1/kv/{handle} takes it). A decode whose waiting queue was full, or
whose drain deadline had passed, used to pull the KV first and answer 503 after: the router's retry on
another decode then found no KV (404) and prefilled the prompt again. Now the decode answers 503 at once,
the prefill still holds the KV, and the next decode pulls it and computes no prompt token.

Also: a decode's pulled KV (its host copy) is freed once the step that takes it into the cache has run,
not held until the request ends.

Real parts: the torch engine's API (serve/app.py) on real schedulers over the tiny checkpoint, served by
uvicorn in this process, the prefill's KV made by its own prefill step and fetched over HTTP.
"""

from __future__ import annotations

import gc
import json
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel
from kubemoe_runtime.engines.torch.serve.app import ServerState, build_app
from kubemoe_runtime.engines.torch.serve.group import GroupLeader, RankRunner
from kubemoe_runtime.engines.torch.serve.kv.handoff import KVStore, remote_prefill_params
from kubemoe_runtime.engines.torch.serve.scheduler import (
    GenerationRequest,
    Output,
    Scheduler,
    SchedulerLimits,
)
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.kv_auth import KV_KEY_ENV, KVSigner
from kubemoe_runtime.pod.metrics import MetricLabels, ServingMetrics
from tests.runtime.app_thread import serving
from tests.runtime.fake_backend import raw_post

MODEL = "tiny-qwen"
KEY = "decode-admission-key-0123456789abcdef"
SIGNER = KVSigner(KEY.encode())
MAX_MODEL_LEN = 64
PROMPT = [493, 71, 460, 317, 71, 479, 264, 81, 268, 71, 373, 16]


@dataclass
class Server:
    """The torch engine's API on one scheduler, served on 127.0.0.1 (`port`)."""

    port: int
    state: ServerState
    scheduler: Scheduler
    labels: MetricLabels
    metrics: ServingMetrics

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def store(self) -> KVStore:
        return self.scheduler.kv_store

    def counter(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(name, self.labels.as_dict())
        assert value is not None
        return value


def make_scheduler(
    engine: TorchEngine,
    tokenizer: TextTokenizer,
    metrics: ServingMetrics | None = None,
    *,
    max_waiting: int = 8,
) -> Scheduler:
    return Scheduler(
        GroupLeader(RankRunner(engine, slots=2, max_len=MAX_MODEL_LEN), ep=ExpertParallel()),
        tokenizer=tokenizer,
        limits=SchedulerLimits(max_model_len=MAX_MODEL_LEN, max_num_seqs=2, max_waiting=max_waiting),
        eos_token_ids=(),
        metrics=metrics,
    )


Serve = Callable[..., AbstractContextManager[Server]]


@pytest.fixture
def serve(
    qwen: Path, tokenizer: TextTokenizer, engine: TorchEngine, monkeypatch: pytest.MonkeyPatch
) -> Serve:
    """A context manager that serves the API on a new scheduler with the deployment's key: `role`'s
    metrics, a waiting queue of `max_waiting`, its engine thread running unless `run` is False (then
    nothing it takes is ever stepped)."""
    monkeypatch.setenv(KV_KEY_ENV, KEY)  # the API's signer comes from the environment

    @contextmanager
    def served(role: str, *, max_waiting: int = 8, run: bool = True) -> Iterator[Server]:
        labels = MetricLabels(role=role)
        metrics = ServingMetrics(labels)
        scheduler = make_scheduler(engine, tokenizer, metrics, max_waiting=max_waiting)
        state = ServerState(
            served_names=(MODEL,),
            model_path=str(qwen),
            max_model_len=MAX_MODEL_LEN,
            vocab_size=engine.cfg.vocab_size,
            eos_token_ids=(),
            tokenizer=tokenizer,
            metrics=metrics,
            scheduler=scheduler,
        )
        stop = threading.Event()
        thread = threading.Thread(target=scheduler.run, args=(stop,), kwargs={"keepalive_s": 0.5})
        if run:
            thread.start()
        try:
            with serving(build_app(state), lifespan="off", what=f"the {role}") as port:
                yield Server(port, state, scheduler, labels, metrics)
        finally:
            stop.set()
            if run:
                thread.join(timeout=10)

    return served


def prefill_once(prefill: Scheduler) -> str:
    """Prefill PROMPT for a remote decode on `prefill` (its engine thread not running); the KV's handle."""
    outputs: list[Output] = []
    request = GenerationRequest(
        prompt_ids=PROMPT, max_tokens=1, kv_transfer_params={"do_remote_decode": True}
    )
    prefill.submit(request, outputs.append)
    while prefill.has_work():
        prefill.step()
    [out] = outputs
    assert out.kv_transfer_params is not None
    handle = out.kv_transfer_params["remote_handle"]
    assert isinstance(handle, str)
    return handle


def decode_body(prefill: Server, handle: str) -> dict[str, object]:
    """A decode's request as the router sends it: the prefill's kv_transfer_params, signed."""
    params = remote_prefill_params(handle=handle, host="127.0.0.1", port=prefill.port)
    return {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 3,
        "temperature": 0,
        "kv_transfer_params": SIGNER.sign(params),
    }


@pytest.mark.parametrize("refusal", ["queue_full", "drain_ended"])
def test_a_decode_that_refuses_leaves_the_kv_for_the_next_decode(serve: Serve, refusal: str) -> None:
    with serve("prefill", run=False) as prefill:
        handle = prefill_once(prefill.scheduler)
        body = decode_body(prefill, handle)
        with serve("decode", max_waiting=1, run=False) as busy:
            if refusal == "queue_full":  # one request waits, and no engine thread takes it
                busy.scheduler.submit(GenerationRequest(prompt_ids=[1, 2, 3], max_tokens=2), lambda _: None)
            else:
                busy.state.in_flight.end_all()  # the drain deadline passed: nothing more is served
            status, answer = raw_post(f"{busy.url}/v1/completions", body)
            assert status == 503, answer
            error = json.loads(answer)["error"]
            assert error["code"] == ("queue_full" if refusal == "queue_full" else "engine_failed")
            assert len(prefill.store) == 1, "the refusing decode took the KV"
            assert busy.counter("kubemoe_kv_pull_failures_total") == 0
            if refusal == "queue_full":
                assert busy.counter("kubemoe_requests_rejected_total") == 1  # counted once
        with serve("decode") as decode:  # the router's retry: another decode
            status, answer = raw_post(f"{decode.url}/v1/completions", body)
            assert status == 200, answer
            assert json.loads(answer)["usage"]["completion_tokens"] == 3
            assert len(prefill.store) == 0
            assert decode.counter("kubemoe_kv_pulled_tokens_total") == len(PROMPT)
            assert decode.counter("kubemoe_prompt_tokens_total") == 0  # the KV was there: no prefill here


def submit_pulled(
    decode: Scheduler, store: KVStore, handle: str, sink: Callable[[Output], None]
) -> list[weakref.ref[torch.Tensor]]:
    """Submit PROMPT to `decode` with the KV under `handle`, keeping no reference to it here; weak
    references to its tensors."""
    pulled = store.take(handle)
    assert pulled is not None
    decode.submit(GenerationRequest(prompt_ids=PROMPT, max_tokens=4, pulled=pulled), sink)
    return [weakref.ref(t) for layer in pulled.kv for t in layer.values()]


def test_the_pulled_kv_is_freed_once_it_is_in_the_cache(
    engine: TorchEngine, tokenizer: TextTokenizer
) -> None:
    [expected] = engine.generate([PROMPT], max_new_tokens=4)
    prefill = make_scheduler(engine, tokenizer)
    handle = prefill_once(prefill)
    decode = make_scheduler(engine, tokenizer)
    outputs: list[Output] = []
    tensors = submit_pulled(decode, prefill.kv_store, handle, outputs.append)
    gc.collect()
    assert tensors
    assert all(t() is not None for t in tensors)  # held while the request waits
    decode.step()  # admitted: its first row writes the KV into its slot
    gc.collect()
    assert decode.has_work()
    assert outputs[-1].finish_reason is None  # still running ...
    assert all(t() is None for t in tensors)  # ... without the host copy
    while decode.has_work():
        decode.step()
    assert [t for o in outputs for t in o.token_ids] == expected  # the cache had it all
