"""What the planner proposes on cpu for an engine whose CPU build runs no data or expert parallelism (vLLM:
EngineSupport.cpu_parallel, which api/engines.py `limit_problems` enforces on a given parallelism): the
layout it suggests for a role without parallelism, and the layouts a refusal's fix names, are ones that
rule admits: tensor parallelism alone, never data or EP. Engines that run expert parallelism on cpu (torch)
and vLLM on GPUs keep their expert-parallel suggestions."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from kubemoe_operator.api.engines import engine_problems, limit_problems
from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import Problem
from kubemoe_operator.render import Owner, render
from tests.operator.helpers import planned, pod_templates, refused

SPEC: dict[str, Any] = {
    "apiVersion": "kubemoe.io/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "qwen-cpu"},
    "spec": {
        "model": {"name": "Qwen/Qwen3-30B-A3B", "source": "pvc://models/Qwen3-30B-A3B"},
        "engine": {"kind": "vllm", "maxModelLen": 40960},
        "accelerator": {"type": "cpu", "perPod": 1},
        "serving": {"mode": "colocated"},
        "roles": {"worker": {"replicas": 1, "resources": {"requests": {"cpu": "8", "memory": "80Gi"}}}},
    },
}


def spec(
    *,
    memory: str = "80Gi",
    per_pod: int = 1,
    parallelism: dict[str, int] | None = None,
    kind: str = "vllm",
    accelerator: str = "cpu",
) -> dict[str, Any]:
    data = copy.deepcopy(SPEC)
    data["spec"]["engine"]["kind"] = kind
    data["spec"]["accelerator"] = {"type": accelerator, "perPod": per_pod}
    worker = data["spec"]["roles"]["worker"]
    worker["resources"]["requests"]["memory"] = memory
    if parallelism is not None:
        worker["parallelism"] = parallelism
    return data


def admitted(data: dict[str, Any], parallelism: dict[str, int]) -> list[Problem]:
    """limit_problems of `data` with the worker's parallelism set to `parallelism`."""
    given = copy.deepcopy(data)
    given["spec"]["roles"]["worker"]["parallelism"] = parallelism
    return limit_problems(parse_manifest(given).spec)


def proposed(fix: str) -> list[dict[str, int]]:
    """The parallelisms a fix names (`set parallelism {tensor: 1, data: 2}`)."""
    return [
        {k: int(v) for k, v in re.findall(r"(\w+): (\d+)", body)}
        for body in re.findall(r"set parallelism \{([^}]*)\}", fix)
    ]


# -- a role without parallelism --------------------------------------------------------------------------


@pytest.mark.parametrize("per_pod", [1, 2, 4])
def test_vllm_on_cpu_is_suggested_no_data_nor_expert_parallelism(per_pod: int) -> None:
    data = spec(memory="200Gi", per_pod=per_pod)
    plan = planned(data)
    role = plan.role("worker")
    assert role.suggested
    assert (role.data, role.expert_parallel) == (1, False)
    assert plan.layout == "W1x(EP1)"
    # the layout it suggests is one the engine's rule admits, and its pods ask for neither
    assert admitted(data, {"tensor": role.tensor, "data": role.data, "expert": role.expert}) == []
    assert engine_problems(parse_manifest(data).spec) == []
    for pod in role.pods:
        assert "--enable-expert-parallel" not in pod.command
        assert "--data-parallel-size" not in pod.command
    md = parse_manifest(data)
    objs = render(spec=md.spec, plan=plan, owner=Owner(name="qwen-cpu", namespace="ns", uid="u"), image="i")
    for template in pod_templates(objs):
        for container in template["spec"]["containers"]:
            assert "--enable-expert-parallel" not in container.get("args", []) + container.get("command", [])
    (note,) = [n for n in plan.notes if "parallelism suggested" in n]
    assert "smallest tensor-parallel size within one pod" in note
    assert "engine vllm runs neither on accelerator.type cpu" in note
    assert "EP" not in note


def test_vllm_on_cpu_that_nothing_fits_is_refused_without_proposing_data_or_ep() -> None:
    """The report's manifest: 80Gi pods, maxModelLen 40960: once planned as W1x(EP2), data parallel 2."""
    (problem,) = refused(spec())
    assert problem.field == "spec.roles.worker.parallelism"
    assert "engine vllm on accelerator.type cpu runs no data or expert parallelism" in problem.message
    assert "raise spec.roles.worker.resources.requests.memory (now 80Gi" in problem.fix
    assert "engine.kind torch" in problem.fix
    assert "EP" not in problem.fix
    assert proposed(problem.fix) == []


# -- the fixes of a given layout that does not fit -------------------------------------------------------


@pytest.mark.parametrize(("memory", "field"), [("66Gi", "spec.engine.maxModelLen"), ("50Gi", None)])
@pytest.mark.parametrize("per_pod", [1, 4])
def test_vllm_on_cpu_hints_propose_no_data_or_ep(memory: str, field: str | None, per_pod: int) -> None:
    data = spec(memory=memory, per_pod=per_pod, parallelism={"tensor": 1, "data": 1})
    (problem,) = refused(data)
    assert problem.field == (field or "spec.roles.worker.parallelism")
    assert "(EP" not in problem.fix
    assert "data:" not in problem.fix
    assert "(data or tensor)" not in problem.fix
    assert "use engine.kind torch (expert-parallel groups over several pods on cpu)" in problem.fix
    for par in proposed(problem.fix):
        assert admitted(data, par) == []


# -- unchanged where the engine runs expert parallelism -------------------------------------------------


def test_torch_on_cpu_is_still_suggested_expert_parallelism() -> None:
    plan = planned(spec(kind="torch"))
    role = plan.role("worker")
    assert role.suggested
    assert role.expert_parallel
    assert role.data == role.expert > 1


def test_vllm_on_gpus_is_still_suggested_expert_parallelism() -> None:
    data = spec(accelerator="L40S", per_pod=8)
    data["spec"]["model"]["source"] = "hf://Qwen/Qwen3-30B-A3B"
    del data["spec"]["roles"]["worker"]["resources"]
    role = planned(data).role("worker")
    assert role.suggested
    assert role.expert_parallel
    given = copy.deepcopy(data)
    given["spec"]["roles"]["worker"]["parallelism"] = {"tensor": 1, "data": 1}
    (problem,) = refused(given)
    assert problem.fix.startswith("set parallelism {tensor: 1, data: 2} (EP2)")  # one sequence: EP2 fits


# -- vLLM's CPU KV cache ---------------------------------------------------------------------------------


def _env(data: dict[str, Any]) -> dict[str, str]:
    md = parse_manifest(data)
    objs = render(
        spec=md.spec, plan=planned(data), owner=Owner(name="qwen-cpu", namespace="ns", uid="u"), image="i"
    )
    (engine,) = [c for t in pod_templates(objs) for c in t["spec"]["containers"] if c["name"] == "engine"]
    return {e["name"]: e.get("value", "") for e in engine["env"]}


def test_vllm_on_cpu_gets_the_plans_kv_budget_not_the_images_4_gib() -> None:
    """vLLM's CPU build sizes its KV cache by VLLM_CPU_KVCACHE_SPACE alone (the CPU image sets 4 GiB,
    whatever the pod's memory): before, the plan's budget and what vLLM allocated disagreed (a 2Gi pod got
    4 GiB of KV and ran out of memory; an 80Gi one was planned 14.9 GiB of KV and got 4)."""
    given = spec(parallelism={"tensor": 1})
    (role,) = planned(given).roles
    env = _env(given)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == str(int(role.memory.kv_budget_gib))
    assert int(env["VLLM_CPU_KVCACHE_SPACE"]) > 4
    torch = spec(kind="torch", memory="160Gi", parallelism={"tensor": 1})
    torch["spec"]["engine"]["maxModelLen"] = 4096
    assert "VLLM_CPU_KVCACHE_SPACE" not in _env(torch)  # the torch engine sizes its own


def test_vllm_on_cpu_with_under_a_gib_of_kv_budget_is_refused() -> None:
    """VLLM_CPU_KVCACHE_SPACE is whole GiB, at least 1: a budget under a GiB (that still holds one
    sequence of a short maxModelLen) would get a GiB, past the pod's memory."""

    def short(memory: str) -> dict[str, Any]:
        data = spec(memory=memory, parallelism={"tensor": 1})
        data["spec"]["engine"]["maxModelLen"] = 2048
        return data

    roomy = planned(short("80Gi")).roles[0].memory
    # the budget moves by the utilisation per GiB of the request: the request that leaves 0.6 GiB
    mib = round((80 - (roomy.kv_budget_gib - 0.6) / roomy.utilization) * 1024)
    (problem,) = refused(short(f"{mib}Mi"))
    assert problem.field == "spec.roles.worker.resources.requests.memory"
    assert "whole GiB" in problem.message
    assert "0.6" in problem.message
    assert planned(short(f"{mib + 1024}Mi")).roles[0].memory.kv_budget_gib >= 1
