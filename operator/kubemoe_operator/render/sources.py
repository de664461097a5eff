"""The model source in a pod: environment, volumes and mounts for hf://, pvc:// and s3://."""

from __future__ import annotations

from typing import Any

from kubemoe_operator.api.spec import ModelDeploymentSpec
from kubemoe_operator.plan.command import MODEL_MOUNT
from kubemoe_operator.render.image_user import CACHE_DIR

HF_TOKEN_KEYS = ("HF_TOKEN",)
S3_REQUIRED_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_OPTIONAL_KEYS = ("AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL")
CACHE_VOLUME = "hf-cache"


def _secret_env(secret: str, key: str, *, optional: bool) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": key, "valueFrom": {"secretKeyRef": ref}}


def source_mounts(
    spec: ModelDeploymentSpec, source: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(env, volumes, volumeMounts) for the model `source` the plan serves (spec.model.source, or the
    cache claim's folder as pvc:// with model.cache), the way each engine loads it.

    hf:// the engine downloads (token from the Secret, optional shared cache claim); pvc:// is
    mounted read-only at MODEL_MOUNT; s3:// streams with credentials from the Secret. Secrets
    reach the container only as `secretKeyRef` environment variables.
    """
    secret = spec.model.credentials_secret
    env: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if source.startswith("hf://"):
        if secret:
            env += [_secret_env(secret, key, optional=False) for key in HF_TOKEN_KEYS]
        if spec.model.cache_claim:
            volumes.append(
                {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": spec.model.cache_claim}}
            )
            mounts.append({"name": CACHE_VOLUME, "mountPath": CACHE_DIR})
    elif source.startswith("pvc://"):
        claim = source.removeprefix("pvc://").split("/", 1)[0]
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    elif source.startswith("s3://") and secret:
        env += [_secret_env(secret, key, optional=False) for key in S3_REQUIRED_KEYS]
        env += [_secret_env(secret, key, optional=True) for key in S3_OPTIONAL_KEYS]
    return env, volumes, mounts
