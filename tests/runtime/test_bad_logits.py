"""One request whose logits are not finite (NaN or infinity), or whose sink raises, ends alone.

The fault is injected: a real engine produces NaN or infinite logits only from an overflow (a long prompt in
float16, say), which a tiny random model cannot be made to produce on demand, so the tests wrap the model's
forward and poison one row's logits (NaN, or one +infinity) after a real forward. Everything else is real:
the engine, the scheduler, and at EP=2 the rank processes, whose failure codes travel to rank 0 in the
step's token gather. What must hold: sample() refuses such logits, greedy or not (greedy silently returned
token 0 for a NaN row); the failed request gets one last Output, engine_failed with an error naming the
cause (app.py answers it with an error), its slot is freed, and every other request, seeded samplers
included, decodes exactly what it would alone; the step never raises (the old code raised from sample()
through Scheduler.step to pod.py, which failed the pod: every request lost, the process restarted).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel
from kubemoe_runtime.engines.torch.model.sampling import NonFiniteLogits, SamplingParams, sample
from kubemoe_runtime.engines.torch.serve.app import build_app
from kubemoe_runtime.engines.torch.serve.group import GroupLeader, RankRunner
from kubemoe_runtime.engines.torch.serve.scheduler import (
    GenerationRequest,
    Output,
    Scheduler,
    SchedulerLimits,
)
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.metrics import MetricLabels, ServingMetrics
from tests.runtime.api_state import MODEL, api_state, engine_thread
from tests.runtime.app_thread import serving
from tests.runtime.fake_backend import raw_post
from tests.runtime.routing import RouterProcess
from tests.runtime.test_scheduler import Collected
from tests.runtime.test_scheduler_mixed_steps import alone, drain, greedy, new_scheduler, run_ep2

MAGIC_0, MAGIC_1 = 509, 511  # a prompt starting with one of these is poisoned (on rank 0, on rank 1)
PROMPTS = [[12, 99, 480, 3, 77], [5, 100, 200, 17], [250, 7, 42], [493, 71, 460]]
HOT = SamplingParams(temperature=0.8, seed=3)
NEW = 8


def poison(
    engine: TorchEngine,
    when: Any,
    value: float = float("nan"),
    *,
    monkeypatch: pytest.MonkeyPatch | None = None,
) -> None:
    """After each forward, row b's logits become `value` (all of them for NaN, one entry for infinity)
    where `when(tokens_T, pos_T, slot)` holds: a stand-in for an overflow in that row's forward. Undone
    with `monkeypatch` (a rank process needs no undoing)."""
    forward = engine.model.forward

    def poisoned(tokens_BT: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        logits: torch.Tensor = forward(tokens_BT, **kwargs)
        slots_B = kwargs.get("slots_B")
        for b in range(tokens_BT.shape[0]):
            slot = None if slots_B is None else int(slots_B[b])
            if when(tokens_BT[b].tolist(), kwargs["pos_BT"][b].tolist(), slot):
                if math.isnan(value):
                    logits[b] = value
                else:
                    logits[b, -1, 7] = value
        return logits

    if monkeypatch is None:
        engine.model.forward = poisoned  # type: ignore[method-assign]
    else:
        monkeypatch.setattr(engine.model, "forward", poisoned)


def starts_with(magic: int) -> Any:
    return lambda tokens, pos, slot: pos[0] == 0 and tokens[0] == magic  # that prompt's prefill row


def test_sample_refuses_logits_without_a_meaningful_choice() -> None:
    """Fails on the old sampler: no NonFiniteLogits; greedy returned the NaN's index (0 for a NaN row)."""
    row = torch.randn(64, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(), HOT, SamplingParams(temperature=1.0, top_k=5, top_p=0.9, seed=1)]
    nan_at_3, inf_at_9 = row.clone(), row.clone()
    nan_at_3[3], inf_at_9[9] = float("nan"), float("inf")
    bad = [nan_at_3, torch.full((64,), float("nan")), inf_at_9, torch.full((64,), float("-inf"))]
    for logits in [*bad, nan_at_3.bfloat16(), inf_at_9.half()]:
        for p in params:
            with pytest.raises(NonFiniteLogits, match="not finite"):
                sample(logits, p, p.generator())
    # Some -infinity among finite logits is a distribution (those tokens impossible): sampled as usual.
    masked = row.clone()
    masked[[int(row.argmax()), 5]] = float("-inf")
    assert sample(masked, SamplingParams(), None) == int(masked.argmax())
    for p in params[1:]:
        assert sample(masked, p, p.generator()) not in (int(row.argmax()), 5)


def test_non_finite_logits_end_that_request_alone(
    engine: TorchEngine, tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails on the old code: the poisoned sampled row's RuntimeError (multinomial) left Scheduler.step,
    and a greedy row with NaN or infinite logits silently got a token."""
    bad_mid = PROMPTS[2]
    expected = {
        "greedy": alone(engine, PROMPTS[0]),
        "seeded": engine.generate([PROMPTS[1]], max_new_tokens=NEW, sampling=[HOT])[0],
        "bad_mid": alone(engine, bad_mid),
        "late": alone(engine, PROMPTS[3]),
    }
    # The sampled request whose prompt starts with MAGIC_0 gets NaN logits at its prefill; the greedy one
    # in slot 2 (slots go in submission order) one +infinity at its fourth token (its row at position
    # len(prompt) + 2).
    poison(engine, starts_with(MAGIC_0), monkeypatch=monkeypatch)
    fourth = lambda tokens, pos, slot: slot == 2 and pos[0] == len(bad_mid) + 2  # noqa: E731
    poison(engine, fourth, float("inf"), monkeypatch=monkeypatch)
    metrics = ServingMetrics(MetricLabels(deployment="d", role="decode", group="1", rank="0"))
    scheduler = Scheduler(
        GroupLeader(RankRunner(engine, slots=4, max_len=128), ep=ExpertParallel()),
        tokenizer=tokenizer,
        limits=SchedulerLimits(max_model_len=128, max_num_seqs=4),
        eos_token_ids=engine.cfg.eos_token_ids,
        metrics=metrics,
    )
    sinks = {name: Collected() for name in ("greedy", "bad_hot", "bad_mid", "seeded", "late")}
    scheduler.submit(greedy(PROMPTS[0]), sinks["greedy"])  # slot 0
    hot_prompt = [MAGIC_0, *PROMPTS[1]]
    scheduler.submit(GenerationRequest(prompt_ids=hot_prompt, max_tokens=NEW, sampling=HOT), sinks["bad_hot"])
    scheduler.submit(greedy(bad_mid), sinks["bad_mid"])  # slot 2
    seeded = GenerationRequest(prompt_ids=PROMPTS[1], max_tokens=NEW, sampling=HOT, ignore_eos=True)
    scheduler.submit(seeded, sinks["seeded"])
    scheduler.submit(greedy(PROMPTS[3]), sinks["late"])  # waits for a slot: a failed request's
    drain(scheduler)

    [failed] = sinks["bad_hot"].outputs
    assert_failed(failed, tokens=0)
    assert sinks["bad_mid"].tokens == expected["bad_mid"][:3]  # three tokens, then the failure
    assert_failed(sinks["bad_mid"].outputs[-1], tokens=3)
    for name in ("greedy", "seeded", "late"):
        assert sinks[name].tokens == expected[name], name
        assert not any(o.engine_failed for o in sinks[name].outputs)
    labels = {"deployment": "d", "role": "decode", "group": "1", "rank": "0"}
    finished = metrics.registry.get_sample_value
    assert finished("kubemoe_requests_finished_total", {**labels, "finish_reason": "error"}) == 2
    assert finished("kubemoe_requests_finished_total", {**labels, "finish_reason": "length"}) == 3
    assert finished("kubemoe_requests_running", labels) == 0


def assert_failed(output: Output, *, tokens: int) -> None:
    assert output.finish_reason == "abort"
    assert output.engine_failed  # app.py answers 503 engine_failed, or cuts the stream
    assert output.error is not None
    assert "not finite" in output.error
    assert output.token_ids == []
    assert output.completion_tokens == tokens


class RaisesOnce(Collected):
    """A sink whose second call raises (the server's hand-off to its event loop failing, say)."""

    def __call__(self, output: Output) -> None:
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            raise RuntimeError("event loop is closed")
        super().__call__(output)


def test_a_sink_that_raises_ends_its_request_alone(engine: TorchEngine, tokenizer: TextTokenizer) -> None:
    """Fails on the old code: the sink's exception left Scheduler.step (pod.py then failed the pod)."""
    scheduler = new_scheduler(
        RankRunner(engine, slots=2, max_len=128), ep=ExpertParallel(), tokenizer=tokenizer
    )
    ok, broken, waiting = Collected(), RaisesOnce(), Collected()
    scheduler.submit(greedy(PROMPTS[0]), ok)
    scheduler.submit(greedy(PROMPTS[1]), broken)
    scheduler.submit(greedy(PROMPTS[2]), waiting)  # runs in the broken request's slot once it is freed
    drain(scheduler)
    assert ok.tokens == alone(engine, PROMPTS[0])
    assert waiting.tokens == alone(engine, PROMPTS[2])
    first, last = broken.outputs
    assert first.token_ids == alone(engine, PROMPTS[1])[:1]
    assert last.engine_failed
    assert last.finish_reason == "abort"
    assert last.error == "serving this request failed: RuntimeError: event loop is closed"


# --- EP=2: a follower's bad row ---------------------------------------------------------------------------


def _poison_magic_prompts(engine: TorchEngine, rank: int) -> None:
    poison(engine, starts_with(MAGIC_1 if rank == 1 else MAGIC_0))


def _drive_bad_rows(scheduler: Scheduler, engine: TorchEngine) -> dict[str, Any]:
    sinks = [Collected() for _ in range(5)]
    requests = [
        greedy(PROMPTS[0]),  # rank 0 (ties go round-robin from rank 0)
        GenerationRequest(prompt_ids=[MAGIC_1, *PROMPTS[1]], max_tokens=NEW, sampling=HOT),  # rank 1
        greedy([MAGIC_0, *PROMPTS[2]]),  # rank 0: greedy on NaN logits
        greedy(PROMPTS[3]),  # rank 1: decodes on after its rank's other row failed
    ]
    for request, sink in zip(requests, sinks, strict=False):
        scheduler.submit(request, sink)
    drain(scheduler)
    scheduler.submit(greedy(PROMPTS[1]), sinks[4])  # the group serves on
    drain(scheduler)
    return {
        "tokens": [sink.tokens for sink in sinks],
        "errors": [[o.error for o in sink.outputs if o.engine_failed] for sink in sinks],
        "last": [sink.outputs[-1].finish_reason for sink in sinks],
    }


@pytest.mark.slow
def test_ep2_a_followers_bad_row_ends_its_request_and_the_group_serves_on(
    qwen: Path, engine: TorchEngine, tmp_path: Path
) -> None:
    """Fails on the old code: rank 1's sample() raised, its process died, and rank 0's token gather failed
    at the group's timeout (neither rank exits 0)."""
    rank0, _ = run_ep2(qwen, tmp_path, _drive_bad_rows, _poison_magic_prompts)
    tokens, errors = rank0["tokens"], rank0["errors"]
    assert tokens[1:3] == [[], []]
    for failed in errors[1:3]:
        assert len(failed) == 1
        assert "not finite" in failed[0]
    for i, prompt in [(0, PROMPTS[0]), (3, PROMPTS[3]), (4, PROMPTS[1])]:
        assert tokens[i] == alone(engine, prompt)
        assert errors[i] == []
        assert rank0["last"][i] == "length"


def test_over_http_a_failed_request_is_a_500_naming_the_cause_and_the_server_serves_on(
    qwen: Path, engine: TorchEngine, tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole answer to a request that failed alone is a 500 `request_failed` with the scheduler's
    words, not the 503 `engine_failed` that says the pod restarts (the router would retry it and take
    this healthy pod out of rotation); the next request is answered as usual."""
    poison(engine, starts_with(MAGIC_0), monkeypatch=monkeypatch)
    state = api_state(engine, tokenizer, qwen)
    with serving(build_app(state), lifespan="off") as port, engine_thread(state):
        url = f"http://127.0.0.1:{port}/v1/completions"
        bad = {"model": MODEL, "prompt": [MAGIC_0, *PROMPTS[1]], "max_tokens": 4, "temperature": 0}
        status, body = raw_post(url, bad, timeout=60)
        assert status == 500, body
        error = json.loads(body)["error"]
        assert error["code"] == "request_failed"
        assert "not finite" in error["message"]
        status, body = raw_post(url, {**bad, "prompt": PROMPTS[0]}, timeout=60)
        assert status == 200, body
        assert json.loads(body)["choices"][0]["text"]


# --- a stream that fails alone ------------------------------------------------------------------------------

MID_PROMPT = [
    MAGIC_0,
    *PROMPTS[0],
    1,
]  # 7 tokens: its fourth generated token comes from its row at position 9
MID_FAILS = 9


def stream_events(body: bytes) -> list[Any]:
    """An SSE body's events: JSON objects, and "[DONE]"."""
    events = [e.removeprefix(b"data: ") for e in body.split(b"\n\n") if e.startswith(b"data: ")]
    return ["[DONE]" if e == b"[DONE]" else json.loads(e) for e in events]


def failed_alone(events: list[Any], *, text: str) -> None:
    """A stream that failed alone after `text`: its text events, then one error event and [DONE]."""
    assert events[-1] == "[DONE]", events[-3:]
    *chunks, last = events[:-1]
    assert chunks  # it failed mid-stream
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    error = last["error"]
    assert (error["type"], error["code"], error["param"]) == ("server_error", "request_failed", None)
    assert "not finite" in error["message"]


def test_over_http_a_stream_that_failed_alone_ends_with_an_error_event_and_done(
    qwen: Path, engine: TorchEngine, tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream whose request failed alone (its fourth token's logits not finite) carries its first three
    tokens, then the error as an event and [DONE]: the stream ends cleanly, as the pod serves on. Fails on
    the old code: the stream was cut (no [DONE], the connection broken), which is how a dead engine ends
    one, and what the router takes the pod out of rotation for."""
    poison(engine, lambda tokens, pos, slot: pos[0] == MID_FAILS, monkeypatch=monkeypatch)
    state = api_state(engine, tokenizer, qwen)
    with serving(build_app(state), lifespan="off") as port, engine_thread(state):
        url = f"http://127.0.0.1:{port}/v1/completions"
        bad = {"model": MODEL, "prompt": MID_PROMPT, "max_tokens": 8, "temperature": 0}
        status, body = raw_post(url, {**bad, "max_tokens": 3}, timeout=60)  # what comes before the failure
        assert status == 200, body
        text = json.loads(body)["choices"][0]["text"]
        status, body = raw_post(url, {**bad, "stream": True}, timeout=60)
        assert status == 200
        failed_alone(stream_events(body), text=text)
        status, body = raw_post(
            url, {**bad, "prompt": PROMPTS[1], "max_tokens": 4, "stream": True}, timeout=60
        )
        assert stream_events(body)[-1] == "[DONE]"  # the next one is served as usual


def test_through_the_router_a_stream_that_failed_alone_keeps_its_pod_in_rotation(
    qwen: Path, engine: TorchEngine, tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The router passes the engine's error event on as it came, counts the request a 500, and keeps the
    pod in rotation. Fails on the old code: the engine cut the stream, the router ejected the pod and ended
    the stream with its own `backend_failed` error."""
    poison(engine, lambda tokens, pos, slot: pos[0] == MID_FAILS, monkeypatch=monkeypatch)
    state = api_state(engine, tokenizer, qwen)
    with serving(build_app(state), lifespan="off") as port, engine_thread(state):
        args = [
            "--served-model-name",
            MODEL,
            "--policy",
            "round-robin",
            "--worker-service",
            f"127.0.0.1:{port}",
        ]
        router = RouterProcess(args=[*args, "--health-interval", "60"], log_dir=tmp_path)  # no re-admission
        try:
            router.wait_ready()
            url = f"{router.url}/v1/completions"
            bad = {"model": MODEL, "prompt": MID_PROMPT, "max_tokens": 3, "temperature": 0}
            status, body = raw_post(url, bad, timeout=60)
            assert status == 200, body
            text = json.loads(body)["choices"][0]["text"]
            status, body = raw_post(url, {**bad, "max_tokens": 8, "stream": True}, timeout=60)
            assert status == 200
            failed_alone(stream_events(body), text=text)
            backend = f"127.0.0.1:{port}"
            assert router.metric("kubemoe_router_backend_healthy", role="worker", backend=backend) == 1
            assert router.metric("kubemoe_router_requests_total", endpoint="/v1/completions", code="500") == 1
            status, body = raw_post(url, {**bad, "prompt": PROMPTS[1]}, timeout=60)
            assert status == 200, body  # the same pod serves on
        finally:
            router.stop()
