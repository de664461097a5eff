"""The KV hand-off's key: one Secret per disaggregated ModelDeployment, in every pod's environment.

The router signs the kv_transfer_params it sends and the prefill and decode pods verify them
(runtime pod/kv_auth.py), so no client can make a decode pull KV from a host of its choosing. The key
is random, made once: the reconciler creates the Secret if it is missing (`create`, never `get`:
the operator cannot read Secrets), owned by the ModelDeployment so it goes with it. Deleted by
someone, it is made again (a new key) once a pod cannot start for want of it (`missing_kv_key`).
It is not part of the hashed render — a new key on every render would restart every pod.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from typing import Any, Final

from kubemoe_operator.plan.model import Plan
from kubemoe_operator.render.names import Owner, metadata

KV_KEY_ENV: Final = "KUBEMOE_KV_KEY"
"""The runtime reads the key from here (kubemoe_runtime.pod.kv_auth.KV_KEY_ENV)."""
SECRET_KEY: Final = "key"


def kv_key_secret_name(owner: str) -> str:
    return f"{owner}-kv-key"


def needs_kv_key(plan: Plan) -> bool:
    return plan.mode == "disaggregated"


def kv_key_secret(owner: Owner) -> dict[str, Any]:
    """A new Secret holding 32 random bytes (hex) for `owner`'s KV hand-off."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(owner=owner, name=kv_key_secret_name(owner.name)),
        "type": "Opaque",
        "stringData": {SECRET_KEY: secrets.token_hex(32)},
    }


def kv_key_env(owner: str, plan: Plan) -> list[dict[str, Any]]:
    """The key in a pod's environment, from the Secret (disaggregated serving only)."""
    if not needs_kv_key(plan):
        return []
    ref = {"secretKeyRef": {"name": kv_key_secret_name(owner), "key": SECRET_KEY}}
    return [{"name": KV_KEY_ENV, "valueFrom": ref}]


def missing_kv_key(owner: str, pods: Iterable[Mapping[str, Any]]) -> bool:
    """Whether a pod cannot start because the key's Secret is gone (the kubelet's
    CreateContainerConfigError: 'secret "NAME" not found')."""
    wanted = f'secret "{kv_key_secret_name(owner)}" not found'
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (status.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") == "CreateContainerConfigError" and wanted in waiting.get("message", ""):
                return True
    return False
