"""Pod templates: the runtime container with its arguments, resources, probes, model source and placement,
and what the role's (or router's) pod template options add (pod_options.py, placement.py);
the router's, with its API keys when spec.router.apiKeySecret names them; and how each ends (lifecycle.py):
the router and the torch engine's API-serving pods (Deployment pods, LeaderWorkerSet leaders) sleep in
preStop and drain within their grace period; headless workers and vLLM pods keep Kubernetes' defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubemoe_operator.api.labels import LABEL_GROUP, LABEL_LEADER, LABEL_METRICS
from kubemoe_operator.api.lmcache import hash_seed_env
from kubemoe_operator.api.spec import ModelDeploymentSpec, PodOptions
from kubemoe_operator.plan.command import PORT
from kubemoe_operator.plan.model import Plan, PodPlan, RolePlan
from kubemoe_operator.render.engines import (
    bootstrap,
    engine_env,
    own_probes,
    own_server,
    sglang_router,
    sglang_router_probes,
    vllm_cpu_kv_env,
)
from kubemoe_operator.render.expansion import container_argv
from kubemoe_operator.render.experts import expert_args, expert_volumes, with_expert_args
from kubemoe_operator.render.filesystem import security_context, writable_dirs
from kubemoe_operator.render.kv_key import kv_key_env
from kubemoe_operator.render.lifecycle import container_lifecycle, drain_env, drains, pod_termination
from kubemoe_operator.render.names import labels, router_name, workload_name
from kubemoe_operator.render.placement import placement
from kubemoe_operator.render.pod_options import role_pod, with_options
from kubemoe_operator.render.probes import engine_probes, router_probes
from kubemoe_operator.render.resources import container_resources, router_resources
from kubemoe_operator.render.sources import source_mounts

CONTAINER = "engine"
LWS_GROUP_INDEX = "leaderworkerset.sigs.k8s.io/group-index"
NIXL_SIDE_CHANNEL_HOST = "VLLM_NIXL_SIDE_CHANNEL_HOST"
API_KEYS_VOLUME = "api-keys"
API_KEYS_DIR = "/etc/kubemoe/api-keys"
API_KEY_SECRET_KEY = "api-key"
"""The key of spec.router.apiKeySecret that holds the API keys (one per line)."""


@dataclass(frozen=True, kw_only=True)
class PodContext:
    """What every pod of a ModelDeployment shares."""

    owner: str
    spec: ModelDeploymentSpec
    plan: Plan
    image: str
    options: PodOptions
    """Annotations, labels and image pull secrets of every pod (pod_options.merged)."""
    router_image: str = ""
    """The router's image when it is kubemoe's router; `image` when empty. (sglang-router, SGLang's
    P/D router, comes with the SGLang image, `image`.)"""


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


def kv_transfer_env(plan: Plan) -> list[dict[str, Any]]:
    """NIXL's side channel (the KV handshake) listens on, and advertises, this host: the pod's IP,
    which peers in other pods can reach (vLLM's default, localhost, they cannot)."""
    if plan.connector != "nixl":
        return []
    ip = {"fieldRef": {"fieldPath": "status.podIP"}}
    return [{"name": NIXL_SIDE_CHANNEL_HOST, "valueFrom": ip}]


def pod_template(*, ctx: PodContext, role: RolePlan, pod: PodPlan) -> dict[str, Any]:
    """The template of one pod of a serving group: the leader (API server) or a headless worker.
    Both are probed: a worker answers /health and /ready for its own ranks. Only a pod that drains
    (lifecycle.drains) gets the preStop sleep, the drain timeout and the longer grace period. Every
    pod of an expert-parallel group gets spec.experts' flags (and the torch engine's placement file)."""
    if own_server(ctx.plan):
        return own_server_pod_template(ctx=ctx, role=role, pod=pod)
    own = role_pod(ctx.spec, role.role)
    draining = drains(leader=pod.leader)
    env, volumes, mounts = source_mounts(ctx.spec, ctx.plan.source)
    experts_volumes, experts_mounts = expert_volumes(owner=ctx.owner, spec=ctx.spec, role=role)
    dirs_env, dirs_volumes, dirs_mounts = writable_dirs(ctx.spec, shm=role.host.shm)
    env = [
        *metric_label_env(owner=ctx.owner, role=role),
        *dirs_env,
        *kv_transfer_env(ctx.plan),
        *hash_seed_env(ctx.spec, role.role),
        *kv_key_env(ctx.owner, ctx.plan),
        *vllm_cpu_kv_env(ctx.plan, role),
        *(drain_env() if draining else []),
        *env,
    ]
    pod_sc, container_sc = security_context(own)
    command = with_expert_args(pod.command, extra=ctx.plan.extra_args, args=expert_args(ctx.spec, role))
    argv = container_argv(command)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": ctx.image,
        "command": argv[:1],
        "args": argv[1:],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "resources": container_resources(spec=ctx.spec, plan=ctx.plan, role=role),
        "securityContext": container_sc,
        "volumeMounts": [*mounts, *dirs_mounts, *experts_mounts],
        "env": env,
        **engine_probes(),
        **(container_lifecycle() if draining else {}),
    }
    pod_labels = labels(ctx.owner, role.role)
    pod_labels[LABEL_GROUP] = workload_name(ctx.owner, role.role)
    pod_labels[LABEL_LEADER] = "true" if pod.leader else "false"
    if pod.leader or ctx.plan.engine == "vllm":  # a torch engine's headless worker serves no HTTP
        pod_labels[LABEL_METRICS] = "true"
    spec: dict[str, Any] = {
        "containers": [container],
        "securityContext": pod_sc,
        "volumes": [*volumes, *dirs_volumes, *experts_volumes],
        "enableServiceLinks": False,
        **(pod_termination() if draining else {}),
        **placement(ctx.spec, ctx.plan, accelerator=True, own=own),
    }
    return with_options({"metadata": {"labels": pod_labels}, "spec": spec}, ctx.options, own)


def own_server_pod_template(*, ctx: PodContext, role: RolePlan, pod: PodPlan) -> dict[str, Any]:
    """A pod of an engine that is its own server (render/engines.py): the engine's command, its
    /health probes, the model source and writable directories; none of the runtime's own settings
    (metric labels, drain timeout, KV hand-off key), which such a server does not read."""
    own = role_pod(ctx.spec, role.role)
    env, volumes, mounts = source_mounts(ctx.spec, ctx.plan.source)
    dirs_env, dirs_volumes, dirs_mounts = writable_dirs(ctx.spec, shm=role.host.shm)
    bootstrap_ports, annotations = bootstrap(ctx.plan, role.role)
    pod_sc, container_sc = security_context(own)
    argv = container_argv(pod.command)
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": ctx.image,
        "command": argv[:1],
        "args": argv[1:],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}, *bootstrap_ports],
        "resources": container_resources(spec=ctx.spec, plan=ctx.plan, role=role),
        "securityContext": container_sc,
        "volumeMounts": [*mounts, *dirs_mounts],
        "env": [*dirs_env, *engine_env(ctx.plan), *env],
        **own_probes(),
        **(container_lifecycle() if pod.leader else {}),
    }
    pod_labels = labels(ctx.owner, role.role)
    pod_labels[LABEL_GROUP] = workload_name(ctx.owner, role.role)
    pod_labels[LABEL_LEADER] = "true" if pod.leader else "false"
    if pod.leader:  # an engine's own server: its API pod serves /metrics, its other pods no HTTP
        pod_labels[LABEL_METRICS] = "true"
    metadata: dict[str, Any] = {"labels": pod_labels}
    if annotations:
        metadata["annotations"] = annotations
    spec: dict[str, Any] = {
        "containers": [container],
        "securityContext": pod_sc,
        "volumes": [*volumes, *dirs_volumes],
        "enableServiceLinks": False,
        **(pod_termination() if pod.leader else {}),
        **placement(ctx.spec, ctx.plan, accelerator=True, own=own),
    }
    return with_options({"metadata": metadata, "spec": spec}, ctx.options, own)


def api_keys(secret: str | None) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """(args, volumes, volumeMounts) giving the router its API keys from `secret` (none without one).
    A mounted file rather than an environment variable: the router re-reads it when the kubelet
    updates it (router/auth.py), so keys rotate without a restart. The pod does not start without
    the Secret."""
    if secret is None:
        return [], [], []
    source = {
        "secretName": secret,
        "items": [{"key": API_KEY_SECRET_KEY, "path": API_KEY_SECRET_KEY}],
        "defaultMode": 0o440,  # the group is the pod's fsGroup, the images' user's
    }
    volume = {"name": API_KEYS_VOLUME, "secret": source}
    mount = {"name": API_KEYS_VOLUME, "mountPath": API_KEYS_DIR, "readOnly": True}
    return ["--api-key-file", f"{API_KEYS_DIR}/{API_KEY_SECRET_KEY}"], [volume], [mount]


def router_pod_template(*, ctx: PodContext, argv: list[str], role: str) -> dict[str, Any]:
    """The router's pod: CPU only, no accelerator placement; kubemoe's router (the runtime image), or
    for SGLang P/D sglang-router (the SGLang image), which reads pods through its ServiceAccount."""
    if sglang_router(ctx.plan):
        return sglang_router_pod_template(ctx=ctx, argv=argv, role=role)
    own = ctx.spec.router.pod
    pod_sc, container_sc = security_context(own)
    key_args, key_volumes, key_mounts = api_keys(ctx.spec.router.api_key_secret)
    argv = container_argv([*argv, *key_args])
    container: dict[str, Any] = {
        "name": role,
        "image": ctx.router_image or ctx.image,
        "command": argv[:1],
        "args": argv[1:],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "resources": router_resources(ctx.spec),
        "securityContext": container_sc,
        "env": [*kv_key_env(ctx.owner, ctx.plan), *drain_env()],
        **router_probes(),
        **container_lifecycle(),
    }
    if key_mounts:
        container["volumeMounts"] = key_mounts
    pod_labels = labels(ctx.owner, role)
    pod_labels[LABEL_LEADER] = pod_labels[LABEL_METRICS] = "true"
    spec: dict[str, Any] = {
        "containers": [container],
        "securityContext": pod_sc,
        "enableServiceLinks": False,
        **pod_termination(),
        **placement(ctx.spec, ctx.plan, accelerator=False, own=own),
    }
    if key_volumes:
        spec["volumes"] = key_volumes
    return with_options({"metadata": {"labels": pod_labels}, "spec": spec}, ctx.options, own)


def sglang_router_pod_template(*, ctx: PodContext, argv: list[str], role: str) -> dict[str, Any]:
    """sglang-router's pod (render/engines.py): the SGLang image, its ServiceAccount's token mounted
    (its service discovery reads the namespace's pods), the preStop sleep and grace period."""
    own = ctx.spec.router.pod
    pod_sc, container_sc = security_context(own)
    argv = container_argv(argv)
    container: dict[str, Any] = {
        "name": role,
        "image": ctx.image,
        "command": argv[:1],
        "args": argv[1:],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "resources": router_resources(ctx.spec),
        "securityContext": container_sc,
        **sglang_router_probes(),
        **container_lifecycle(),
    }
    pod_labels = labels(ctx.owner, role)
    pod_labels[LABEL_LEADER] = pod_labels[LABEL_METRICS] = "true"
    spec: dict[str, Any] = {
        "containers": [container],
        "serviceAccountName": router_name(ctx.owner),
        "automountServiceAccountToken": True,
        "securityContext": pod_sc,
        "enableServiceLinks": False,
        **pod_termination(),
        **placement(ctx.spec, ctx.plan, accelerator=False, own=own),
    }
    return with_options({"metadata": {"labels": pod_labels}, "spec": spec}, ctx.options, own)
