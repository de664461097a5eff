"""The memory a live placement change takes, and a rank that has not got it refusing before it allocates.

TorchEngine.staging_bytes says what stage_placement allocates (the next stacks of each MoE layer whose slots
change here; new experts are read straight into them where the checkpoint's dtype is the engine's), and
the placement switch's loader compares it, plus STAGING_MARGIN_BYTES, with the memory the pod may still
allocate (serve/placement_switch.py). These tests fake that reading (`available_memory`): a real cgroup's
limit cannot be lowered on demand here, and the machine's MemAvailable is whatever the benchmarks leave.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.load.weight_map import routed_expert_weights
from kubemoe_runtime.engines.torch.model import engine as engine_module
from kubemoe_runtime.engines.torch.model.engine import StagedPlacement
from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel
from kubemoe_runtime.engines.torch.model.placement import Placement
from kubemoe_runtime.engines.torch.serve import placement_switch
from kubemoe_runtime.engines.torch.serve.group import GroupLeader, RankRunner
from kubemoe_runtime.engines.torch.serve.placement_switch import STAGING_MARGIN_BYTES, Abort, Control, Switch

PROMPT = [3, 17, 92, 5, 41, 8, 66, 120, 7]


def placement(engine: TorchEngine, generation: int, slots: tuple[int, ...], *, layers: int = 0) -> Placement:
    """`slots` in the first `layers` MoE layers (0: all of them), the engine's current slots in the rest."""
    current = engine.placement
    changed = len(current.layers) if layers == 0 else layers
    return Placement(
        generation=generation,
        n_experts=engine.cfg.n_routed_experts,
        rank_sizes=(len(slots),),
        layers=current.layers,
        slots=tuple(slots if i < changed else current.slots[i] for i in range(len(current.layers))),
    )


def staged_bytes(engine: TorchEngine, target: Placement) -> int:
    staged = engine.stage_placement(target)
    return sum(
        t.numel() * t.element_size()
        for slots in staged.layers
        for t in (slots.w_gate_up_E2FD, slots.w_down_EDF)
        if t is not None
    )


@pytest.fixture
def ckpt(checkpoints: dict[str, Path], tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints["qwen3_moe"], dst)
    return dst


def test_staging_bytes_is_what_staging_allocates(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In the checkpoint's dtype the new experts are read straight into the next stacks: staging holds the
    changed layers' stacks and nothing else (no expert read apart and copied)."""
    engine = TorchEngine.load(ckpt, dtype=torch.bfloat16)
    slot = 3 * 64 * 32 * 2  # one expert: gate, up and down of 32 x 64, bf16
    start = placement(engine, 1, (0, 1, 2, 3, 4, 5, 6, 0))  # expert 7 not held: the next ones read it
    engine.apply_placement(engine.stage_placement(start))
    copied: list[int] = []  # experts read apart from their place, then copied

    def spy(tensors: dict[str, torch.Tensor], **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        copied.append(kwargs["expert"])
        return routed_expert_weights(tensors, **kwargs)

    monkeypatch.setattr(engine_module, "routed_expert_weights", spy)
    for target in (
        placement(engine, 2, (7, 6, 5, 4, 3, 2, 1, 0), layers=1),  # one layer changes
        placement(engine, 3, (7, 6, 5, 4, 3, 2, 7, 7)),  # every layer, expert 7 in three slots
    ):
        need = engine.staging_bytes(target)
        changed = sum(a != b for a, b in zip(target.slots, engine.placement.slots, strict=True))
        assert need == changed * 8 * slot
        assert staged_bytes(engine, target) == need
    assert copied == []
    assert engine.staging_bytes(engine.placement) == 0  # nothing changes: nothing staged
    # and what was read into place is right: the stacks of an engine loaded on that placement
    target = placement(engine, 4, (7, 6, 5, 4, 3, 2, 7, 7))
    engine.apply_placement(engine.stage_placement(target))
    loaded = TorchEngine.load(ckpt, dtype=torch.bfloat16, placement=target)
    for (_, got), (_, want) in zip(engine.moe_layers(), loaded.moe_layers(), strict=True):
        assert torch.equal(got.experts.w_gate_up_E2FD, want.experts.w_gate_up_E2FD)
        assert torch.equal(got.experts.w_down_EDF, want.experts.w_down_EDF)
    # in another dtype the new experts are all read as stored (bf16: `slot` bytes each), then one at a
    # time made contiguous and converted into place: counted too
    converted = TorchEngine.load(ckpt, dtype=torch.float32, placement=start)
    target = placement(converted, 2, (7, 6, 5, 4, 3, 2, 1, 0))
    stacks = staged_bytes(converted, target)
    assert stacks == len(target.layers) * 8 * 2 * slot
    assert converted.staging_bytes(target) == stacks + len(target.layers) * slot + slot  # expert 7, apart


def drive(leader: GroupLeader, *, timeout: float = 30.0) -> list[Control]:
    """Idle keepalives until no placement is pending; the controls rank 0 acted on."""
    seen: list[Control] = []
    real = leader.runner.placement.before_step

    def spy(control: Control | None) -> None:
        if control is not None:
            seen.append(control)
        real(control)

    leader.runner.placement.before_step = spy  # type: ignore[method-assign]
    deadline = time.monotonic() + timeout
    while leader.switch.busy():
        assert time.monotonic() < deadline, "the placement never finished"
        leader.keepalive()
        time.sleep(0.005)
    return seen


def test_a_rank_without_the_memory_refuses_before_allocating(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fake reading of the memory the pod may still allocate (module docstring): just too little.
    room: list[int | None] = [None]
    monkeypatch.setattr(placement_switch, "available_memory", lambda: room[0])
    engine = TorchEngine.load(ckpt, dtype=torch.bfloat16)
    leader = GroupLeader(RankRunner(engine, slots=2, max_len=64), ep=ExpertParallel())
    before, start = engine.logits(PROMPT), engine.placement
    staged: list[Placement] = []
    real_stage = engine.stage_placement

    def stage(target: Placement, **kwargs: Any) -> StagedPlacement:
        staged.append(target)
        return real_stage(target, **kwargs)

    monkeypatch.setattr(engine, "stage_placement", stage)
    target = placement(engine, 1, (7, 6, 5, 4, 3, 2, 1, 0))
    need = engine.staging_bytes(target)
    assert need > 0
    room[0] = need + STAGING_MARGIN_BYTES - 1

    leader.switch.request(target)
    assert drive(leader)[-1] == Abort(1)
    assert staged == []  # refused before staging allocated anything
    error = leader.switch.view().error
    assert error is not None
    assert error.startswith(
        "generation 1 was not applied (generation 0 stays): rank 0: StagingMemoryError: staging "
        f"generation 1 needs {need // 1024}.0 KiB ({need} bytes) on this rank"
    )
    assert f"and 256.0 MiB to spare, but only 256.2 MiB ({room[0]} bytes) of memory is available" in error
    assert engine.placement == start
    assert torch.equal(engine.logits(PROMPT), before)

    room[0] = need + STAGING_MARGIN_BYTES  # just enough
    retry = placement(engine, 2, (7, 6, 5, 4, 3, 2, 1, 0))
    leader.switch.request(retry)
    assert drive(leader)[-1] == Switch(2)
    assert leader.switch.view().error is None
    assert engine.placement == retry

    room[0] = None  # unknown: not checked
    back = placement(engine, 3, (0, 1, 2, 3, 4, 5, 6, 7))
    leader.switch.request(back)
    assert drive(leader)[-1] == Switch(3)
    assert staged == [retry, back]


def test_ranks_of_one_pod_each_get_their_share(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ranks of a pod are processes that may all stage at once, and the reading is the pod's: each
    rank compares its need with 1/N of it, so N ranks never stage N times what one reading allowed."""
    room: list[int | None] = [None]
    monkeypatch.setattr(placement_switch, "available_memory", lambda: room[0])
    engine = TorchEngine.load(ckpt, dtype=torch.bfloat16)
    leader = GroupLeader(RankRunner(engine, slots=2, max_len=64, local_ranks=2), ep=ExpertParallel())
    target = placement(engine, 1, (7, 6, 5, 4, 3, 2, 1, 0))
    need = engine.staging_bytes(target) + STAGING_MARGIN_BYTES
    room[0] = 2 * need - 2  # enough for one rank, not for two

    leader.switch.request(target)
    assert drive(leader)[-1] == Abort(1)
    error = leader.switch.view().error
    assert error is not None
    assert (
        f"only {(need - 1) / 2**20:.1f} MiB ({need - 1} bytes) of memory is available (this rank's share:"
        in error
    )
    assert "1/2 of the pod's" in error

    room[0] = 2 * need  # each of the two ranks' share is just enough
    retry = placement(engine, 2, (7, 6, 5, 4, 3, 2, 1, 0))
    leader.switch.request(retry)
    assert drive(leader)[-1] == Switch(2)
    assert engine.placement == retry
