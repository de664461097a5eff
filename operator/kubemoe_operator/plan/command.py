"""The runtime container's command line for one pod, from the plan, with vLLM's flag names.

`kubemoe-runtime serve --engine vllm` hands these flags to `vllm serve` unchanged, and the torch
engine reads the same names, so one rendered pod fits either engine. Multi-pod groups use
vLLM's multi-node data-parallel launch: every pod runs its local data-parallel ranks, the
leader (pod 0) serves the API, the others run `--headless` and reach the leader at
`--data-parallel-address`, which LeaderWorkerSet provides as $(LWS_LEADER_ADDRESS) (Kubernetes
expands `$(VAR)` in container args).
"""

from __future__ import annotations

import json

from kubemoe_operator.plan.model import Plan, PodPlan, RolePlan

RUNTIME = "kubemoe-runtime"
PORT = 8000
DATA_PARALLEL_RPC_PORT = 29550  # vLLM's default
LWS_LEADER_ADDRESS = "$(LWS_LEADER_ADDRESS)"
MODEL_MOUNT = "/mnt/models"  # where a pvc:// claim is mounted (read-only)
S3_LOAD_FORMAT = "runai_streamer"  # vLLM's streaming loader for s3:// sources

CONNECTORS = {"nixl": "NixlConnector", "lmcache": "LMCacheConnectorV1", "example": "ExampleConnector"}


def model_path(source: str) -> str:
    """What the engine loads: an HF repo id, a path inside the mounted claim, an s3 URI, or a local path."""
    scheme, _, rest = source.partition("://")
    if scheme == "hf":
        return rest
    if scheme == "pvc":
        _claim, _, path = rest.partition("/")
        return f"{MODEL_MOUNT}/{path}"
    if scheme == "file":
        return rest
    return source


def kv_transfer_config(connector: str, role: str) -> str:
    """vLLM's --kv-transfer-config: NIXL pairs both ways; others produce on prefill, consume on decode."""
    kv_role = "kv_both" if connector == "nixl" else "kv_producer" if role == "prefill" else "kv_consumer"
    return json.dumps({"kv_connector": CONNECTORS[connector], "kv_role": kv_role}, separators=(",", ":"))


def pod_command(*, plan: Plan, role: RolePlan, pod: PodPlan) -> list[str]:
    """argv for one pod of one serving group of `role`."""
    argv = [
        RUNTIME,
        "serve",
        "--engine",
        plan.engine,
        "--role",
        role.role,
        "--model",
        model_path(plan.source),
        "--served-model-name",
        plan.model,
        "--host",
        "0.0.0.0",
        "--port",
        str(PORT),
        "--dtype",
        plan.dtype,
        "--max-model-len",
        str(role.memory.max_model_len),
        "--gpu-memory-utilization",
        f"{role.memory.utilization:g}",
        "--tensor-parallel-size",
        str(role.tensor),
    ]
    if role.data > 1:
        argv += ["--data-parallel-size", str(role.data), "--data-parallel-size-local", str(pod.data_local)]
        if role.pods_per_group > 1:
            argv += [
                "--data-parallel-start-rank",
                str(pod.start_rank),
                "--data-parallel-address",
                pod.address or LWS_LEADER_ADDRESS,
                "--data-parallel-rpc-port",
                str(DATA_PARALLEL_RPC_PORT),
            ]
            if not pod.leader:
                argv.append("--headless")
    if role.expert_parallel:
        argv.append("--enable-expert-parallel")
    if plan.mode == "disaggregated" and plan.connector is not None:
        argv += ["--kv-transfer-config", kv_transfer_config(plan.connector, role.role)]
    if plan.engine == "vllm" and plan.source.startswith("s3://"):
        argv += ["--load-format", S3_LOAD_FORMAT]
    return argv + list(plan.extra_args)


def role_service_host(*, name: str, namespace: str, role: str) -> str:
    """The role's headless Service (its group leaders) as HOST:PORT, for the router to resolve."""
    return f"{name}-{role}.{namespace}.svc:{PORT}"


def router_command(*, plan: Plan, namespace: str) -> list[str]:
    """argv for the router: the OpenAI front door, told each role's headless Service.

    `--prefill-service` / `--decode-service` (disaggregated) or `--worker-service` (colocated) name
    a headless Service whose DNS answers are the group leaders; the router resolves and refreshes
    them itself.
    """
    argv = [
        RUNTIME,
        "serve",
        "--role",
        "router",
        "--served-model-name",
        plan.model,
        "--host",
        "0.0.0.0",
        "--port",
        str(PORT),
        "--policy",
        plan.router.policy,
    ]
    for role in plan.roles:
        argv += [
            f"--{role.role}-service",
            role_service_host(name=plan.name, namespace=namespace, role=role.role),
        ]
    if plan.router.local_prefill_below_tokens and plan.mode == "disaggregated":
        argv += ["--pd-min-prompt-tokens", str(plan.router.local_prefill_below_tokens)]
    return argv
