"""Simulated GPU nodes: Node objects that kwok keeps Ready and whose capacity the scheduler honours."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GpuNodes:
    count: int = 4
    gpus_per_node: int = 8
    gpu_product: str = "NVIDIA-H200"
    gpu_memory_mib: int = 143771
    cpu: str = "128"
    memory: str = "2Ti"
    name_prefix: str = "gpu-node"


def node_manifests(spec: GpuNodes) -> list[dict[str, Any]]:
    """Node objects for one pool; gpus_per_node=0 makes plain CPU nodes (no GPU resource or labels)."""
    resources = {"cpu": spec.cpu, "memory": spec.memory, "pods": "110"}
    gpu_labels = {}
    if spec.gpus_per_node:
        resources["nvidia.com/gpu"] = str(spec.gpus_per_node)
        # a shared RDMA device and the fabric label, as an InfiniBand cluster's GPU nodes carry them
        # (examples/wide-ep-rdma.yaml asks for both)
        resources["rdma/rdma_shared_device_a"] = "64"
        gpu_labels = {
            "network.example.com/fabric": "infiniband",
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": spec.gpu_product,
            "nvidia.com/gpu.memory": str(spec.gpu_memory_mib),
            "nvidia.com/gpu.count": str(spec.gpus_per_node),
        }
    nodes = []
    for i in range(spec.count):
        name = f"{spec.name_prefix}-{i}"
        nodes.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    # kwokctl's kwok controller manages nodes carrying this annotation.
                    "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "type": "kwok",
                        **gpu_labels,
                    },
                },
                "status": {"capacity": resources, "allocatable": resources},
            }
        )
    return nodes
