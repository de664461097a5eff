"""`kubectl moe` found and run by the real kubectl (plugin discovery on PATH) against the real apiserver.

The ModelDeployment's status is written through the status subresource by the test, as the
operator would, so this test depends only on the plugin and the API, not on the operator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from e2e.cluster.handle import Cluster
from e2e.waiting import eventually

REPO = Path(__file__).resolve().parents[1]


def _kubectl_with_plugin(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = cluster.env()
    # kubectl finds `kubectl-moe` on PATH, as it would in a user's shell after `pip install`.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        [str(cluster.bin_dir / "kubectl"), *args], env=env, capture_output=True, text=True, timeout=60
    )


def _pod(name: str, *, start: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {
                "kubemoe.io/deployment": "deepseek-v3",
                "kubemoe.io/role": "decode",
                "kubemoe.io/group": "0",
            },
        },
        "spec": {
            # On the H200 pool (gpu-node-*), as the real decode pods would be: the H100 and L40S
            # pools have 8-GPU nodes too.
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
            "containers": [
                {
                    "name": "engine",
                    "image": "example.invalid/kubemoe-runtime:0",
                    "command": ["kubemoe-runtime"],
                    "args": [
                        "serve",
                        "--data-parallel-size",
                        "16",
                        "--data-parallel-size-local",
                        "8",
                        "--data-parallel-start-rank",
                        str(start),
                    ],
                    "resources": {"limits": {"nvidia.com/gpu": 8}},
                }
            ],
        },
    }


def test_kubectl_moe_status_and_plan(crd_installed: Cluster, namespace: str) -> None:
    cluster = crd_installed
    cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples" / "deepseek-v3.yaml"))
    status = {
        "status": {
            "phase": "Progressing",
            "layout": "P1x(EP16) D1x(EP16)",
            "endpoint": f"http://deepseek-v3.{namespace}.svc:8000/v1",
            "roles": {"prefill": {"replicas": 1, "ready": 0}, "decode": {"replicas": 1, "ready": 1}},
        }
    }
    cluster.kubectl(
        "patch",
        "md",
        "deepseek-v3",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    docs = [_pod("deepseek-v3-decode-0", start=0), _pod("deepseek-v3-decode-0-1", start=8)]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(docs))

    def report() -> str:
        proc = _kubectl_with_plugin(cluster, "moe", "status", "deepseek-v3", "-n", namespace)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout if proc.stdout.count(" Running ") == 2 else ""

    out = eventually(report, timeout=60, what="both decode pods Running in `kubectl moe status`")
    assert f"ModelDeployment {namespace}/deepseek-v3  model deepseek-ai/DeepSeek-V3" in out
    assert f"http://deepseek-v3.{namespace}.svc:8000/v1" in out
    rows = {
        line.split()[2]: line.split()
        for line in out.splitlines()
        if line.startswith("decode ") and "-decode-" in line
    }
    assert rows["deepseek-v3-decode-0"][3] == "0-7"
    assert rows["deepseek-v3-decode-0-1"][3] == "8-15"
    assert all(r[6].startswith("gpu-node-") for r in rows.values())

    missing = _kubectl_with_plugin(cluster, "moe", "status", "nope", "-n", namespace)
    assert missing.returncode == 1
    assert 'modeldeployments.kubemoe.io "nope" not found' in missing.stderr

    plan = _kubectl_with_plugin(
        cluster, "moe", "plan", str(REPO / "examples" / "deepseek-v3.yaml"), "-o", "json"
    )
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["layout"] == "P1x(EP16) D1x(EP16)"
