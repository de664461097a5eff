"""Specs the schema admits but no pod could serve as asked, refused naming the field and the fix
(api/engines.py `limit_problems`, api/rules.py `gpu_metric_problems`; Python only: the API server admits
them, the operator reports Planned=False, `kubemoe plan` refuses them):

- gpu-utilization on an accelerator without NVML (AMD, cpu): the metric is never there, and a missing
  metric never scales the role down;
- engine vllm on cpu with data or expert parallelism: vLLM's CPU build has no all_gatherv, so the group
  comes up Ready, then dies on its first request;
- the example connector outside `kubemoe up`: its KV directory is /tmp, each pod's own.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from kubemoe_operator.api.manifest import load_manifest, parse_manifest
from kubemoe_operator.api.problems import ManifestError, Problem
from kubemoe_operator.api.rules import NON_NVIDIA_TYPES, device_resource
from kubemoe_operator.api.spec import AcceleratorSpec
from kubemoe_operator.catalog import load_catalog, resolve_gpu
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.helpers import BASE, REPO

CPU_ROLE = {"resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}


def _spec(**updates: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["spec"].update(copy.deepcopy(updates))
    return data


def _refused(data: dict[str, Any]) -> list[Problem]:
    with pytest.raises(ManifestError) as err:
        parse_manifest(data)
    for problem in err.value.problems:
        assert problem.field.startswith("spec.")
        assert problem.message
        assert problem.fix
    return err.value.problems


def _decode_autoscaling(*metrics: str) -> dict[str, Any]:
    return {
        "prefill": {"parallelism": {"data": 2}},
        "decode": {
            "parallelism": {"data": 4},
            "autoscaling": {"maxReplicas": 4, "metrics": [{"type": m, "target": 0.5} for m in metrics]},
        },
    }


@pytest.mark.parametrize("accelerator", ["MI300X", "AMD_Instinct_MI300X", "cpu"])
def test_gpu_utilization_is_refused_without_nvml(accelerator: str) -> None:
    roles = _decode_autoscaling("kv-cache-usage", "gpu-utilization")
    if accelerator == "cpu":  # and no data parallelism: vLLM's CPU build has none
        roles = {name: {**role, **CPU_ROLE, "parallelism": {"data": 1}} for name, role in roles.items()}
    (problem,) = _refused(_spec(accelerator={"type": accelerator, "perPod": 8}, roles=roles))
    assert problem.field == "spec.roles.decode.autoscaling.metrics[1].type"
    assert accelerator in problem.message
    assert "NVIDIA" in problem.message
    assert "itl-p90" in problem.fix


def test_gpu_utilization_stays_on_nvidia_gpus_and_types_the_catalog_lacks() -> None:
    roles = _decode_autoscaling("gpu-utilization")
    plan_manifest(parse_manifest(_spec(roles=roles)))  # H100
    plan_manifest(parse_manifest(_spec(roles=roles, accelerator={"type": "GH200", "memoryGiB": 96})))


def test_the_nvml_less_types_are_the_catalogs_non_nvidia_ones() -> None:
    for gpu in load_catalog().gpus:
        names = {gpu.name.lower(), *(label.lower() for label in gpu.product_labels)}
        nvidia = gpu.resource == "nvidia.com/gpu"
        assert nvidia == names.isdisjoint(NON_NVIDIA_TYPES), gpu.name


@pytest.mark.parametrize(
    ("accelerator", "resource"),
    [
        ({"type": "MI325X", "memoryGiB": 256, "resource": "amd.com/gpu"}, "amd.com/gpu"),
        ({"type": "Gaudi3", "memoryGiB": 128, "resource": "habana.ai/gaudi"}, "habana.ai/gaudi"),
        ({"type": "H100", "resource": "nvidia.com/mig-3g.40gb"}, "nvidia.com/mig-3g.40gb"),
    ],
)
def test_gpu_utilization_is_refused_on_any_device_resource_but_nvidia_gpus(
    accelerator: dict[str, Any], resource: str
) -> None:
    roles = _decode_autoscaling("gpu-utilization")
    (problem,) = _refused(_spec(accelerator={**accelerator, "perPod": 8}, roles=roles))
    assert problem.field == "spec.roles.decode.autoscaling.metrics[0].type"
    assert accelerator["type"] in problem.message
    assert resource in problem.message
    assert "nvidia.com/gpu" in problem.message
    assert "itl-p90" in problem.fix


def test_gpu_utilization_follows_the_resolved_resource_not_the_type_name() -> None:
    roles = _decode_autoscaling("gpu-utilization")
    plan_manifest(
        parse_manifest(_spec(roles=roles, accelerator={"type": "H100", "resource": "nvidia.com/gpu"}))
    )
    unknown = {"type": "MI325X", "memoryGiB": 256}  # no resource given: its pods request nvidia.com/gpu
    plan_manifest(parse_manifest(_spec(roles=roles, accelerator=unknown)))


@pytest.mark.parametrize("resource", [None, "nvidia.com/gpu", "amd.com/gpu", "habana.ai/gaudi"])
def test_the_rules_device_resource_is_the_one_the_planner_resolves(resource: str | None) -> None:
    catalog = load_catalog()
    types = ["GH200", "MI325X"] + [n for g in catalog.gpus for n in (g.name, *g.product_labels)]
    for name in types + [t.upper() for t in types]:
        spec = AcceleratorSpec(type=name, memory_gib=80, resource=resource)
        if resource is not None and name.lower() == "cpu":
            continue  # refused by resolve_gpu: cpu requests no device
        assert device_resource(spec) == resolve_gpu(spec, catalog).resource, name


def _tiny_vllm(**decode: Any) -> dict[str, Any]:
    """examples/tiny-moe.yaml on the vllm engine."""
    data: dict[str, Any] = yaml.safe_load((REPO / "examples" / "tiny-moe.yaml").read_text())
    data["spec"]["engine"]["kind"] = "vllm"
    data["spec"]["roles"]["decode"]["parallelism"] = decode
    return data


@pytest.mark.parametrize(
    ("parallelism", "field"),
    [
        ({"tensor": 1, "data": 2, "expert": 2}, "data"),
        ({"tensor": 1, "data": 2, "expert": 1}, "data"),
        ({"tensor": 2, "data": 1}, "expert"),  # expert defaults to data x tensor
    ],
)
def test_vllm_on_cpu_runs_no_data_or_expert_parallelism(parallelism: dict[str, int], field: str) -> None:
    data = _tiny_vllm(**parallelism)
    data["spec"]["accelerator"]["perPod"] = 2
    (problem,) = _refused(data)
    assert problem.field == f"spec.roles.decode.parallelism.{field}"
    assert "all_gatherv" in problem.message
    assert "engine.kind torch" in problem.fix
    assert "data: 1 and expert: 1" in problem.fix


def test_vllm_on_cpu_with_one_rank_or_tensor_alone_and_torch_with_ep_are_admitted() -> None:
    for parallelism in ({"tensor": 1, "data": 1, "expert": 1}, {"tensor": 2, "data": 1, "expert": 1}):
        data = _tiny_vllm(**parallelism)
        data["spec"]["accelerator"]["perPod"] = 2
        parse_manifest(data)
    load_manifest(REPO / "examples" / "tiny-moe.yaml")  # torch: data 2, expert 2 on cpu
    gpu = _spec(roles={"prefill": {"parallelism": {"data": 2}}, "decode": {"parallelism": {"data": 4}}})
    parse_manifest(gpu)  # vllm, data and expert parallelism on H100


@pytest.mark.parametrize("source", ["hf://Qwen/Qwen3-30B-A3B", "pvc://models/qwen3", "s3://bucket/qwen3"])
def test_the_example_connector_is_refused_outside_kubemoe_up(source: str) -> None:
    data = _spec(model={"name": "Qwen/Qwen3-30B-A3B", "source": source})
    data["spec"]["serving"] = {"mode": "disaggregated", "kvTransfer": {"connector": "example"}}
    (problem,) = _refused(data)
    assert problem.field == "spec.serving.kvTransfer.connector"
    assert "/tmp" in problem.message
    assert "kubemoe up" in problem.message
    assert "nixl" in problem.fix


def test_kubemoe_ups_example_connector_and_the_torch_engines_stay() -> None:
    local = _tiny_vllm(tensor=1, data=1, expert=1)  # file:// source: `kubemoe up`
    assert parse_manifest(local).spec.serving.kv_transfer.connector == "example"
    torch_elsewhere = yaml.safe_load((REPO / "examples" / "tiny-moe.yaml").read_text())
    torch_elsewhere["spec"]["model"]["source"] = "pvc://models/tiny"  # torch ignores the connector
    parse_manifest(torch_elsewhere)
    colocated = _spec(
        serving={"mode": "colocated", "kvTransfer": {"connector": "example"}},
        roles={"worker": {"parallelism": {"data": 2}}},
    )
    parse_manifest(colocated)  # no hand-off, nothing to refuse
