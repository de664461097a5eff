"""The plan's per-pod CPU, memory and /dev/shm (host_sizing), and the accelerator's node label."""

from __future__ import annotations

from kubemoe_operator.api.pod_template import Resources
from kubemoe_operator.api.spec import AcceleratorSpec, RoleSpec
from kubemoe_operator.catalog import load_catalog, resolve_gpu
from kubemoe_operator.plan.host_sizing import host_plan
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.helpers import manifest

H100 = resolve_gpu(AcceleratorSpec(type="H100"), load_catalog())
CPU = resolve_gpu(AcceleratorSpec(type="cpu"), load_catalog())


def test_gpu_pods_get_cpu_and_memory_per_gpu_with_shm_inside_the_memory() -> None:
    host = host_plan(role=RoleSpec(), gpu=H100, devices_per_pod=8)
    assert (host.cpu, host.memory, host.shm) == ("32", "136Gi", "8Gi")


def test_cpu_pods_get_a_core_per_rank_and_the_users_memory() -> None:
    role = RoleSpec(resources=Resources(requests={"memory": "3Gi"}))
    host = host_plan(role=role, gpu=CPU, devices_per_pod=2)
    assert (host.cpu, host.memory, host.shm) == ("2", "3Gi", "1Gi")
    limited = RoleSpec(resources=Resources(limits={"memory": "5Gi"}))
    assert host_plan(role=limited, gpu=CPU, devices_per_pod=1).memory == "5Gi"


def test_the_specs_cpu_and_memory_requests_override_the_plan() -> None:
    role = RoleSpec(resources=Resources(requests={"cpu": 6, "memory": "40Gi"}))
    host = host_plan(role=role, gpu=H100, devices_per_pod=2)
    assert (host.cpu, host.memory, host.shm) == ("6", "40Gi", "2Gi")


def test_plan_names_the_product_label_of_the_accelerator() -> None:
    plan = plan_manifest(manifest())
    assert plan.node_label == "nvidia.com/gpu.product"
    assert plan.node_label_values == ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe"]
    exact = plan_manifest(manifest(accelerator={"type": "nvidia-h100-pcie", "perPod": 8}))
    assert exact.node_label_values == ["NVIDIA-H100-PCIe"]


def test_an_uncatalogued_gpu_gets_no_label_and_a_note_saying_so() -> None:
    plan = plan_manifest(manifest(accelerator={"type": "GH200", "perPod": 8, "memoryGiB": 96}))
    assert plan.node_label is None
    assert plan.node_label_values == []
    assert any("scheduling.nodeSelector" in note for note in plan.notes)
