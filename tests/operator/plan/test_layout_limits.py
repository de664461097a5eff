"""The limits a layout must meet, as the engines meet them: maxModelLen within the model's context, the
routed experts sharded over every rank of a group without expert parallelism (vLLM, SGLang), a tensor
group that leaves devices of its one pod unused, and, on cpu, the pod's memory request as the fix."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError, Problem
from kubemoe_operator.catalog import load_catalog, resolve_model
from kubemoe_operator.catalog.facts import DTYPE_BYTES, GIB
from kubemoe_operator.plan.model import Plan
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.helpers import BASE, REPO

MIXTRAL_8X22B = {
    "name": "mistralai/Mixtral-8x22B-Instruct-v0.1",
    "source": "hf://mistralai/Mixtral-8x22B-Instruct-v0.1",
}
MIXTRAL_8X7B = {
    "name": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "source": "hf://mistralai/Mixtral-8x7B-Instruct-v0.1",
}


def worker(model: dict[str, Any], parallelism: dict[str, int], **spec: Any) -> dict[str, Any]:
    """BASE as one colocated worker role of `model` with `parallelism`, on H100s."""
    data = copy.deepcopy(BASE)
    data["spec"].update(
        model=model,
        engine={"maxModelLen": 32768},
        serving={"mode": "colocated"},
        roles={"worker": {"parallelism": parallelism}},
    )
    data["spec"].update(copy.deepcopy(spec))
    return data


def planned(data: dict[str, Any]) -> Plan:
    return plan_manifest(parse_manifest(data))


def problems(data: dict[str, Any]) -> list[Problem]:
    with pytest.raises(ManifestError) as err:
        planned(data)
    return err.value.problems


def tiny(**engine: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "examples" / "tiny-moe.yaml").read_text())
    data["spec"]["engine"].update(engine)
    return data


# -- maxModelLen within the model's context length -----------------------------------------------------


def test_max_model_len_past_the_models_context_is_refused_naming_both() -> None:
    (problem,) = problems(tiny(maxModelLen=4096))  # tiny-qwen3-moe: maxPositionEmbeddings 512
    assert problem.field == "spec.engine.maxModelLen"
    assert "maxModelLen=4096" in problem.message
    assert "512 tokens" in problem.message
    assert "engine.maxModelLen <= 512" in problem.fix
    assert "spec.model.config.maxPositionEmbeddings" in problem.fix  # rope scaling: say the longer context


def test_max_model_len_up_to_the_context_or_a_longer_stated_context_plans() -> None:
    assert planned(tiny(maxModelLen=512)).roles[0].memory.max_model_len == 512
    longer = tiny(maxModelLen=1024)
    longer["spec"]["model"]["config"]["maxPositionEmbeddings"] = 1024
    assert planned(longer).roles[0].memory.max_model_len == 1024
    left_out = tiny()
    del left_out["spec"]["engine"]["maxModelLen"]
    assert planned(left_out).roles[0].memory.max_model_len == 512  # the default: the context length


# -- experts without expert parallelism: sharded over data x tensor ------------------------------------


@pytest.mark.parametrize("engine", [{"kind": "vllm"}, {"kind": "sglang", "image": "lmsysorg/sglang:v0.5.2"}])
def test_without_ep_the_experts_are_split_over_every_rank_of_the_group(engine: dict[str, str]) -> None:
    """vLLM flattens TP across DP for the MoE layers when expert parallelism is off (and an SGLang group
    is one --tp-size data x tensor server): Mixtral-8x22B with {tensor 2, data 4, expert 1} holds 1/8 of
    the experts on each of the 8 ranks, as with EP8; it was sized as 1/2 and refused (131 GiB a rank)."""
    layout = {"tensor": 2, "data": 4}
    flat = planned(worker(MIXTRAL_8X22B, {**layout, "expert": 1}, engine={**engine, "maxModelLen": 32768}))
    ep = planned(worker(MIXTRAL_8X22B, layout, engine={**engine, "maxModelLen": 32768}))
    role, ep_role = flat.role("worker"), ep.role("worker")
    assert not role.expert_parallel
    assert ep_role.expert_parallel
    facts = resolve_model(parse_manifest(worker(MIXTRAL_8X22B, layout)).spec.model, load_catalog())
    per_rank = facts.routed_params * DTYPE_BYTES[facts.expert_weight_dtype] / 8 / GIB
    assert role.memory.expert_weights_gib == pytest.approx(per_rank, abs=1e-3)
    assert role.memory.expert_weights_gib == pytest.approx(ep_role.memory.expert_weights_gib, abs=1e-3)
    assert role.memory.weights_gib < 40


def test_a_layout_without_ep_that_does_not_fit_names_its_data_x_tensor_shards() -> None:
    (problem,) = problems(
        worker(
            MIXTRAL_8X22B, {"tensor": 1, "data": 2, "expert": 1}, accelerator={"type": "H100", "perPod": 2}
        )
    )
    assert problem.field == "spec.roles.worker.parallelism"
    assert "experts / DP2xTP1" in problem.message


# -- a tensor group within one pod, perPod not a multiple of it -----------------------------------------


def test_a_group_within_one_pod_need_not_divide_per_pod() -> None:
    role = planned(
        worker(MIXTRAL_8X7B, {"tensor": 4, "data": 1, "expert": 1}, accelerator={"type": "H100", "perPod": 6})
    ).role("worker")
    assert (role.pods_per_group, role.devices_per_pod, role.tensor) == (1, 4, 4)
    assert role.pods[0].command[role.pods[0].command.index("--tensor-parallel-size") + 1] == "4"


def test_a_group_over_several_pods_still_needs_whole_tensor_groups_in_each() -> None:
    found = problems(
        worker(MIXTRAL_8X7B, {"tensor": 4, "data": 3, "expert": 1}, accelerator={"type": "H100", "perPod": 6})
    )
    (problem,) = [p for p in found if p.field == "spec.roles.worker.parallelism.tensor"]
    assert "spans pods" in problem.message
    assert "whole tensor-parallel groups of 4" in problem.message
    assert "within one pod" in problem.fix
    assert "[1, 2]" in problem.fix


# -- cpu: the fix is the pod's memory request -----------------------------------------------------------


def test_a_cpu_role_left_to_the_planner_without_memory_asks_for_it() -> None:
    data = tiny()
    decode = data["spec"]["roles"]["decode"]
    del decode["parallelism"]
    decode["resources"] = {"requests": {"cpu": "1"}}
    (problem,) = problems(data)
    assert problem.field == "spec.roles.decode.resources.requests.memory"
    assert "spec.roles.decode.resources.requests.memory" in problem.fix


@pytest.mark.parametrize("parallelism", [None, {"tensor": 1, "data": 2}])
def test_too_little_cpu_memory_says_raise_the_memory_request(parallelism: dict[str, int] | None) -> None:
    data = tiny()
    decode = data["spec"]["roles"]["decode"]
    decode.pop("parallelism")
    if parallelism is not None:
        decode["parallelism"] = parallelism
    decode["resources"] = {"requests": {"cpu": "1", "memory": "200Mi"}}
    (problem,) = problems(data)
    assert problem.field == "spec.roles.decode.parallelism"
    assert "raise spec.roles.decode.resources.requests.memory (now 200Mi" in problem.fix
    assert "tensor > 1" not in problem.fix  # the torch engine has no tensor parallelism
    assert "accelerator" not in problem.fix
