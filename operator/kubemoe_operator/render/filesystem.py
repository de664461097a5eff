"""Who a runtime pod runs as and where it may write: the images' user, HOME, the model cache, /dev/shm.

Pods run as the images' own user (image_user.IMAGE_UID), the only one their HOME and Hugging
Face cache belong to. HOME and the cache are emptyDir volumes besides: they are writable
whatever uid a cluster's policy imposes (fsGroup makes them group-writable), and an hf://
download survives a container restart (a cache claim, when given, replaces the cache volume).
/dev/shm is memory-backed and sized by the plan.
"""

from __future__ import annotations

from typing import Any

from kubemoe_operator.api.pod_template import PodTemplateOptions
from kubemoe_operator.api.spec import ModelDeploymentSpec
from kubemoe_operator.render.image_user import CACHE_DIR, HF_HOME, IMAGE_UID, RUNTIME_HOME

HOME_VOLUME = "home"
CACHE_VOLUME = "cache"
SHM_VOLUME = "dshm"


def security_context(own: PodTemplateOptions | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod, container) security contexts: the images' non-root user, no privilege escalation, no
    capabilities; `own`'s (the role's or router's) supplementalGroups, e.g. the groups that own an AMD
    GPU's device files."""
    pod: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": IMAGE_UID,
        "runAsGroup": IMAGE_UID,
        "fsGroup": IMAGE_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if own is not None and own.supplemental_groups:
        pod["supplementalGroups"] = list(own.supplemental_groups)
    container = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    return pod, container


def has_cache_claim(spec: ModelDeploymentSpec) -> bool:
    return spec.model.source.startswith("hf://") and spec.model.cache_claim is not None


def writable_dirs(
    spec: ModelDeploymentSpec, *, shm: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(env, volumes, volumeMounts): HOME, the cache (unless a cache claim is mounted there) and a
    /dev/shm of `shm` bytes."""
    env = [{"name": "HOME", "value": RUNTIME_HOME}, {"name": "HF_HOME", "value": HF_HOME}]
    volumes: list[dict[str, Any]] = [{"name": HOME_VOLUME, "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": HOME_VOLUME, "mountPath": RUNTIME_HOME}]
    if not has_cache_claim(spec):
        volumes.append({"name": CACHE_VOLUME, "emptyDir": {}})
        mounts.append({"name": CACHE_VOLUME, "mountPath": CACHE_DIR})
    volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
    mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
    return env, volumes, mounts
