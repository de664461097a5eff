"""`kubectl moe status` rendering, on fixed objects shaped like the operator's children."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.cli.moe_status import LWS_WORKER_INDEX, pod_ranks, render_status
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render.engines import any_sglang_worker

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _pod(
    name: str, *, role: str, group: str, args: list[str], ready: bool, node: str = "gpu-node-0"
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {"kubemoe.io/role": role, "kubemoe.io/group": group, "kubemoe.io/deployment": "ds"},
        },
        "spec": {
            "nodeName": node,
            "containers": [{"name": "engine", "command": ["kubemoe-runtime"], "args": args}],
        },
        "status": {"phase": "Running", "containerStatuses": [{"ready": ready}]},
    }


def test_pod_ranks_from_the_rendered_command_line() -> None:
    assert pod_ranks(["serve", "--data-parallel-size", "16", "--data-parallel-size-local", "8"]) == "0-7"
    assert pod_ranks(["--data-parallel-size-local", "8", "--data-parallel-start-rank", "8"]) == "8-15"
    assert pod_ranks(["--data-parallel-size-local=1", "--data-parallel-start-rank=3"]) == "3"
    assert pod_ranks(["serve", "--model", "/m"]) == "0"


def test_pod_ranks_of_an_sglang_group_over_two_pods() -> None:
    """The rendered templates of examples/engines/sglang-deepseek-v3.yaml (DP16 attention over two
    pods): before, every pod showed rank 0, and `kubectl moe logs --rank 8` found no pod."""
    md = yaml.safe_load((EXAMPLES / "engines" / "sglang-deepseek-v3.yaml").read_text())
    plan = plan_manifest(parse_manifest(md))
    shown = set()
    for role in plan.roles:
        argv = list(role.pods[0].command)
        leader = pod_ranks(argv, {LWS_WORKER_INDEX: "0"})
        worker_argv = list(any_sglang_worker(role.pods[1]).command)
        worker = pod_ranks(worker_argv, {LWS_WORKER_INDEX: "1"})
        shown.add((role.role, leader, worker))
    assert shown == {("prefill", "0-7", "8-15"), ("decode", "0-7", "8-15")}, shown
    assert pod_ranks(["--attn-dp-size", "4", "--nnodes", "2", "--node-rank", "$(LWS_WORKER_INDEX)"]) == "?"


def test_status_report_shows_roles_ranks_readiness_autoscaling_and_endpoint() -> None:
    md = {
        "metadata": {"name": "ds", "namespace": "prod", "generation": 3},
        "spec": {
            "model": {"name": "deepseek-ai/DeepSeek-V3"},
            "roles": {"decode": {"autoscaling": {"minReplicas": 1, "maxReplicas": 4}}, "prefill": {}},
        },
        "status": {
            "observedGeneration": 3,
            "phase": "Progressing",
            "layout": "P1x(EP16) D2x(EP16)",
            "endpoint": "http://ds.prod.svc:8000/v1",
            "roles": {
                "decode": {"replicas": 1, "ready": 1, "desired": 2},
                "prefill": {"replicas": 1, "ready": 0},
            },
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "GroupsNotReady",
                    "message": "prefill: 0/1 groups",
                }
            ],
        },
    }
    pods = [
        _pod(
            "ds-decode-0-1",
            role="decode",
            group="0",
            ready=True,
            args=["--data-parallel-size-local", "8", "--data-parallel-start-rank", "8"],
        ),
        _pod(
            "ds-decode-0",
            role="decode",
            group="0",
            ready=True,
            args=["--data-parallel-size-local", "8", "--data-parallel-start-rank", "0"],
        ),
        _pod(
            "ds-prefill-0", role="prefill", group="0", ready=False, args=["--data-parallel-size-local", "8"]
        ),
    ]
    events = [
        {
            "reason": "Scaled",
            "message": "decode 1 -> 2: queue depth 12 > 4",
            "lastTimestamp": "2026-11-29T06:00:00Z",
        }
    ]
    out = render_status(md, pods, events)
    lines = out.splitlines()
    assert "ModelDeployment prod/ds  model deepseek-ai/DeepSeek-V3" in lines[0]
    assert "P1x(EP16) D2x(EP16)" in out
    assert "http://ds.prod.svc:8000/v1" in out
    rows = [line.split() for line in lines if line.startswith(("prefill", "decode"))]
    role_rows = {r[0]: r for r in rows if len(r) == 5}
    assert role_rows["decode"][:5] == ["decode", "1", "1", "2", "1..4"]
    assert role_rows["prefill"][:5] == ["prefill", "1", "0", "-", "off"]
    pod_lines = [r for r in rows if len(r) == 7]
    # prefill before decode; within a group, by first rank.
    assert [p[2] for p in pod_lines] == ["ds-prefill-0", "ds-decode-0", "ds-decode-0-1"]
    assert [p[3] for p in pod_lines] == ["0-7", "0-7", "8-15"]
    assert [p[4] for p in pod_lines] == ["0/1", "1/1", "1/1"]
    assert "GroupsNotReady" in out
    assert "decode 1 -> 2: queue depth 12 > 4" in out


def test_status_report_flags_an_unobserved_generation() -> None:
    md = {"metadata": {"name": "x", "generation": 5}, "spec": {}, "status": {"observedGeneration": 4}}
    out = render_status(md, [], [])
    assert "(generation 5, observed 4)" in out
    assert "no pods yet" in out
    assert "Autoscaler decisions: none yet" in out


def test_status_report_shows_the_model_cache_fill() -> None:
    message = "filling the model cache in claim c (Job j): 3.0 GiB of 12.0 GiB (25%), 3/9 files"
    cache = {"phase": "Filling", "message": message}
    md = {"metadata": {"name": "x"}, "spec": {}, "status": {"cache": cache}}
    assert f"  cache:    Filling: {message}" in render_status(md, [], []).splitlines()
    assert "cache:" not in render_status({"metadata": {"name": "x"}, "spec": {}, "status": {}}, [], [])
