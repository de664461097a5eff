"""Serving pods of engines that bring their own server (sglang, tgi), and SGLang's P/D router.

The kubemoe runtime wraps vLLM (engines/vllm/: a front with kubemoe's probes, drain and metrics) and
is the torch engine. SGLang and TGI run from their own images (spec.engine.image), which do not hold
the runtime, so their container runs the engine's own server as its command (plan/command.py) and is
probed on the engine's own /health: SGLang's answers 503 until its weights are loaded and warmed up
(and on the non-zero nodes of a multi-pod group its dummy health server answers it), TGI's answers
200 once its shards serve. The engines stop on SIGTERM themselves; API-serving pods keep the preStop
sleep, so the endpoints drop them before they stop.

SGLang P/D follows SGLang's bootstrap protocol (the router sends each request to a prefill and a
decode at once, with the prefill's bootstrap_host, bootstrap_port and a bootstrap_room), which
kubemoe's router does not speak, so those deployments are routed by sglang-router (SGLang's own,
from the SGLang image): it discovers the prefill and decode group leaders by their labels through the
Kubernetes API (`--service-discovery`, a Role that reads pods in the namespace) and reads each
prefill's bootstrap port from its `sglang.ai/bootstrap-port` annotation, so groups the autoscaler or
an HPA adds are routed as they become ready.
"""

from __future__ import annotations

import math
from typing import Any, Final

from kubemoe_operator.api.labels import LABEL_DEPLOYMENT, LABEL_LEADER, LABEL_ROLE
from kubemoe_operator.plan.command import LWS_WORKER_INDEX, PORT, SGLANG_BOOTSTRAP_PORT
from kubemoe_operator.plan.model import Plan, PodPlan, RolePlan
from kubemoe_operator.render.image_user import HF_HOME
from kubemoe_operator.render.names import Owner, metadata, router_name
from kubemoe_operator.render.probes import TIMEOUT_S, engine_probes

VLLM_CPU_KV_ENV: Final = "VLLM_CPU_KVCACHE_SPACE"

OWN_SERVER_ENGINES: Final = ("sglang", "tgi")
"""Engines whose container is their own server, not the kubemoe runtime."""
BOOTSTRAP_ANNOTATION: Final = "sglang.ai/bootstrap-port"
"""The pod annotation sglang-router reads a discovered prefill's bootstrap port from (its default)."""
SGLANG_ROUTER: Final = ("python3", "-m", "sglang_router.launch_router")
ROUTER_POLICIES: Final = {
    "round-robin": "round_robin",
    "least-load": "cache_aware",
    "prefix-hash": "cache_aware",
}
"""spec.router.policy in sglang-router's terms. least-load is cache_aware, which routes to the
shortest queue whenever the load is imbalanced (power_of_two refuses fewer than two workers, which a
discovered role may have); prefix-hash is cache_aware's prefix tree."""
ROUTER_STARTUP_TIMEOUT_S: Final = 7200
"""How long sglang-router waits for a discovered worker to answer, as long as a pod may load."""


def own_server(plan: Plan) -> bool:
    return plan.engine in OWN_SERVER_ENGINES


def sglang_router(plan: Plan) -> bool:
    """Whether the deployment's router is sglang-router: SGLang disaggregated."""
    return plan.engine == "sglang" and plan.mode == "disaggregated"


def any_sglang_worker(pod: PodPlan) -> PodPlan:
    """One template serves every non-leader pod of a multi-pod SGLang group: its --node-rank is
    LeaderWorkerSet's worker index, which the kubelet expands from the pod's environment."""
    argv = list(pod.command)
    argv[argv.index("--node-rank") + 1] = LWS_WORKER_INDEX
    return pod.model_copy(update={"command": argv})


def vllm_cpu_kv_env(plan: Plan, role: RolePlan) -> list[dict[str, Any]]:
    """vLLM's CPU build sizes each engine's KV cache by VLLM_CPU_KVCACHE_SPACE (GiB), not by the memory it
    is given (the CPU image sets 4 GiB, whatever the pod has): the plan's KV budget of the role's ranks,
    in whole GiB (planner.py refuses one under a GiB)."""
    if plan.engine != "vllm" or plan.resource is not None:
        return []
    gib = max(1, math.floor(role.memory.kv_budget_gib))
    return [{"name": VLLM_CPU_KV_ENV, "value": str(gib)}]


def engine_env(plan: Plan) -> list[dict[str, Any]]:
    """TGI's image sets HUGGINGFACE_HUB_CACHE=/data, which outranks HF_HOME: point it at the cache."""
    if plan.engine == "tgi":
        return [{"name": "HUGGINGFACE_HUB_CACHE", "value": f"{HF_HOME}/hub"}]
    return []


def own_probes() -> dict[str, Any]:
    """kubemoe's probe timings (probes.engine_probes) on the engine's /health."""
    probes = engine_probes()
    for probe in probes.values():
        probe["httpGet"]["path"] = "/health"
    return probes


def bootstrap(plan: Plan, role: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(ports, annotations) of an SGLang prefill pod: the KV bootstrap port decode servers connect to."""
    if not (sglang_router(plan) and role == "prefill"):
        return [], {}
    port = {"name": "bootstrap", "containerPort": SGLANG_BOOTSTRAP_PORT, "protocol": "TCP"}
    return [port], {BOOTSTRAP_ANNOTATION: str(SGLANG_BOOTSTRAP_PORT)}


def _selector(owner: str, role: str) -> list[str]:
    return [f"{LABEL_DEPLOYMENT}={owner}", f"{LABEL_ROLE}={role}", f"{LABEL_LEADER}=true"]


def sglang_router_command(*, plan: Plan, owner: str, namespace: str) -> list[str]:
    """sglang-router over the prefill and decode group leaders it discovers in `namespace`."""
    return [
        *SGLANG_ROUTER,
        "--host",
        "0.0.0.0",
        "--port",
        str(PORT),
        "--pd-disaggregation",
        "--policy",
        ROUTER_POLICIES[plan.router.policy],
        "--service-discovery",
        "--service-discovery-namespace",
        namespace,
        "--service-discovery-port",
        str(PORT),
        "--prefill-selector",
        *_selector(owner, "prefill"),
        "--decode-selector",
        *_selector(owner, "decode"),
        "--worker-startup-timeout-secs",
        str(ROUTER_STARTUP_TIMEOUT_S),
    ]


def sglang_router_probes() -> dict[str, Any]:
    """sglang-router's own /health, liveness and readiness (it has nothing to load)."""
    get = {"httpGet": {"path": "/health", "port": "http"}, "timeoutSeconds": TIMEOUT_S}
    return {
        "livenessProbe": {**get, "periodSeconds": 20, "failureThreshold": 3},
        "readinessProbe": {**get, "periodSeconds": 5, "failureThreshold": 3},
    }


def router_access(*, owner: Owner) -> list[dict[str, Any]]:
    """The ServiceAccount sglang-router runs as, and the Role (binding) that lets it read the pods of
    its namespace, which its service discovery watches."""
    name = router_name(owner.name)
    subject = {"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": metadata(owner=owner, name=name, role="router"),
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": metadata(owner=owner, name=name, role="router"),
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": metadata(owner=owner, name=name, role="router"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [subject],
        },
    ]
