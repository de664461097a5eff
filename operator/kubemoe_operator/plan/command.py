"""Every serving pod's command line, from the plan.

vllm and torch: the runtime container, with vLLM's flag names. `kubemoe-runtime serve --engine vllm`
hands these flags to `vllm serve` unchanged, and the torch engine reads the same names, so one
rendered pod fits either engine. Multi-pod groups use vLLM's multi-node data-parallel launch: every
pod runs its local data-parallel ranks, the leader (pod 0) serves the API, the others run
`--headless` and reach the leader at `--data-parallel-address`, which LeaderWorkerSet provides as
$(LWS_LEADER_ADDRESS) (Kubernetes expands `$(VAR)` in container args).

sglang: SGLang's own server (`python3 -m sglang.launch_server`, in the engine's image), with SGLang's
flags: a group of data x tensor ranks is one SGLang server of `--tp-size` ranks, with data-parallel
attention (`--attn-dp-size`, SGLang 0.5.23's spelling of `--dp-size N --enable-dp-attention`) when
data > 1 and expert parallelism (`--ep-size`, over `--moe-a2a-backend`) when the role has it. A
group over several pods is one SGLang server over `--nnodes` nodes: every pod runs the same command
but for `--node-rank` (its LeaderWorkerSet worker index), and reaches node 0 at `--dist-init-addr`.
P/D: `--disaggregation-mode prefill|decode` with the transfer backend (serving.kvTransfer.connector);
prefill servers listen for decode's KV bootstrap on `--disaggregation-bootstrap-port`. `--enable-metrics`:
SGLang serves /metrics (its own sglang:* series, not the kubemoe_* ones the operator's autoscaler reads).

tgi: TGI's launcher (`text-generation-launcher`), one pod per group, `--num-shard` tensor ranks.
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

CONNECTORS = {
    "nixl": "NixlConnector",
    "lmcache": "LMCacheConnectorV1",
    "example": "ExampleConnector",
    "mooncake": "MooncakeConnector",  # vLLM's name; only the torch engine, which ignores it, gets it here
}

SGLANG_SERVER = ("python3", "-m", "sglang.launch_server")
"""SGLang's server entry point (what `sglang serve` runs for a language model, without its model-type
detection, which reads the model's config before the flags)."""
SGLANG_DIST_INIT_PORT = 20000
"""Port on node 0 of a multi-pod SGLang group where the other nodes join (torch.distributed)."""
SGLANG_BOOTSTRAP_PORT = 8998
"""SGLang's default KV bootstrap port on prefill servers; decode servers connect to it."""
SGLANG_METRICS_FLAG = "--enable-metrics"
"""SGLang mounts /metrics (its sglang:* series) only with this flag; its pods are labelled for scraping
like every serving pod's."""
LWS_WORKER_INDEX = "$(LWS_WORKER_INDEX)"
"""LeaderWorkerSet's index of the pod in its group (0 on the leader), set in every pod's environment."""
SGLANG_DTYPES = ("float16", "bfloat16", "float32")
SGLANG_A2A = {"nvidia.com/gpu": "deepep", "amd.com/gpu": "mori"}
"""SGLang's expert-parallel all-to-all backend per accelerator vendor: DeepEP on NVIDIA GPUs (NVLink
within a node, RDMA across nodes), MORI on AMD; on cpu none (SGLang's all-reduce EP). extraArgs may
name another (`--moe-a2a-backend X`: the last occurrence wins)."""
TGI_LAUNCHER = "text-generation-launcher"
TGI_DTYPES = ("float16", "bfloat16")
"""The --dtype values TGI's launcher takes; other checkpoints keep their own dtype."""


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
    if plan.engine == "sglang":
        return sglang_command(plan=plan, role=role, pod=pod)
    if plan.engine == "tgi":
        return tgi_command(plan=plan, role=role)
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


def sglang_a2a_backend(plan: Plan) -> str:
    """The all-to-all backend of SGLang's expert parallelism on the plan's accelerator."""
    return SGLANG_A2A.get(plan.resource or "", "none")


def sglang_command(*, plan: Plan, role: RolePlan, pod: PodPlan) -> list[str]:
    """SGLang's server for one pod: the group's whole server on one pod, or node `pod.index` of it."""
    argv = [
        *SGLANG_SERVER,
        "--model-path",
        model_path(plan.source),
        "--served-model-name",
        plan.model,
        "--host",
        "0.0.0.0",
        "--port",
        str(PORT),
        "--context-length",
        str(role.memory.max_model_len),
        "--mem-fraction-static",
        f"{role.memory.utilization:g}",
        "--tp-size",
        str(role.ranks),
        SGLANG_METRICS_FLAG,
    ]
    if plan.dtype in SGLANG_DTYPES:
        argv += ["--dtype", plan.dtype]
    if plan.resource is None:
        argv += ["--device", "cpu"]
    if role.data > 1:
        argv += ["--attn-dp-size", str(role.data)]
    if role.expert_parallel:
        argv += ["--ep-size", str(role.expert), "--moe-a2a-backend", sglang_a2a_backend(plan)]
    if role.pods_per_group > 1:
        argv += [
            "--dist-init-addr",
            f"{pod.address or LWS_LEADER_ADDRESS}:{SGLANG_DIST_INIT_PORT}",
            "--nnodes",
            str(role.pods_per_group),
            "--node-rank",
            str(pod.index),
        ]
    if plan.mode == "disaggregated" and plan.connector is not None:
        argv += [
            "--disaggregation-mode",
            role.role,
            "--disaggregation-transfer-backend",
            plan.connector,
            "--disaggregation-bootstrap-port",
            str(SGLANG_BOOTSTRAP_PORT),
        ]
    return argv + list(plan.extra_args)


def tgi_command(*, plan: Plan, role: RolePlan) -> list[str]:
    """TGI's launcher for one pod (a whole group): `--num-shard` tensor ranks, the token limits from
    maxModelLen (a prompt of at most maxModelLen - 1 tokens, prompt and output within maxModelLen)."""
    max_len = role.memory.max_model_len
    argv = [
        TGI_LAUNCHER,
        "--model-id",
        model_path(plan.source),
        "--hostname",
        "0.0.0.0",
        "--port",
        str(PORT),
        "--num-shard",
        str(role.tensor),
        "--max-input-tokens",
        str(max_len - 1),
        "--max-total-tokens",
        str(max_len),
        "--cuda-memory-fraction",
        f"{role.memory.utilization:g}",
    ]
    if plan.dtype in TGI_DTYPES:
        argv += ["--dtype", plan.dtype]
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
