"""Shared paths and builders for the operator's unit tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError, Problem
from kubemoe_operator.api.resource import ModelDeployment
from kubemoe_operator.plan.model import Plan
from kubemoe_operator.plan.planner import plan_manifest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
INVALID = sorted((REPO / "examples" / "invalid").glob("*.yaml"))
GOLDEN = Path(__file__).resolve().parent / "golden"

BASE: dict[str, Any] = {
    "apiVersion": "kubemoe.io/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "t"},
    "spec": {
        "model": {"name": "Qwen/Qwen3-30B-A3B", "source": "hf://Qwen/Qwen3-30B-A3B"},
        "engine": {"maxModelLen": 8192},
        "accelerator": {"type": "H100", "perPod": 8},
        "roles": {
            "prefill": {"parallelism": {"data": 2}},
            "decode": {"parallelism": {"data": 4}},
        },
    },
}


def manifest(**spec_updates: Any) -> ModelDeployment:
    """BASE with top-level spec fields replaced."""
    data = copy.deepcopy(BASE)
    data["spec"].update(copy.deepcopy(spec_updates))
    return parse_manifest(data)


def pod_templates(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every pod template of rendered children: Deployments', and LeaderWorkerSets' leader and worker."""
    out = []
    for obj in objs:
        if obj["kind"] == "Deployment":
            out.append(obj["spec"]["template"])
        if obj["kind"] == "LeaderWorkerSet":
            lwt = obj["spec"]["leaderWorkerTemplate"]
            out += [lwt["leaderTemplate"], lwt["workerTemplate"]]
    return out


def planned(data: dict[str, Any]) -> Plan:
    """The plan of manifest `data` (a dict as kubectl would send it)."""
    return plan_manifest(parse_manifest(data))


def refused(data: dict[str, Any]) -> list[Problem]:
    """The problems planning manifest `data` is refused with (it must be)."""
    with pytest.raises(ManifestError) as err:
        planned(data)
    return err.value.problems
