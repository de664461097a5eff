"""A busybox pod for the real node (its image is imported there, never pulled): tests' small servers
and clients, and a tenant's stand-in in the fault tests."""

from __future__ import annotations

from typing import Any

from e2e.cluster.node_images import BUSYBOX_IMAGE


def busybox_pod(
    name: str, script: str, *, labels: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    """`sh -c script` as uid 65532 (the runtime images' user), stopped within a second."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": BUSYBOX_IMAGE,
                    "imagePullPolicy": "Never",
                    "command": ["/bin/sh", "-c", script],
                    "securityContext": {"runAsUser": 65532, "runAsGroup": 65532},
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
                }
            ],
            **spec,
        },
    }
