"""Pod templates: the runtime container with its arguments, resources, probes, model source and scheduling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubemoe_operator.api.spec import ModelDeploymentSpec, RoleSpec
from kubemoe_operator.commandline import MODEL_MOUNT, PORT
from kubemoe_operator.plan import Plan, PodPlan, RolePlan
from kubemoe_operator.render.names import LABEL_GROUP, LABEL_LEADER, labels, workload_name

CONTAINER = "engine"
RUN_AS = 1000
HF_CACHE_MOUNT = "/cache"
HF_TOKEN_KEYS = ("HF_TOKEN",)
S3_REQUIRED_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_OPTIONAL_KEYS = ("AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL")
LWS_GROUP_INDEX = "leaderworkerset.sigs.k8s.io/group-index"
# Loading hundreds of GB of weights takes a while: allow 30 minutes before liveness applies.
STARTUP_PERIOD_S = 10
STARTUP_FAILURES = 180


@dataclass(frozen=True, kw_only=True)
class PodContext:
    """What every pod of a ModelDeployment shares."""

    owner: str
    spec: ModelDeploymentSpec
    plan: Plan
    image: str


def _secret_env(secret: str, key: str, *, optional: bool) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": key, "valueFrom": {"secretKeyRef": ref}}


def source_mounts(
    spec: ModelDeploymentSpec,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(env, volumes, volumeMounts) for the model source, the way each engine loads it.

    hf:// the engine downloads (token from the Secret, optional shared cache claim); pvc:// is
    mounted read-only at MODEL_MOUNT; s3:// streams with credentials from the Secret. Secrets
    reach the container only as `secretKeyRef` environment variables.
    """
    source, secret = spec.model.source, spec.model.credentials_secret
    env: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if source.startswith("hf://"):
        if secret:
            env += [_secret_env(secret, key, optional=False) for key in HF_TOKEN_KEYS]
        if spec.model.cache_claim:
            volumes.append(
                {"name": "hf-cache", "persistentVolumeClaim": {"claimName": spec.model.cache_claim}}
            )
            mounts.append({"name": "hf-cache", "mountPath": HF_CACHE_MOUNT})
            env.append({"name": "HF_HOME", "value": f"{HF_CACHE_MOUNT}/huggingface"})
    elif source.startswith("pvc://"):
        claim = source.removeprefix("pvc://").split("/", 1)[0]
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    elif source.startswith("s3://") and secret:
        env += [_secret_env(secret, key, optional=False) for key in S3_REQUIRED_KEYS]
        env += [_secret_env(secret, key, optional=True) for key in S3_OPTIONAL_KEYS]
    return env, volumes, mounts


def _resources(*, spec: ModelDeploymentSpec, plan: Plan, role: RolePlan) -> dict[str, Any]:
    role_spec: RoleSpec | None = getattr(spec.roles, role.role)
    given = role_spec.resources if role_spec is not None else None
    requests = {k: str(v) for k, v in given.requests.items()} if given else {}
    limits = {k: str(v) for k, v in given.limits.items()} if given else {}
    if plan.resource is not None:
        count = str(role.devices_per_pod)
        requests[plan.resource] = count
        limits[plan.resource] = count
    else:
        requests.setdefault("cpu", str(role.devices_per_pod))
    out: dict[str, Any] = {"requests": requests}
    if limits:
        out["limits"] = limits
    return out


def _probes() -> dict[str, Any]:
    def get(path: str) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "http"}}

    return {
        "startupProbe": {
            **get("/health"),
            "periodSeconds": STARTUP_PERIOD_S,
            "failureThreshold": STARTUP_FAILURES,
        },
        "livenessProbe": {**get("/health"), "periodSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {**get("/ready"), "periodSeconds": 5, "failureThreshold": 3},
    }


def _scheduling(spec: ModelDeploymentSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sched = spec.scheduling
    if sched.node_selector:
        out["nodeSelector"] = dict(sched.node_selector)
    if sched.tolerations:
        out["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in sched.tolerations]
    if sched.priority_class_name:
        out["priorityClassName"] = sched.priority_class_name
    return out


def security_context() -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod, container) security contexts: non-root, no privilege escalation, no capabilities."""
    pod = {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    return pod, container


def metric_label_env(*, owner: str, role: RolePlan) -> list[dict[str, Any]]:
    """The runtime labels its metrics deployment/role/group/rank (what the autoscaler selects on):
    role and rank come from --role and --data-parallel-start-rank, these two from the environment.
    The group is LeaderWorkerSet's group index, or the pod's name where a pod is a whole group."""
    lws = role.workload == "LeaderWorkerSet"
    group = f"metadata.labels['{LWS_GROUP_INDEX}']" if lws else "metadata.name"
    return [
        {"name": "KUBEMOE_DEPLOYMENT", "value": owner},
        {"name": "KUBEMOE_GROUP", "valueFrom": {"fieldRef": {"fieldPath": group}}},
    ]


def pod_template(*, ctx: PodContext, role: RolePlan, pod: PodPlan) -> dict[str, Any]:
    """The template of one pod of a serving group: the leader (API server) or a headless worker."""
    serves_api = pod.leader
    env, volumes, mounts = source_mounts(ctx.spec)
    env = [*metric_label_env(owner=ctx.owner, role=role), *env]
    # NCCL and the engine's shared-memory transport need more /dev/shm than the runtime default.
    volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    pod_sc, container_sc = security_context()
    argv = pod.command
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": ctx.image,
        "command": argv[:1],
        "args": argv[1:],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "resources": _resources(spec=ctx.spec, plan=ctx.plan, role=role),
        "securityContext": container_sc,
        "volumeMounts": mounts,
        "env": env,
    }
    if serves_api:
        container.update(_probes())
    pod_labels = labels(ctx.owner, role.role)
    pod_labels[LABEL_GROUP] = workload_name(ctx.owner, role.role)
    pod_labels[LABEL_LEADER] = "true" if serves_api else "false"
    spec: dict[str, Any] = {
        "containers": [container],
        "securityContext": pod_sc,
        "volumes": volumes,
        "enableServiceLinks": False,
        **_scheduling(ctx.spec),
    }
    return {"metadata": {"labels": pod_labels}, "spec": spec}


def router_pod_template(*, ctx: PodContext, argv: list[str], role: str) -> dict[str, Any]:
    """The router's pod: CPU only, same image, same probes."""
    pod_sc, container_sc = security_context()
    container: dict[str, Any] = {
        "name": role,
        "image": ctx.image,
        "command": argv[:1],
        "args": argv[1:],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
        "securityContext": container_sc,
        **_probes(),
    }
    pod_labels = labels(ctx.owner, role)
    pod_labels[LABEL_LEADER] = "true"
    sched = _scheduling(ctx.spec)
    sched.pop("nodeSelector", None)  # the router needs no accelerator node
    spec: dict[str, Any] = {
        "containers": [container],
        "securityContext": pod_sc,
        "enableServiceLinks": False,
        **sched,
    }
    return {"metadata": {"labels": pod_labels}, "spec": spec}
