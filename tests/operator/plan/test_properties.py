"""Property tests: for any valid spec, the plan's device count and expert ownership add up."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.plan.model import Plan, RolePlan
from kubemoe_operator.plan.planner import plan_manifest


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fits_pods(ranks: int, per_pod: int) -> bool:
    return ranks <= per_pod or ranks % per_pod == 0


@st.composite
def roles(draw: st.DrawFn, *, heads: int, kv: int, experts: int, per_pod: int) -> dict[str, Any]:
    tensors = [d for d in _divisors(per_pod) if heads % d == 0 and (kv % d == 0 or d % kv == 0)]
    tp = draw(st.sampled_from(tensors))
    ep_on = draw(st.booleans())
    datas = [d for d in range(1, 33) if experts % (d * tp) == 0 and _fits_pods(d * tp, per_pod)]
    ep_on = ep_on and bool(datas)
    if not ep_on:
        datas = [d for d in range(1, 9) if _fits_pods(d * tp, per_pod)]
    data = draw(st.sampled_from(datas))
    parallelism: dict[str, int] = {"tensor": tp, "data": data}
    if not ep_on:
        parallelism["expert"] = 1
    elif draw(st.booleans()):
        parallelism["expert"] = data * tp
    return {
        "replicas": draw(st.integers(1, 3)),
        "parallelism": parallelism,
        "resources": {"requests": {"memory": "64Gi"}},
    }


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    per_pod = draw(st.sampled_from([1, 2, 4, 8]))
    heads = draw(st.sampled_from([4, 8, 16, 32]))
    kv = draw(st.sampled_from(_divisors(heads)))
    experts = draw(st.sampled_from([4, 8, 16, 64, 256]))
    colocated = draw(st.booleans())
    role = roles(heads=heads, kv=kv, experts=experts, per_pod=per_pod)
    spec_roles = {"worker": draw(role)} if colocated else {"prefill": draw(role), "decode": draw(role)}
    return {
        "apiVersion": "kubemoe.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "prop"},
        "spec": {
            "model": {
                "name": "prop/moe",
                "source": "file:///models/prop",
                "config": {
                    "numLayers": 2,
                    "hiddenSize": 64,
                    "numAttentionHeads": heads,
                    "numKeyValueHeads": kv,
                    "headDim": 16,
                    "numRoutedExperts": experts,
                    "expertsPerToken": min(2, experts),
                    "moeIntermediateSize": 32,
                    "vocabSize": 256,
                    "maxPositionEmbeddings": 256,
                    "dtype": "float32",
                },
            },
            "engine": {"kind": "vllm"},  # every layout (the torch engine has no TP, and DP only with EP)
            "accelerator": {"type": "H100", "perPod": per_pod},
            "serving": {"mode": "colocated" if colocated else "disaggregated"},
            "roles": spec_roles,
        },
    }


def _check_group(role: RolePlan, experts: int) -> None:
    ranks = [r for pod in role.pods for r in pod.ranks]
    assert sorted(r.rank for r in ranks) == list(range(role.ranks))
    assert role.ranks == role.data * role.tensor
    start = 0
    for pod in role.pods:
        assert pod.start_rank == start
        assert pod.devices == len(pod.ranks) == pod.data_local * role.tensor
        assert sorted(r.device for r in pod.ranks) == list(range(pod.devices))
        assert pod.command[pod.command.index("--tensor-parallel-size") + 1] == str(role.tensor)
        if role.data > 1:
            assert pod.command[pod.command.index("--data-parallel-size-local") + 1] == str(pod.data_local)
        start += pod.data_local
    assert start == role.data
    owners = [0] * experts
    for r in ranks:
        for e in range(r.first_expert, r.first_expert + r.expert_count):
            owners[e] += 1
    if role.expert_parallel:
        assert owners == [1] * experts  # every routed expert on exactly one rank of the group
        assert "--enable-expert-parallel" in role.pods[0].command
    else:
        assert owners == [len(ranks)] * experts  # every rank holds a 1/(data x tensor) slice of each


@settings(max_examples=60, deadline=None)
@given(manifests())
def test_any_valid_spec_plans_consistently(data: dict[str, Any]) -> None:
    plan: Plan = plan_manifest(parse_manifest(data))
    spec = data["spec"]
    experts, per_pod = spec["model"]["config"]["numRoutedExperts"], spec["accelerator"]["perPod"]
    assert {r.role for r in plan.roles} == set(spec["roles"])
    # One device per rank, no pod over the node's share, and the totals are what the roles ask for.
    assert plan.devices == sum(r.replicas * r.data * r.tensor for r in plan.roles)
    for role in plan.roles:
        asked = spec["roles"][role.role]
        assert role.replicas == asked.get("replicas", 1)
        assert all(pod.devices <= per_pod for pod in role.pods)
        assert (len(role.pods) > 1) == (role.workload == "LeaderWorkerSet")  # a multi-pod group is one LWS
        _check_group(role, experts)
    assert len(plan.layout.split()) == len(plan.roles)
