"""spec.experts on the torch engine: the memory its live rebalances stage experts in, reserved on every
expert-parallel rank (plan/redundant.py TORCH_STAGING_SHARE: a copy of the rank's experts), and a layout
that fits without that reserve but not with it refused naming spec.experts."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.api.resource import ModelDeployment
from kubemoe_operator.plan.model import Plan
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.plan.redundant import TORCH_STAGING_SHARE
from tests.operator.helpers import BASE, manifest

# --max-num-seqs 4: the KV cache the torch engine allocates up front, (4 + 1) x (8192 + 1) positions a rank
# (sizing.TorchKv), fits BASE's ranks beside the staging reserve of its rebalances (16, the default, not)
TORCH = {"kind": "torch", "maxModelLen": 8192, "extraArgs": ["--max-num-seqs", "4"]}


def planned_torch(**spec: Any) -> Plan:
    """BASE (Qwen3-30B-A3B on H100, prefill EP2, decode EP4) planned for the torch engine, the admission
    table's rules (torch: cpu and pvc:// or file:// only) skipped: the planner's memory sums only."""
    data = copy.deepcopy(BASE)
    data["spec"].update(copy.deepcopy(spec))
    data["spec"]["engine"] = {**TORCH, **data["spec"].get("engine", {})}
    return plan_manifest(ModelDeployment.model_validate(data))


def test_live_rebalancing_reserves_a_copy_of_each_ranks_experts() -> None:
    assert TORCH_STAGING_SHARE == 1.0  # the rebalancer may change every layer in one generation
    plain, balanced = planned_torch(), planned_torch(experts={"redundant": 8})
    for name in ("prefill", "decode"):
        before, after = plain.role(name).memory, balanced.role(name).memory
        staged = after.reserve_gib - before.reserve_gib
        # the redundant slots' copies are staged too: every slot of a changed layer is
        assert staged == pytest.approx(after.expert_weights_gib, abs=1e-3)
        assert after.expert_weights_gib > before.expert_weights_gib
        assert after.kv_budget_gib == pytest.approx(
            before.kv_budget_gib - staged - after.redundant_weights_gib, abs=1e-3
        )
        assert any(
            note.startswith(f"{name}: {staged:.1f} GiB of each rank's") and "live rebalances" in note
            for note in balanced.notes
        )
    assert not any("live rebalances" in note for note in plain.notes)


def test_no_reserve_without_rebalancing_nor_on_vllm_nor_without_expert_parallelism() -> None:
    gpu_reserve = planned_torch().role("decode").memory.reserve_gib
    vllm = plan_manifest(manifest(experts={}))  # vLLM's balancer: its buffers instead (test_vllm_eplb.py)
    assert {r.memory.reserve_gib for r in vllm.roles} == {gpu_reserve}
    one_rank = planned_torch(
        roles={"prefill": {"parallelism": {"data": 1}}, "decode": {"parallelism": {"data": 4}}}, experts={}
    )
    assert not one_rank.role("prefill").expert_parallel
    assert one_rank.role("prefill").memory.reserve_gib == gpu_reserve  # nothing to move between ranks
    assert one_rank.role("decode").memory.reserve_gib > gpu_reserve


def torch_longest(**spec: Any) -> int:
    """The longest maxModelLen whose torch KV cache, (4 + 1) x (maxModelLen + 1) positions a rank, fits every
    role of planned_torch(**spec): read off the refusal of a longer one, whose fix names it per role."""
    huge = 1 << 20
    model = {**BASE["spec"]["model"], "config": {"maxPositionEmbeddings": huge}}
    with pytest.raises(ManifestError) as err:
        planned_torch(engine={"maxModelLen": huge}, model=model, **spec)
    fixes = [re.search(r"set engine\.maxModelLen <= (\d+)", p.fix) for p in err.value.problems]
    return min(int(m.group(1)) for m in fixes if m is not None)


def test_a_layout_that_fits_only_without_the_reserve_is_refused_naming_spec_experts() -> None:
    tightest = torch_longest()  # fits without the reserve, exactly
    model = {**BASE["spec"]["model"], "config": {"maxPositionEmbeddings": tightest + 1}}
    planned_torch(engine={"maxModelLen": tightest}, model=model)
    with pytest.raises(ManifestError):  # one position more does not: the cache is sized exactly
        planned_torch(engine={"maxModelLen": tightest + 1}, model=model)
    with pytest.raises(ManifestError) as err:
        planned_torch(engine={"maxModelLen": tightest}, model=model, experts={})
    (problem,) = err.value.problems
    assert problem.field == "spec.experts"
    assert "the torch engine stages a new placement's experts beside the running ones" in problem.message
    # what the reserve leaves too little for: the KV cache the torch engine allocates up front
    assert f"the torch engine allocates up front ((4 + 1) x ({tightest} + 1) positions" in problem.message
    assert "--max-num-seqs 4, from engine.extraArgs" in problem.message
    assert "remove experts" in problem.fix
