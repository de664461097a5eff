"""spec.experts on vLLM: its expert load balancer's (EPLB's) memory, the interval it is rendered with, and
what vLLM cannot do (EPLB on cpu), refused naming spec.experts."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from kubemoe_operator.api.manifest import load_manifest, parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.api.resource import ModelDeployment
from kubemoe_operator.plan.model import Plan
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.helpers import BASE, REPO, manifest
from tests.operator.plan.test_torch_staging import torch_longest

GIB = 1024**3
# --max-num-seqs 4: the KV cache the torch engine allocates up front, (4 + 1) x (8192 + 1) positions a rank
# (sizing.TorchKv), fits BASE's ranks beside the staging reserve of its rebalances (16, the default, not)
TORCH = {"kind": "torch", "maxModelLen": 8192, "extraArgs": ["--max-num-seqs", "4"]}


def planned_torch(**spec: object) -> Plan:
    """BASE (Qwen3-30B-A3B on H100, hf://) planned for the torch engine, the admission table's rules
    (torch: cpu and pvc:// or file:// only, api/engines.py) skipped: the planner's memory sums only."""
    data = copy.deepcopy(BASE)
    data["spec"].update(copy.deepcopy(spec))
    data["spec"]["engine"] = {**TORCH, **data["spec"].get("engine", {})}
    return plan_manifest(ModelDeployment.model_validate(data))


# BASE's model, Qwen3-30B-A3B (its config.json): 48 layers, every one MoE, 128 routed experts of a gated
# FFN 2048 -> 768 -> 2048, bf16.
LAYERS, EXPERTS, EXPERT_BYTES = 48, 128, 3 * 2048 * 768 * 2


def planned(**spec: Any) -> Plan:
    return plan_manifest(manifest(**spec))


def expected_buffers_gib(*, ep: int, redundant: int) -> float:
    """vLLM's eplb_state.py: one MoE layer of the rank's expert slots (expert_buffer), and an int32
    load per physical expert and MoE layer for 1000 window steps plus the current one."""
    physical = EXPERTS + redundant
    return (physical // ep * EXPERT_BYTES + 1001 * LAYERS * physical * 4) / GIB


def test_vllm_roles_count_the_balancers_buffers_and_torch_roles_do_not() -> None:
    vllm, torch = planned(experts={"redundant": 8}), planned_torch(experts={"redundant": 8})
    for name, ep in (("prefill", 2), ("decode", 4)):
        v, t = vllm.role(name).memory, torch.role(name).memory
        assert t.eplb_buffers_gib == 0
        assert v.eplb_buffers_gib == pytest.approx(expected_buffers_gib(ep=ep, redundant=8), abs=1e-4)
        assert v.redundant_weights_gib == t.redundant_weights_gib > 0  # the copies, on either engine
        assert v.weights_gib == t.weights_gib  # the buffers are not weights...
        staged = (
            t.reserve_gib - v.reserve_gib
        )  # torch reserves its rebalances' staging (test_torch_staging.py)
        assert v.kv_budget_gib == pytest.approx(
            t.kv_budget_gib + staged - v.eplb_buffers_gib, abs=1e-3
        )  # ...but cost KV


def test_the_balancer_runs_without_redundant_slots_too() -> None:
    """experts: {} on vLLM rearranges the experts it has (no copies): buffers, no redundant weights."""
    plain, balanced = planned(), planned(experts={})
    for name, ep in (("prefill", 2), ("decode", 4)):
        mem = balanced.role(name).memory
        assert mem.redundant_weights_gib == 0
        assert mem.eplb_buffers_gib == pytest.approx(expected_buffers_gib(ep=ep, redundant=0), abs=1e-4)
        assert balanced.role(name).pods == plain.role(name).pods  # render adds the flags, not the plan


def test_a_role_without_expert_parallelism_gets_no_balancer() -> None:
    p = planned(
        roles={"prefill": {"parallelism": {"data": 2, "expert": 1}}, "decode": {"parallelism": {"data": 4}}},
        experts={"redundant": 4},
    )
    assert p.role("prefill").memory.eplb_buffers_gib == 0
    assert p.role("decode").memory.eplb_buffers_gib > 0
    assert not any(n.startswith("prefill: vLLM balances") for n in p.notes)
    assert any(n.startswith("decode: vLLM balances") for n in p.notes)


@pytest.mark.parametrize(("interval", "steps"), [(None, 3000), (120, 600), (3600, 18000)])
def test_the_note_gives_the_interval_in_vllms_engine_steps(interval: int | None, steps: int) -> None:
    rebalance = {} if interval is None else {"intervalSeconds": interval}
    p = planned(experts={"redundant": 8, "rebalance": rebalance})
    (note,) = [n for n in p.notes if n.startswith("decode: vLLM balances")]
    assert f"every {steps} engine steps" in note
    assert f"intervalSeconds={interval or 600}" in note
    assert "minImprovement does not apply" in note
    assert not any("vLLM balances" in n for n in planned_torch(experts={"redundant": 8}).notes)


def test_buffers_that_leave_no_sequence_of_kv_are_refused_naming_spec_experts() -> None:
    plain = planned()
    tightest = min(r.memory.kv_tokens for r in plain.roles)  # fits without the buffers, exactly
    # a context that long (rope scaling, say): maxModelLen may not pass the model's context length
    model = {**BASE["spec"]["model"], "config": {"maxPositionEmbeddings": tightest}}
    planned(engine={"maxModelLen": tightest}, model=model)
    with pytest.raises(ManifestError) as err:
        planned(engine={"maxModelLen": tightest}, experts={}, model=model)
    (problem,) = err.value.problems
    assert problem.field == "spec.experts"
    assert "vLLM's expert load balancing (EPLB)" in problem.message
    assert f"less than one sequence of maxModelLen={tightest}" in problem.message
    assert "remove experts" in problem.fix
    # torch has no such buffers, but stages its rebalances' experts, refused likewise (test_torch_staging.py),
    # at the longest maxModelLen its KV cache, allocated up front, fits without them
    longest = torch_longest()
    model = {**BASE["spec"]["model"], "config": {"maxPositionEmbeddings": longest}}
    planned_torch(engine={"maxModelLen": longest}, model=model)
    with pytest.raises(ManifestError) as err:
        planned_torch(engine={"maxModelLen": longest}, experts={}, model=model)
    (problem,) = err.value.problems
    assert problem.field == "spec.experts"
    assert "the torch engine stages" in problem.message


def tiny(**engine: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "examples" / "tiny-moe.yaml").read_text())
    data["spec"]["engine"].update(engine)
    return data


def test_vllm_balancing_on_cpu_is_refused_and_torchs_plans() -> None:
    """vLLM's CPU build runs no expert parallelism at all (api/rules.py refuses the layout before the
    planner's spec.experts check could), so balancing experts on cpu is the torch engine's."""
    data = tiny(kind="vllm")
    data["spec"]["experts"] = {"redundant": 2}
    with pytest.raises(ManifestError) as err:
        parse_manifest(data)
    assert {p.field for p in err.value.problems} == {"spec.roles.decode.parallelism.data"}
    assert "engine.kind torch" in err.value.problems[0].fix
    torch = tiny()
    torch["spec"]["experts"] = {"redundant": 2}
    assert plan_manifest(parse_manifest(torch)).role("decode").slots_per_rank == 5  # 8/2 + 2/2

    no_ep = copy.deepcopy(data)  # nothing to balance: vLLM's EPLB is never turned on (on GPUs)
    no_ep["spec"]["accelerator"] = {"type": "H100", "perPod": 8}
    no_ep["spec"]["roles"]["decode"]["parallelism"] = {"tensor": 1, "data": 2, "expert": 1}
    no_ep["spec"]["experts"] = {}
    assert not plan_manifest(parse_manifest(no_ep)).role("decode").expert_parallel


def test_the_example_plans_with_its_copies_and_buffers() -> None:
    p = plan_manifest(load_manifest(REPO / "examples" / "experts-redundant.yaml"))
    for role in p.roles:
        assert (role.expert, role.redundant_experts, role.slots_per_rank) == (16, 32, 18)
        assert role.memory.redundant_weights_gib > 4  # two DeepSeek-V3 experts of 58 fp8 layers
        assert 0.5 < role.memory.eplb_buffers_gib < 1.5
