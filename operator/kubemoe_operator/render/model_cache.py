"""model.cache: the claim the model is cached in, and the Job that fills it once from the Hub.

The Job runs `kubemoe-runtime fill-cache` from the operator's runtime image: it downloads the files an
engine loads into kubemoe-cache/ORG/NAME on the claim, serves its progress (bytes, files) on
FILL_PORT at /progress while it runs, and writes a marker when the folder is complete, so a second
run (the Job recreated) finishes at once. The serving pods mount the claim read-only and load the
folder as a pvc:// source (plan/cache.py); the reconciler holds their workloads back until the Job
has succeeded (reconcile/model_cache.py).

The Job's name carries a hash of its pod template: a Job's template cannot change, so a new source,
image or token Secret is a new Job (the old one is pruned), never a rejected update.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kubemoe_operator.api.spec import ModelDeploymentSpec, PodOptions
from kubemoe_operator.plan.cache import cache_claim_name, cache_path
from kubemoe_operator.plan.command import RUNTIME
from kubemoe_operator.render.filesystem import security_context
from kubemoe_operator.render.image_user import HF_HOME, RUNTIME_HOME
from kubemoe_operator.render.names import Owner, labels, metadata
from kubemoe_operator.render.pod_options import with_options
from kubemoe_operator.render.sources import HF_TOKEN_KEYS

CACHE_ROLE = "model-cache"
"""The role label of the claim, the Job and its pod."""
FILL_PORT = 8080
"""Where the fill pod serves GET /progress (the operator reads it into status.cache)."""
FILL_CONTAINER = "fill"
CACHE_MOUNT = "/model-cache"
FILL_BACKOFF_LIMIT = 4
"""Failed tries before the Job fails; each resumes the files already complete."""


def cache_claim(*, owner: Owner, spec: ModelDeploymentSpec) -> dict[str, Any] | None:
    """The claim the operator creates for model.cache.size (ReadWriteMany: every pod of every group
    mounts it, on any node); None without a cache or with one the user brings."""
    cache = spec.model.cache
    if cache is None or cache.size is None:
        return None
    body: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": cache.size}},
    }
    if cache.storage_class_name is not None:
        body["storageClassName"] = cache.storage_class_name
    name = cache_claim_name(owner.name, spec)
    assert name is not None
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(owner=owner, name=name, role=CACHE_ROLE),
        "spec": body,
    }


def fill_command(spec: ModelDeploymentSpec) -> list[str]:
    return [
        RUNTIME,
        "fill-cache",
        "--source",
        spec.model.source,
        "--dir",
        f"{CACHE_MOUNT}/{cache_path(spec.model.source)}",
        "--port",
        str(FILL_PORT),
    ]


def _fill_env(spec: ModelDeploymentSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": RUNTIME_HOME},
        {"name": "HF_HOME", "value": HF_HOME},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
    ]
    cache = spec.model.cache
    if cache is not None and cache.hub_endpoint is not None:
        env.append({"name": "HF_ENDPOINT", "value": cache.hub_endpoint})
    secret = spec.model.credentials_secret
    if secret is not None:
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
            for key in HF_TOKEN_KEYS
        ]
    return env


def fill_pod_template(
    *, owner: Owner, spec: ModelDeploymentSpec, image: str, options: PodOptions
) -> dict[str, Any]:
    """The fill pod: the runtime image, the claim read-write, writable HOME and HF_HOME, no accelerator."""
    claim = cache_claim_name(owner.name, spec)
    pod_sc, container_sc = security_context()
    argv = fill_command(spec)
    container: dict[str, Any] = {
        "name": FILL_CONTAINER,
        "image": image,
        "command": argv[:1],
        "args": argv[1:],
        "ports": [{"name": "progress", "containerPort": FILL_PORT, "protocol": "TCP"}],
        "env": _fill_env(spec),
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
        "securityContext": container_sc,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "cache", "mountPath": CACHE_MOUNT},
            {"name": "home", "mountPath": RUNTIME_HOME},
            {"name": "hf-home", "mountPath": HF_HOME},
        ],
    }
    pod: dict[str, Any] = {
        "restartPolicy": "OnFailure",
        "containers": [container],
        "securityContext": pod_sc,
        "enableServiceLinks": False,
        "volumes": [
            {"name": "cache", "persistentVolumeClaim": {"claimName": claim}},
            {"name": "home", "emptyDir": {}},
            {"name": "hf-home", "emptyDir": {}},
        ],
    }
    return with_options({"metadata": {"labels": labels(owner.name, CACHE_ROLE)}, "spec": pod}, options)


def fill_job_name(owner: str, template: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:8]
    return f"{owner}-model-cache-{digest}"


def fill_job(
    *, owner: Owner, spec: ModelDeploymentSpec, image: str, options: PodOptions
) -> dict[str, Any] | None:
    """The Job that fills the cache; None without model.cache. Kept after it succeeds (its success is
    what lets the serving groups start), so it has no TTL."""
    if spec.model.cache is None:
        return None
    template = fill_pod_template(owner=owner, spec=spec, image=image, options=options)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(owner=owner, name=fill_job_name(owner.name, template), role=CACHE_ROLE),
        "spec": {"backoffLimit": FILL_BACKOFF_LIMIT, "template": template},
    }
