"""Continuous batching in process (EP=1): requests join and leave a running batch and still decode exactly
what each would alone; stops, finish reasons, seeds, the queue bound, aborts and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel
from kubemoe_runtime.engines.torch.model.sampling import SamplingParams
from kubemoe_runtime.engines.torch.serve.group import GroupLeader, RankRunner
from kubemoe_runtime.engines.torch.serve.scheduler import (
    GenerationRequest,
    Output,
    QueueFull,
    Scheduler,
    SchedulerLimits,
)
from kubemoe_runtime.engines.torch.serve.text_stream import TextStream
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.metrics import MetricLabels, ServingMetrics
from kubemoe_runtime.tools.checkpoints import ARCHITECTURES

PROMPTS = [
    [493, 71, 460, 317, 71, 479, 264, 81, 268, 71, 373, 16],
    [12, 99, 480, 3, 77],
    [5, 100, 200, 300, 17, 42, 7, 99, 311],
    [250],
]
NEW = 10


class Collected:
    def __init__(self) -> None:
        self.outputs: list[Output] = []

    def __call__(self, output: Output) -> None:
        self.outputs.append(output)

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[-1].finish_reason if self.outputs else None


@pytest.fixture(scope="module")
def engine(checkpoints: dict[str, Path]) -> TorchEngine:
    return TorchEngine.load(checkpoints["qwen3_moe"], dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(checkpoints: dict[str, Path]) -> TextTokenizer:
    return TextTokenizer.load(checkpoints["qwen3_moe"])


def make_scheduler(
    engine: TorchEngine,
    tokenizer: TextTokenizer,
    *,
    slots: int = 4,
    max_waiting: int = 64,
    metrics: ServingMetrics | None = None,
) -> Scheduler:
    runner = RankRunner(engine, slots=slots, max_len=128)
    return Scheduler(
        GroupLeader(runner, ep=ExpertParallel()),
        tokenizer=tokenizer,
        limits=SchedulerLimits(max_model_len=128, max_num_seqs=slots, max_waiting=max_waiting),
        eos_token_ids=engine.cfg.eos_token_ids,
        metrics=metrics,
    )


def run_until_idle(scheduler: Scheduler, *, max_steps: int = 500) -> None:
    for _ in range(max_steps):
        if not scheduler.has_work():
            return
        scheduler.step()
    raise AssertionError("the scheduler did not drain")


def alone(engine: TorchEngine, prompt: list[int], *, new: int = NEW) -> list[int]:
    [out] = engine.generate([prompt], max_new_tokens=new, stop_token_ids=engine.cfg.eos_token_ids)
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_requests_joining_a_running_batch_decode_as_alone(checkpoints: dict[str, Path], arch: str) -> None:
    engine = TorchEngine.load(checkpoints[arch], dtype=torch.float32)
    tokenizer = TextTokenizer.load(checkpoints[arch])
    # Three slots for four requests: the fourth waits for a slot; two more arrive mid-flight.
    scheduler = make_scheduler(engine, tokenizer, slots=3)
    sinks = [Collected() for _ in PROMPTS]
    for prompt, sink in zip(PROMPTS[:2], sinks, strict=False):
        scheduler.submit(GenerationRequest(prompt_ids=prompt, max_tokens=NEW), sink)
    for _ in range(3):
        scheduler.step()
    for prompt, sink in zip(PROMPTS[2:], sinks[2:], strict=True):
        scheduler.submit(GenerationRequest(prompt_ids=prompt, max_tokens=NEW), sink)
    run_until_idle(scheduler)
    for prompt, sink in zip(PROMPTS, sinks, strict=True):
        expected = alone(engine, prompt)
        assert sink.tokens == expected
        assert sink.finish_reason == ("stop" if expected[-1] in engine.cfg.eos_token_ids else "length")
        assert sink.text == tokenizer.decode(expected)
        assert sink.outputs[-1].completion_tokens == len(expected)
        assert sink.outputs[-1].prompt_tokens == len(prompt)


def test_stop_strings_and_stop_tokens(engine: TorchEngine, tokenizer: TextTokenizer) -> None:
    expected = alone(engine, PROMPTS[0])
    full = tokenizer.decode(expected)
    stop_word = tokenizer.decode(expected[3:5]).strip()[:3]
    assert stop_word
    assert stop_word in full
    scheduler = make_scheduler(engine, tokenizer)
    by_string, by_token = Collected(), Collected()
    request = GenerationRequest(prompt_ids=PROMPTS[0], max_tokens=NEW, stop=(stop_word,))
    scheduler.submit(request, by_string)
    scheduler.submit(
        GenerationRequest(prompt_ids=PROMPTS[0], max_tokens=NEW, stop_token_ids=(expected[2],)), by_token
    )
    run_until_idle(scheduler)
    assert by_string.finish_reason == "stop"
    assert by_string.text == full[: full.index(stop_word)]  # cut before the stop string
    assert by_token.finish_reason == "stop"
    assert by_token.tokens == expected[:3]
    assert by_token.text == tokenizer.decode(expected[:2])  # the stop token's own text is not output


def test_text_stream_holds_back_a_possible_stop_string(tokenizer: TextTokenizer) -> None:
    text = "the router routes tokens"
    stream = TextStream(tokenizer, stop=("tokens!",))
    released = "".join(stream.add(t) for t in tokenizer.encode(text))
    assert not stream.stopped
    assert released == text.removesuffix("tokens")  # "tokens" may yet become "tokens!"
    assert stream.flush() == "tokens"


def test_seeded_sampling_is_reproducible_side_by_side(engine: TorchEngine, tokenizer: TextTokenizer) -> None:
    scheduler = make_scheduler(engine, tokenizer)
    hot = SamplingParams(temperature=1.5, seed=11)
    sinks = [Collected() for _ in range(3)]
    for sink, params in zip(sinks, [hot, hot, SamplingParams(temperature=1.5, seed=12)], strict=True):
        scheduler.submit(GenerationRequest(prompt_ids=PROMPTS[1], max_tokens=NEW, sampling=params), sink)
    run_until_idle(scheduler)
    assert sinks[0].tokens == sinks[1].tokens
    assert sinks[0].tokens != sinks[2].tokens
    [reference] = engine.generate([PROMPTS[1]], max_new_tokens=NEW, sampling=[hot])
    assert sinks[0].tokens == reference[: len(sinks[0].tokens)]


def test_bounded_queue_abort_and_metrics(engine: TorchEngine, tokenizer: TextTokenizer) -> None:
    metrics = ServingMetrics(MetricLabels(deployment="d", role="decode", group="1", rank="0"))
    scheduler = make_scheduler(engine, tokenizer, slots=1, max_waiting=2, metrics=metrics)
    first, second, third = Collected(), Collected(), Collected()
    scheduler.submit(GenerationRequest(prompt_ids=PROMPTS[0], max_tokens=NEW), first)
    scheduler.submit(GenerationRequest(prompt_ids=PROMPTS[1], max_tokens=3), second)
    with pytest.raises(QueueFull):
        scheduler.submit(GenerationRequest(prompt_ids=PROMPTS[2], max_tokens=3), third)
    with pytest.raises(ValueError, match="context length"):
        scheduler.submit(GenerationRequest(prompt_ids=PROMPTS[2], max_tokens=200), third)
    scheduler.step()  # the first runs (one slot), the second waits
    labels = {"deployment": "d", "role": "decode", "group": "1", "rank": "0"}
    sample = metrics.registry.get_sample_value
    assert sample("kubemoe_requests_running", labels) == 1
    assert sample("kubemoe_requests_waiting", labels) == 1
    assert sample("kubemoe_kv_cache_usage_ratio", labels) == 1.0
    assert sample("kubemoe_requests_rejected_total", labels) == 1
    request_id = 0
    scheduler.abort(request_id)
    run_until_idle(scheduler)
    assert first.finish_reason == "abort"
    assert len(first.tokens) == 1
    assert second.finish_reason == "length"
    assert len(second.tokens) == 3
    assert sample("kubemoe_generation_tokens_total", labels) == 4
    assert sample("kubemoe_prompt_tokens_total", labels) == len(PROMPTS[0]) + len(PROMPTS[1])
    assert sample("kubemoe_time_to_first_token_seconds_count", labels) == 2
    assert sample("kubemoe_inter_token_latency_seconds_count", labels) == 2
    assert sample("kubemoe_requests_finished_total", {**labels, "finish_reason": "abort"}) == 1
    assert sample("kubemoe_requests_running", labels) == 0
