"""A step where new prompts join running decodes: decode rows are not padded to a prompt's length.

A step's rows run in the forwards group.py's `plan_forwards` names (decode rows apart from a long prompt,
a short prompt apart from a long one) on every rank alike. What must hold: each forward runs only rows of
similar length (a 120-token prompt joining 6 decodes runs (6, 1) and (1, 120), not (7, 120): the old single
forward ran 840 token rows for 126 real ones); every sequence decodes exactly what it would alone (greedy
tokens unchanged); the leader's expert-load counts take real tokens only; and at EP=2, with real rank
processes, every rank makes the same forwards (a rank without rows in one runs its dummy row).
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from kubemoe_runtime.engines.torch import TorchEngine, init_expert_parallel
from kubemoe_runtime.engines.torch.model.parallel import (
    ExpertParallel,
    leave_process,
    shutdown_expert_parallel,
)
from kubemoe_runtime.engines.torch.serve.group import (
    FORWARD_COST_TOKENS,
    GroupLeader,
    RankRunner,
    Row,
    follow,
    plan_forwards,
)
from kubemoe_runtime.engines.torch.serve.scheduler import (
    GenerationRequest,
    Scheduler,
    SchedulerLimits,
)
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.ports import free_port
from tests.runtime.test_scheduler import Collected

SHORT = [
    [12, 99, 480, 3, 77],
    [5, 100, 200],
    [250, 7],
    [493, 71, 460, 317],
    [41, 8, 66],
    [3, 17, 92, 5, 41, 8],
]
LONG = [(7 * i + 11) % 500 + 1 for i in range(120)]
NEW = 8
MAX_LEN = 256

Shapes = list[tuple[int, int]]


def record_steps(runner: RankRunner, monkeypatch: pytest.MonkeyPatch | None = None) -> list[Shapes]:
    """Per step this rank ran (each RankRunner.run), the (rows, tokens) shape of each of its forwards
    (undone with `monkeypatch`; a rank process needs no undoing)."""
    steps: list[Shapes] = []
    model, run = runner.engine.model, runner.run
    forward = model.forward

    def spy_forward(tokens_BT: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if steps:  # not a forward of TorchEngine.generate (the references) before the first step
            steps[-1].append((int(tokens_BT.shape[0]), int(tokens_BT.shape[1])))
        out: torch.Tensor = forward(tokens_BT, **kwargs)
        return out

    def spy_run(*args: Any, **kwargs: Any) -> list[int]:
        steps.append([])
        return run(*args, **kwargs)

    if monkeypatch is None:
        model.forward = spy_forward  # type: ignore[method-assign]
    else:
        monkeypatch.setattr(model, "forward", spy_forward)
    runner.run = spy_run  # type: ignore[method-assign]
    return steps


def alone(engine: TorchEngine, prompt: list[int], new: int = NEW) -> list[int]:
    [out] = engine.generate([prompt], max_new_tokens=new)
    return out


def greedy(prompt: list[int], max_tokens: int = NEW) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt, max_tokens=max_tokens, ignore_eos=True)


def new_scheduler(runner: RankRunner, *, ep: ExpertParallel, tokenizer: TextTokenizer) -> Scheduler:
    return Scheduler(
        GroupLeader(runner, ep=ep),
        tokenizer=tokenizer,
        limits=SchedulerLimits(max_model_len=MAX_LEN, max_num_seqs=runner.slots),
        eos_token_ids=runner.engine.cfg.eos_token_ids,
    )


def drain(scheduler: Scheduler, *, max_steps: int = 200) -> None:
    for _ in range(max_steps):
        if not scheduler.has_work():
            return
        scheduler.step()
    raise AssertionError("the scheduler did not drain")


def test_a_long_prompt_joining_running_decodes_runs_apart_and_decodes_as_alone(
    engine: TorchEngine, tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails on the old single forward: the join step ran one (7, 120) forward."""
    expected = [alone(engine, prompt) for prompt in [*SHORT, LONG]]
    runner = RankRunner(engine, slots=8, max_len=MAX_LEN)
    steps = record_steps(runner, monkeypatch)
    scheduler = new_scheduler(runner, ep=ExpertParallel(), tokenizer=tokenizer)
    sinks = [Collected() for _ in range(len(SHORT) + 1)]
    for prompt, sink in zip(SHORT, sinks, strict=False):
        scheduler.submit(greedy(prompt), sink)
    scheduler.step()  # the six short prompts: one forward, padded to 6 (their lengths are close)
    scheduler.step()  # a decode step
    assert steps == [[(len(SHORT), max(map(len, SHORT)))], [(len(SHORT), 1)]]

    load = engine.expert_load
    before = load.counts_LE[:, 1:].sum(dim=1).clone()
    scheduler.submit(greedy(LONG), sinks[-1])
    scheduler.step()
    assert steps[-1] == [(len(SHORT), 1), (1, len(LONG))]  # decode rows alone, then the prompt alone
    counted = load.counts_LE[:, 1:].sum(dim=1) - before
    assert counted.tolist() == [(len(SHORT) + len(LONG)) * engine.cfg.top_k] * len(counted)  # no padding

    drain(scheduler)
    assert all(len(forwards) == 1 and forwards[0][1] == 1 for forwards in steps[3:])  # decode steps
    for want, sink in zip(expected, sinks, strict=True):
        assert sink.tokens == want
        assert sink.outputs[-1].finish_reason == "length"


def rows_of(*lengths_per_rank: list[int]) -> list[list[Row]]:
    return [
        [Row(request_id=100 * r + b, slot=b, tokens=[1] * n, start=0) for b, n in enumerate(lengths)]
        for r, lengths in enumerate(lengths_per_rank)
    ]


def test_plan_forwards_splits_only_where_padding_costs_more_than_a_forward() -> None:
    """A pure function of the step's row lengths (every rank computes the same plan from the broadcast step):
    every row in exactly one forward, in its rank's order."""
    # Decode steps, and a step of nothing (every rank's dummy row), stay one forward.
    assert plan_forwards(rows_of([1, 1, 1], [1, 1])) == [[[0, 1, 2], [0, 1]]]
    assert plan_forwards(rows_of([], [])) == [[[], []]]
    # The reviewed case: 16 decodes and a 500-token prompt (17 x 500 = 8500 rows as one forward).
    assert plan_forwards(rows_of([1] * 16 + [500])) == [[list(range(16))], [[16]]]
    # At EP=2 the prompt's forward finds rank 1 without rows (it runs its dummy row there).
    assert plan_forwards(rows_of([1, 500, 1], [1, 1])) == [[[0, 2], [0, 1]], [[1], []]]
    # A short prompt among a few decodes: its padding (2 x 2 rows) costs less than another forward.
    assert plan_forwards(rows_of([1, 3, 1])) == [[[0, 1, 2]]]
    # Prompts of very different lengths run apart; of close lengths, together.
    assert plan_forwards(rows_of([400, 8])) == [[[1]], [[0]]]
    assert plan_forwards(rows_of([400, 390])) == [[[0, 1]]]
    # Where the saving is just over the cost of a forward, it splits; just under, it does not.
    n = FORWARD_COST_TOKENS + 2
    assert len(plan_forwards(rows_of([1, n]))) == 2  # one forward: 2n rows; two: 1 + n + a forward
    assert len(plan_forwards(rows_of([1, n - 2]))) == 1


# --- EP=2: real rank processes (gloo), rank 0 driving a Scheduler, rank 1 following -------------------------

Drive = Callable[[Scheduler, TorchEngine], dict[str, Any]]
Fault = Callable[[TorchEngine, int], None]


@dataclass(frozen=True)
class Group:
    port: int
    model: Path
    out_dir: Path
    drive: Drive  # rank 0's part: submit requests, step the scheduler, return what to check
    fault: Fault | None  # done to each rank's engine before it serves


def _rank(rank: int, group: Group) -> None:
    torch.set_num_threads(1)
    # A short group timeout: a rank that failed fails the other's next collective within a minute.
    ep = init_expert_parallel(rank=rank, size=2, port=group.port, timeout=timedelta(seconds=60))
    model, out_dir, drive, fault = group.model, group.out_dir, group.drive, group.fault
    try:
        engine = TorchEngine.load(model, dtype=torch.float32, ep=ep)
        if fault is not None:
            fault(engine, rank)
        runner = RankRunner(engine, slots=4, max_len=MAX_LEN)
        steps = record_steps(runner)
        result: dict[str, Any] = {}
        if rank == 0:
            scheduler = new_scheduler(runner, ep=ep, tokenizer=TextTokenizer.load(model))
            try:
                result = drive(scheduler, engine)
            finally:
                scheduler.leader.shutdown()
        else:
            follow(runner, ep=ep)
        (out_dir / f"rank{rank}.json").write_text(json.dumps({"steps": steps, **result}))
    finally:
        shutdown_expert_parallel(ep)
    leave_process(0)


def run_ep2(model: Path, out_dir: Path, drive: Drive, fault: Fault | None = None) -> list[dict[str, Any]]:
    """Run `drive` on rank 0's scheduler with rank 1 following; each rank's recorded steps and results."""
    ctx = mp.get_context("spawn")
    group = Group(port=free_port(), model=model, out_dir=out_dir, drive=drive, fault=fault)
    procs = [ctx.Process(target=_rank, args=(r, group)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


def _drive_mixed(scheduler: Scheduler, engine: TorchEngine) -> dict[str, Any]:
    sinks = [Collected() for _ in range(5)]
    for prompt, sink in zip(SHORT[:4], sinks, strict=False):  # two on each rank
        scheduler.submit(greedy(prompt), sink)
    scheduler.step()
    scheduler.step()
    scheduler.submit(greedy(LONG), sinks[4])  # joins on rank 0 (ties go round-robin: rank 0 is next)
    drain(scheduler)
    return {"tokens": [sink.tokens for sink in sinks]}


@pytest.mark.slow
def test_ep2_ranks_make_the_same_forwards_and_decode_as_alone(
    qwen: Path, engine: TorchEngine, tmp_path: Path
) -> None:
    """Fails on the old single forward: the join step ran (3, 120) on rank 0 (and (2, 1) on rank 1)."""
    ranks = run_ep2(qwen, tmp_path, _drive_mixed)
    steps = [[[tuple(shape) for shape in forwards] for forwards in rank["steps"]] for rank in ranks]
    assert len(steps[0]) == len(steps[1])
    for step0, step1 in zip(*steps, strict=True):
        assert len(step0) == len(step1)  # the same forwards: the collectives line up
    join = 2
    assert steps[0][join] == [(2, 1), (1, len(LONG))]
    assert steps[1][join] == [(2, 1), (1, 1)]  # no rows in the prompt's forward: the dummy row
    assert all(t == 1 for step in steps for forwards in step[join + 1 :] for _, t in forwards)
    assert ranks[0]["tokens"] == [alone(engine, prompt) for prompt in [*SHORT[:4], LONG]]
