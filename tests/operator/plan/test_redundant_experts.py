"""spec.experts.redundant in the planner: extra expert slots per rank, their memory, refusals, the table."""

from __future__ import annotations

import copy

import pytest
import yaml

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.api.resource import ModelDeployment
from kubemoe_operator.cli.tables import render_table
from kubemoe_operator.plan.model import Plan
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.helpers import BASE, REPO, manifest

FIELD = "spec.experts.redundant"
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


def planned(**spec: object) -> Plan:
    return plan_manifest(manifest(**spec))


def refusal(**spec: object) -> ManifestError:
    with pytest.raises(ManifestError) as err:
        planned(**spec)
    return err.value


def test_absent_is_todays_layout() -> None:
    plain = planned()
    for role in plain.roles:
        assert role.redundant_experts == 0
        assert role.slots_per_rank == role.experts_per_rank
        assert role.memory.redundant_weights_gib == 0
    # redundant 0 by default: on the torch engine the layout and the weights do not change (only the
    # reserve for its rebalances' staging, test_torch_staging.py; on vLLM its balancer's buffers,
    # test_vllm_eplb.py)
    torch_plain, torch_balanced = planned_torch(), planned_torch(experts={})
    assert [r.pods for r in torch_balanced.roles] == [r.pods for r in torch_plain.roles]
    for plain_role, balanced_role in zip(torch_plain.roles, torch_balanced.roles, strict=True):
        assert balanced_role.slots_per_rank == plain_role.slots_per_rank
        assert balanced_role.memory.weights_gib == plain_role.memory.weights_gib
    assert "redundant" not in render_table(plain)


def test_redundant_slots_grow_each_ranks_experts() -> None:
    plain, extra = planned(), planned(experts={"redundant": 8})
    # BASE: Qwen3-30B-A3B (128 experts), prefill EP2, decode EP4
    for name, ep in (("prefill", 2), ("decode", 4)):
        before, after = plain.role(name), extra.role(name)
        assert after.redundant_experts == 8
        assert after.experts_per_rank == before.experts_per_rank == 128 // ep
        assert after.slots_per_rank == 128 // ep + 8 // ep
        per_expert = before.memory.expert_weights_gib / (128 // ep)
        assert after.memory.redundant_weights_gib == pytest.approx(per_expert * 8 / ep, abs=1e-3)
        assert after.memory.expert_weights_gib == pytest.approx(
            before.memory.expert_weights_gib + after.memory.redundant_weights_gib, abs=1e-3
        )
        # BASE runs vLLM, so spec.experts also turns on vLLM's balancer, whose buffers come from KV too
        assert before.memory.eplb_buffers_gib == 0
        assert after.memory.eplb_buffers_gib > 0
        assert after.memory.kv_budget_gib == pytest.approx(
            before.memory.kv_budget_gib - after.memory.redundant_weights_gib - after.memory.eplb_buffers_gib,
            abs=1e-3,
        )
        assert after.memory.kv_tokens < before.memory.kv_tokens
        # the ranks' own blocks, and so every pod's command, are today's (the engine is told later)
        assert after.pods == before.pods


def test_the_plan_table_shows_the_slots() -> None:
    table = render_table(planned(experts={"redundant": 8}))
    assert "EXPERTS/RANK" in table
    assert "64+4" in table
    assert "32+2" in table
    assert "in redundant slots)" in table
    # vLLM's EPLB buffers come out of the KV budget: the line says so, and its terms add up
    plan = planned(experts={"redundant": 8})
    decode = next(r for r in plan.roles if r.role == "decode")
    assert decode.memory.eplb_buffers_gib > 0
    assert "vLLM EPLB buffers = " in table
    assert "KV = memory x utilisation - reserve - weights - EPLB buffers." in table
    assert "vLLM EPLB buffers" not in render_table(planned_torch(experts={"redundant": 8}))
    assert "decode: 8 redundant expert slots per group, 34 expert slots per rank (32 own + 2 copies" in table


def test_not_a_multiple_of_every_ep_size_is_refused_per_role() -> None:
    err = refusal(experts={"redundant": 6})  # a multiple of prefill's EP2, not of decode's EP4
    assert [p.field for p in err.problems] == [FIELD]
    assert "EP=4 ranks of decode" in err.problems[0].message
    assert "multiple of 4" in err.problems[0].fix


@pytest.mark.parametrize("redundant", [16, 24])
def test_roles_of_different_ep_sizes_are_told_a_multiple_of_them_all(redundant: int) -> None:
    """Kimi-K2's prefill EP16 and decode EP24 share only multiples of 48: each role's refusal says so,
    instead of its own EP size (which the other role then refuses), and gives no example twice."""
    kimi = yaml.safe_load((REPO / "examples" / "kimi-k2.yaml").read_text())
    kimi["spec"]["roles"]["prefill"]["parallelism"] = {"data": 16}
    kimi["spec"]["roles"]["decode"]["parallelism"] = {"data": 24}
    kimi["spec"]["experts"] = {"redundant": redundant}
    with pytest.raises(ManifestError) as err:
        plan_manifest(parse_manifest(kimi))
    (problem,) = err.value.problems
    assert problem.field == FIELD
    assert "multiple of 48" in problem.fix
    assert "prefill EP16, decode EP24" in problem.fix
    assert problem.fix.endswith("e.g. 48 or 96.")
    kimi["spec"]["experts"] = {"redundant": 48}
    assert plan_manifest(parse_manifest(kimi)).role("decode").slots_per_rank == 384 // 24 + 2


def test_more_than_a_copy_of_everything_everywhere_is_refused() -> None:
    err = refusal(
        roles={"prefill": {"parallelism": {"data": 2}}, "decode": {"parallelism": {"data": 2}}},
        experts={"redundant": 130},
    )
    assert {p.field for p in err.problems} == {FIELD}
    assert "use at most 128" in err.problems[0].fix


def test_what_does_not_fit_is_refused_naming_the_field_and_the_most_that_fits() -> None:
    deepseek = (REPO / "examples" / "deepseek-v3.yaml").read_text()

    data = yaml.safe_load(deepseek)
    data["spec"]["experts"] = {"redundant": 512}
    with pytest.raises(ManifestError) as err:
        plan_manifest(parse_manifest(data))
    problems = err.value.problems
    assert {p.field for p in problems} == {FIELD}
    assert "32 more experts on each of the EP=16 ranks of prefill" in problems[0].message
    fix = problems[0].fix
    assert fix.startswith("set experts.redundant <= ")
    most = int(fix.removeprefix("set experts.redundant <= ").split()[0])
    assert most % 16 == 0
    assert 0 < most < 512
    data["spec"]["experts"] = {"redundant": most}
    fitted = plan_manifest(parse_manifest(data))  # the fix is true: the most that fits does
    assert fitted.role("decode").slots_per_rank == 16 + most // 16
    data["spec"]["experts"] = {"redundant": most + 16}
    with pytest.raises(ManifestError):
        plan_manifest(parse_manifest(data))


def test_roles_without_expert_parallelism_ignore_it_with_a_note() -> None:
    p = planned(
        roles={
            "prefill": {"parallelism": {"data": 2, "expert": 1}},  # experts sharded by TP: nothing to balance
            "decode": {"parallelism": {"data": 4}},
        },
        experts={"redundant": 4},
    )
    assert p.role("prefill").redundant_experts == 0
    assert p.role("prefill").slots_per_rank == p.role("prefill").experts_per_rank
    assert p.role("decode").redundant_experts == 4
    assert any("prefill: no expert parallelism" in n for n in p.notes)


def test_suggested_parallelism_shares_the_slots_evenly() -> None:
    p = planned(roles={"prefill": {}, "decode": {}}, experts={"redundant": 6})
    for role in p.roles:
        assert role.suggested
        assert not role.expert_parallel or 6 % role.expert == 0
