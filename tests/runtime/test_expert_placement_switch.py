"""The placement switch's protocol on one rank (serve/placement_switch.py through GroupLeader): begin, poll,
switch at a step; 409 while loading; 200 for the generation applied; a failed load aborts and keeps the old
placement. The multi-rank path runs through real servers in test_expert_placement_api.py."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel
from kubemoe_runtime.engines.torch.model.placement import Placement
from kubemoe_runtime.engines.torch.model.sampling import SamplingParams
from kubemoe_runtime.engines.torch.serve.group import GroupLeader, RankRunner, Row, Step
from kubemoe_runtime.engines.torch.serve.placement_switch import (
    Abort,
    Begin,
    Control,
    PlacementConflict,
    Poll,
    Switch,
)

PROMPT = [3, 17, 92, 5, 41, 8, 66, 120, 7]


def placement(engine: TorchEngine, generation: int, slots: tuple[int, ...]) -> Placement:
    layers = engine.placement.layers
    return Placement(
        generation=generation,
        n_experts=engine.cfg.n_routed_experts,
        rank_sizes=(len(slots),),
        layers=layers,
        slots=(slots,) * len(layers),
    )


def record_controls(leader: GroupLeader) -> list[tuple[int, Control]]:
    """(step number, control) of every placement control rank 0 acts on: a spy that calls the real method."""
    seen: list[tuple[int, Control]] = []
    real = leader.runner.placement.before_step

    def spy(control: Control | None) -> None:
        if control is not None:
            seen.append((leader.steps, control))
        real(control)

    leader.runner.placement.before_step = spy  # type: ignore[method-assign]
    return seen


def last(seen: list[tuple[int, Control]]) -> Control:
    return seen[-1][1]


def drive(leader: GroupLeader, *, timeout: float = 30.0) -> None:
    """Idle keepalives, as the scheduler sends them while a placement loads, until none is pending."""
    deadline = time.monotonic() + timeout
    while leader.switch.busy():
        assert time.monotonic() < deadline, "the placement never finished"
        leader.keepalive()
        time.sleep(0.005)


@pytest.fixture
def ckpt(checkpoints: dict[str, Path], tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints["qwen3_moe"], dst)
    return dst


def test_begin_poll_switch_then_idempotent(ckpt: Path) -> None:
    engine = TorchEngine.load(ckpt, dtype=torch.float32)
    leader = GroupLeader(RankRunner(engine, slots=2, max_len=64), ep=ExpertParallel())
    before = engine.logits(PROMPT)
    new = placement(engine, 5, (7, 6, 5, 4, 3, 2, 1, 0))
    assert leader.switch.request(new) == "loading"
    assert leader.switch.request(new) == "loading"  # the same request again while it loads
    with pytest.raises(PlacementConflict, match="generation 5 is still loading"):
        leader.switch.request(placement(engine, 6, (0, 1, 2, 3, 4, 5, 6, 7)))
    view = leader.switch.view()
    assert (view.applied.generation, view.pending_generation) == (0, 5)
    seen = record_controls(leader)
    drive(leader)
    controls = [control for _, control in seen]
    assert isinstance(controls[0], Begin)
    assert all(isinstance(c, Poll) for c in controls[1:-1])
    assert controls[-1] == Switch(5)
    view = leader.switch.view()
    assert (view.applied, view.pending_generation, view.error) == (new, None, None)
    assert engine.placement == new
    assert engine.expert_load.window().placement == new
    assert [tuple(b.experts.experts) for _, b in engine.moe_layers()] == [new.slots[0]] * len(new.layers)
    torch.testing.assert_close(engine.logits(PROMPT), before, atol=1e-5, rtol=0)
    assert leader.switch.request(new) == "applied"  # 200: the generation applied now
    with pytest.raises(PlacementConflict, match="generation 5 is applied with other slots"):
        leader.switch.request(placement(engine, 5, (0, 1, 2, 3, 4, 5, 6, 7)))


def test_a_switch_takes_effect_at_the_step_that_carries_it(ckpt: Path) -> None:
    """Steps keep running while a placement loads; the Switch rides on a numbered step, and the tokens are
    those of a run without a switch."""
    engine = TorchEngine.load(ckpt, dtype=torch.float32)
    leader = GroupLeader(RankRunner(engine, slots=2, max_len=64), ep=ExpertParallel())
    seen = record_controls(leader)
    first = leader.run(Step(rows=[[Row(0, 0, PROMPT, 0, sampling=SamplingParams())]]))
    new = placement(engine, 1, (3, 2, 1, 0, 7, 6, 5, 4))
    leader.switch.request(new)
    tokens, position = [first[0][0]], len(PROMPT)
    while leader.switch.busy() and len(tokens) < 40:
        out = leader.run(Step(rows=[[Row(0, 0, [tokens[-1]], position)]]))
        tokens.append(out[0][0])
        position += 1
        time.sleep(0.01)  # the loader thread runs meanwhile
    assert not leader.switch.busy(), "no switch within 40 steps"
    (switched_at,) = [number for number, control in seen if isinstance(control, Switch)]
    assert switched_at == leader.steps  # the last step run carried it (steps counts it already)
    assert seen[0] == (2, Begin(new))  # the step after the request (step 1 is the first decode)
    assert engine.placement == new
    for _ in range(3):  # and on under the new placement
        tokens.append(leader.run(Step(rows=[[Row(0, 0, [tokens[-1]], position)]]))[0][0])
        position += 1
    reference = TorchEngine.load(ckpt, dtype=torch.float32).generate([PROMPT], max_new_tokens=len(tokens))
    assert tokens == reference[0]


def test_a_failed_load_aborts_and_keeps_the_old_placement(ckpt: Path) -> None:
    engine = TorchEngine.load(ckpt, dtype=torch.float32)
    start = placement(engine, 2, (0, 1, 2, 3, 4, 5, 6, 0))  # expert 7 not held, so the next must read it
    engine = TorchEngine.load(ckpt, dtype=torch.float32, placement=start)
    leader = GroupLeader(RankRunner(engine, slots=2, max_len=64), ep=ExpertParallel())
    before = engine.logits(PROMPT)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    shard = ckpt / index[f"model.layers.{start.layers[-1]}.mlp.experts.7.down_proj.weight"]
    shard.unlink()  # the fault: a checkpoint file the new copy needs is gone
    leader.switch.request(placement(engine, 3, (7, 6, 5, 4, 3, 2, 1, 0)))
    seen = record_controls(leader)
    drive(leader)
    assert last(seen) == Abort(3)
    view = leader.switch.view()
    assert view.applied == start
    assert view.pending_generation is None
    assert view.error is not None
    assert view.error.startswith(
        "generation 3 was not applied (generation 2 stays): rank 0: WeightLoadError:"
    )
    assert f"{shard.name}: shard file is missing" in view.error
    assert engine.placement == start
    assert [tuple(b.experts.experts) for _, b in engine.moe_layers()] == [start.slots[0]] * len(start.layers)
    assert torch.equal(engine.logits(PROMPT), before)
    # A later generation that needs no missing file still goes through, and clears the error.
    later = placement(engine, 4, (6, 5, 4, 3, 2, 1, 0, 0))
    assert leader.switch.request(later) == "loading"
    drive(leader)
    assert last(seen) == Switch(4)
    assert leader.switch.view().error is None
    assert engine.placement == later
