"""`ModelDeployment.spec`: what the user asks for (docs/architecture.md).

Rules that relate several fields are written twice, on purpose: as CEL
(`x-kubernetes-validations`, enforced by the apiserver) and as Python in
`kubemoe_operator.api.rules` (enforced by `kubemoe plan` and the operator).
The invalid-manifest corpus in `examples/invalid/` checks both agree.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from kubemoe_operator.api.base import ApiModel, cel, validations
from kubemoe_operator.api.engines import EngineKind, cel_rules
from kubemoe_operator.api.model_config import ModelConfig
from kubemoe_operator.api.patterns import (
    DNS_SUBDOMAIN_PATTERN,
    EMPTY_OBJECT_DEFAULT,
    OPTIONAL_DNS_SUBDOMAIN_PATTERN,
    QUANTITY_PATTERN,
)
from kubemoe_operator.api.pod_template import (
    MAX_POD_METADATA,
    PodTemplateOptions,
    Resources,
    Toleration,
    label_rule,
)
from kubemoe_operator.api.quantity import parse_quantity

# hf://ORG/NAME, pvc://CLAIM/PATH, s3://BUCKET/PREFIX, file://PATH (local mode).
SOURCE_PATTERN = (
    r"^(hf://[^/\s]+/[^/\s]+|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/\S+|s3://[^/\s]+/\S+|file://\S+)$"
)

# Flags the plan owns; setting them through extraArgs would contradict the layout or the memory it
# sized each rank for (--kv-cache-memory-bytes and --num-gpu-blocks-override size vLLM's KV cache in
# place of --gpu-memory-utilization: the plan's KV tokens per rank would no longer hold).
RESERVED_FLAGS = (
    "tensor-parallel-size",
    "data-parallel-size",
    "data-parallel-size-local",
    "data-parallel-start-rank",
    "data-parallel-address",
    "data-parallel-rpc-port",
    "enable-expert-parallel",
    "kv-transfer-config",
    "port",
    "host",
    "served-model-name",
    "max-model-len",
    "gpu-memory-utilization",
    "kv-cache-memory-bytes",
    "num-gpu-blocks-override",
    "dtype",
)
RESERVED_FLAG_PATTERN = "^--(" + "|".join(f.replace("-", "[-_]") for f in RESERVED_FLAGS) + ")(=.*)?$"
"""Each reserved flag, alone or `=`-joined to its value, with `-` or vLLM's `_` between its words."""


RoleName = Literal["prefill", "decode", "worker"]
MetricType = Literal["gpu-utilization", "kv-cache-usage", "queue-depth", "ttft-p90", "itl-p90"]


CACHE_SOURCE_MESSAGE = (
    "model.cache fills a claim from hf:// only (a pvc:// source is a claim already; vLLM streams s3://)"
)
CACHE_CLAIM_MESSAGE = "give model.cache or model.cacheClaim, not both (the cache holds the model itself)"
HUB_ENDPOINT_PATTERN = r"^https?://[^\s/?#]+(/[^\s?#]*)?$"


class ModelCacheSpec(ApiModel):
    """A claim the operator fills with the model once (a Job), which every serving pod then loads from."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.claim) != has(self.size)",
                "give claim (an existing claim) or size (the operator creates one), exactly one",
            )
        )
    )

    claim: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """An existing PersistentVolumeClaim in the namespace (ReadWriteMany when the groups span nodes);
    the model goes under kubemoe-cache/ORG/NAME in it."""
    size: str | None = Field(None, max_length=64, pattern=QUANTITY_PATTERN)
    """The operator creates the claim NAME-model-cache of this size (ReadWriteMany), owned by the
    ModelDeployment: deleting the deployment deletes the cache."""
    storage_class_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """Storage class of the claim the operator creates; the cluster's default when empty."""
    hub_endpoint: str | None = Field(None, max_length=2048, pattern=HUB_ENDPOINT_PATTERN)
    """The Hub's address (HF_ENDPOINT) for the fill, e.g. a mirror; https://huggingface.co when empty."""

    @field_validator("size")
    @classmethod
    def _size_is_quantity(cls, value: str | None) -> str | None:
        if value is not None and parse_quantity(value) <= 0:
            raise ValueError("size must be a positive quantity, e.g. 800Gi")
        return value

    @model_validator(mode="after")
    def _claim_or_size(self) -> ModelCacheSpec:  # the CEL rule above
        if (self.claim is None) == (self.size is None):
            raise ValueError("give claim (an existing claim) or size (the operator creates one), exactly one")
        return self


class ModelSpec(ApiModel):
    """Which model to serve and where its weights live."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.cache) || self.source.startsWith('hf://')",
                CACHE_SOURCE_MESSAGE,
                field_path=".cache",
            ),
            cel("!has(self.cache) || !has(self.cacheClaim)", CACHE_CLAIM_MESSAGE, field_path=".cache"),
        )
    )

    name: str = Field(min_length=1, max_length=253)
    """Served model name; also the catalog key (e.g. deepseek-ai/DeepSeek-V3)."""
    source: str = Field(pattern=SOURCE_PATTERN, max_length=2048)
    """Weights: hf://ORG/NAME, pvc://CLAIM/PATH, s3://BUCKET/PREFIX or file://PATH (local mode)."""
    config: ModelConfig | None = None
    """config.json facts; each one overrides the catalog entry for this model."""
    credentials_secret: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """Secret in the same namespace whose keys the engine reads from its environment: HF_TOKEN for
    hf://; AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN, AWS_REGION and
    AWS_ENDPOINT_URL optional) for s3://. Never copied into arguments, ConfigMaps or status."""
    cache_claim: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """PersistentVolumeClaim (ReadWriteMany) every pod mounts as the Hugging Face cache (hf:// only)."""
    cache: ModelCacheSpec | None = None
    """Fill a claim once from hf:// with a Job before the serving groups start; every pod then loads
    the model from the claim, read-only, and never reaches the Hub (render/model_cache.py)."""


class EngineSpec(ApiModel):
    """The inference engine inside the runtime container."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                f"!has(self.extraArgs) || !self.extraArgs.exists(a, a.matches('{RESERVED_FLAG_PATTERN}'))",
                "extraArgs must not set flags the plan owns (parallelism, ports, KV transfer, KV cache size,"
                " context, memory, dtype)",
                field_path=".extraArgs",
            )
        )
    )

    kind: EngineKind = "vllm"
    """vllm; sglang (SGLang's own server); tgi (Hugging Face TGI's launcher: one pod per group, tensor
    parallelism only, colocated); or torch, kubemoe's built-in engine (cpu, tests, local mode). What
    each supports is the admission table in the spec reference (api/engines.py)."""
    image: str | None = Field(None, max_length=512)
    """Container image of the serving pods; the operator's runtime image when empty (vllm, torch).
    sglang and tgi need their own engine's image here (e.g. an SGLang or TGI release image); routers
    keep the operator's runtime image, and an SGLang P/D router runs sglang-router from this image."""
    max_model_len: int | None = Field(None, ge=1)
    """Longest sequence (prompt + output) in tokens; defaults to the model's context length, and may not
    exceed it (state a longer model.config.maxPositionEmbeddings for a RoPE-scaled context)."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Share of accelerator memory the engine may use for weights, activations and KV cache."""
    extra_args: list[Annotated[str, Field(max_length=1024)]] = Field(default_factory=list, max_length=64)
    """Extra engine flags, appended verbatim. Flags the plan sets are refused in any spelling: the layout,
    ports, model and KV transfer, and what it sizes each rank's memory by (--max-model-len,
    --gpu-memory-utilization, --dtype; the KV cache's size: vLLM's --kv-cache-memory-bytes and
    --num-gpu-blocks-override, SGLang's --mem-fraction-static and --max-total-tokens); in disaggregated
    mode also vLLM's KV offloading (--kv-offloading-size/-backend), which replaces the P/D connector."""


EXTENDED_RESOURCE = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
"""A Kubernetes extended resource name: a domain, a slash, a name (nvidia.com/gpu)."""


class AcceleratorSpec(ApiModel):
    """What each rank runs on."""

    type: str = Field(min_length=1, max_length=63)
    """Catalog key: A100-40GB, A100-80GB, H100, H200, B200, L40S, MI300X, or cpu."""
    per_pod: int = Field(8, ge=1, le=64)
    """Accelerators (for cpu: rank processes) per pod."""
    memory_gib: float | None = Field(None, gt=0, le=2**16, alias="memoryGiB")
    """Memory per accelerator in GiB; overrides the catalog (required for types it lacks)."""
    resource: str | None = Field(None, max_length=253, pattern=EXTENDED_RESOURCE)
    """The extended resource each pod requests for its accelerators (amd.com/gpu, nvidia.com/gpu, ...);
    overrides the catalog's. A type the catalog lacks gets nvidia.com/gpu unless this says otherwise."""
    product_label: bool = True
    """Serving pods require a node whose product label is this type's (nvidia.com/gpu.product, set by
    NVIDIA's GPU feature discovery, e.g. with the GPU Operator; amd.com/gpu.product-name, by AMD's node
    labeller). false where GPU nodes lack it (a managed cluster's device plugin alone): the pods then
    need only the accelerator resource; pick the GPU model with scheduling.nodeSelector (e.g.
    cloud.google.com/gke-accelerator, node.kubernetes.io/instance-type)."""


class KvTransferSpec(ApiModel):
    """How prefill hands its KV cache to decode."""

    connector: Literal["nixl", "lmcache", "example", "mooncake"] = "nixl"
    """nixl (vLLM's NixlConnector, SGLang's nixl transfer backend), lmcache (vLLM's LMCacheConnectorV1:
    the prefill stores the prompt's KV in LMCache's remote store, the decode loads it from there, so both
    roles' pods need the same LMCACHE_REMOTE_URL (or LMCACHE_CONFIG_FILE) and chunk settings in their
    env: a role naming no store, or another store, is refused; PYTHONHASHSEED is 0 in both unless their
    pod.env sets it; see examples/mixtral-8x22b-lmcache.yaml), example (vLLM's ExampleConnector; CPU,
    tests) or mooncake (SGLang's mooncake transfer backend). The torch engine moves KV its own way and
    ignores it."""


class ServingSpec(ApiModel):
    """Prefill/decode disaggregation."""

    mode: Literal["disaggregated", "colocated"] = "disaggregated"
    """disaggregated: prefill and decode roles; colocated: one worker role."""
    kv_transfer: KvTransferSpec = Field(
        default_factory=KvTransferSpec, json_schema_extra=EMPTY_OBJECT_DEFAULT
    )
    """KV-cache transfer between prefill and decode."""


MAX_DATA_PARALLEL = 1024
"""The most data-parallel ranks in one serving group."""


class Parallelism(ApiModel):
    """One serving group's parallelism (vLLM's meaning of each size)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.expert) || self.expert == 1 || self.expert == self.data * self.tensor",
                "expert must be 1 (experts sharded by tensor parallelism) or data * tensor (vLLM's EP size)",
                field_path=".expert",
            )
        )
    )

    tensor: int = Field(1, ge=1, le=64)
    """Tensor-parallel size within each data-parallel rank."""
    data: int = Field(1, ge=1, le=MAX_DATA_PARALLEL)
    """Data-parallel size (attention is data-parallel, experts are expert-parallel)."""
    expert: int | None = Field(None, ge=1, le=1024)
    """Expert-parallel size: data * tensor (the default), or 1 to shard experts by tensor parallelism."""

    @property
    def ranks(self) -> int:
        return self.data * self.tensor

    @property
    def expert_size(self) -> int:
        """The EP size in effect: how many ranks share one copy of the routed experts."""
        return self.ranks if self.expert is None else self.expert

    @property
    def expert_parallel(self) -> bool:
        """Whether vLLM's --enable-expert-parallel is on."""
        return self.expert_size > 1


class MetricTarget(ApiModel):
    """One autoscaling signal and the per-group value to hold it at."""

    type: MetricType
    """gpu-utilization (0-1), kv-cache-usage (0-1), queue-depth (waiting), ttft-p90 or itl-p90 (s)."""
    target: float = Field(gt=0, le=1e9)
    """Target value per serving group."""


class PerDecode(ApiModel):
    """Prefill groups per decode group, kept within [min, max] whatever prefill's own metrics say."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("self.min <= self.max", "min must be less than or equal to max", field_path=".min")
        )
    )

    min: float = Field(gt=0, le=64)
    max: float = Field(gt=0, le=64)


class Autoscaling(ApiModel):
    """Autoscaling policy for one role; the decision lands in status, never in spec."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
                "minReplicas must be less than or equal to maxReplicas",
                field_path=".minReplicas",
            ),
            cel(
                "self.mode == 'external' || has(self.maxReplicas)",
                "maxReplicas is required when the operator scales the role (mode operator)",
                field_path=".maxReplicas",
            ),
            cel(
                "self.mode != 'external' || ((!has(self.metrics) || size(self.metrics) == 0)"
                " && !has(self.perDecode))",
                "with mode external the HPA or ScaledObject holds the metrics: remove metrics and perDecode",
                field_path=".mode",
            ),
        )
    )

    mode: Literal["operator", "external"] = "operator"
    """operator: the operator scales the role on `metrics` (and `perDecode`). external: an HPA or a
    KEDA ScaledObject on the role's workload (its Deployment or LeaderWorkerSet, through the scale
    subresource) owns its replicas; the operator hands spec.replicas over and never writes it again,
    and status.roles.<role>.replicas shows the groups in effect. minReplicas, maxReplicas and the
    metrics then belong to that scaler."""
    min_replicas: int = Field(1, ge=1, le=1024)
    max_replicas: int | None = Field(None, ge=1, le=1024)
    """Required with mode operator."""
    metrics: list[MetricTarget] = Field(default_factory=list, max_length=8)
    """The signals, in the order to prefer them: latency targets first (ttft-p90 for prefill,
    itl-p90 for decode: what users feel), then kv-cache-usage and queue-depth (what builds up before
    latency moves), gpu-utilization last (a duty cycle: a busy GPU may still have room). The largest
    recommendation wins."""
    per_decode: PerDecode | None = None
    """Prefill only: keep prefill groups within [min, max] per decode group, so neither role starves
    the other. Without metrics, prefill simply follows decode (min = max: a fixed ratio)."""
    scale_up_window_seconds: int = Field(60, ge=0, le=3600)
    """Stabilisation window before scaling up: the load must have lasted this long. A minute, because
    a new MoE group takes minutes to load its weights: a shorter burst is over before the group
    serves, and the queue absorbs it."""
    scale_down_window_seconds: int = Field(600, ge=0, le=3600)
    """Stabilisation window before scaling down: the quiet must have lasted this long. Ten minutes,
    because a group removed on a lull costs minutes of loading to bring back."""
    cooldown_seconds: int = Field(120, ge=0, le=3600)
    """No change within this long of the last one, so new groups load and take load before the next
    decision builds on them. Raise it for models that load slower."""
    max_step: int = Field(1, ge=1, le=1024)
    """Most groups added or removed in one decision."""

    @property
    def ceiling(self) -> int:
        """maxReplicas (set whenever the operator scales the role; the field's limit otherwise)."""
        return self.max_replicas if self.max_replicas is not None else 1024

    @property
    def operator_scaled(self) -> bool:
        """Whether the operator decides this role's replicas (on metrics, or following decode)."""
        return self.mode == "operator" and bool(self.metrics or self.per_decode)


class RoleSpec(ApiModel):
    """One role (prefill, decode or worker): identical serving groups."""

    replicas: int = Field(1, ge=1, le=1024)
    """Serving groups; each holds data * tensor ranks."""
    parallelism: Parallelism | None = None
    """Omit to let the planner suggest one (the smallest EP that fits; tensor parallelism alone where the
    engine cannot run EP there: TGI, vLLM on CPU)."""
    resources: Resources | None = None
    autoscaling: Autoscaling | None = None
    pod: PodTemplateOptions | None = None
    """This role's pods only: environment, annotations, labels, volumes, affinity, tolerations, node
    selector, priority class, ServiceAccount, merged into what the operator renders."""


class Roles(ApiModel):
    """prefill and decode (disaggregated), or worker (colocated)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            *(
                cel(
                    f"!has(self.{role}) || !has(self.{role}.autoscaling)"
                    f" || !has(self.{role}.autoscaling.perDecode)",
                    "perDecode ties prefill to decode: set it on roles.prefill.autoscaling only",
                    field_path=f".{role}.autoscaling.perDecode",
                )
                for role in ("decode", "worker")
            )
        )
    )

    prefill: RoleSpec | None = None
    decode: RoleSpec | None = None
    worker: RoleSpec | None = None

    def items(self) -> list[tuple[RoleName, RoleSpec]]:
        """The roles that are set, in serving order."""
        named: tuple[tuple[RoleName, RoleSpec | None], ...] = (
            ("prefill", self.prefill),
            ("decode", self.decode),
            ("worker", self.worker),
        )
        return [(name, role) for name, role in named if role is not None]


MAX_REDUNDANT_EXPERTS = 1024
"""The most redundant expert slots per serving group."""


class RebalanceSpec(ApiModel):
    """When experts move between the ranks of a serving group: the operator moves them on the torch
    engine, vLLM itself on vLLM (its EPLB)."""

    interval_seconds: int = Field(600, ge=60, le=86400)
    """How often the operator gathers each group's expert load and computes a new placement. Ten
    minutes by default: routing skew changes with the traffic's mix, over minutes rather than
    seconds, and each change loads expert copies on some ranks. vLLM rearranges every so many engine
    steps instead, never after so many seconds: it gets intervalSeconds x 5 steps (a nominal 200 ms
    step; the default is vLLM's own 3000 steps) as --eplb-config's step_interval, from the load of the
    last 1000 steps (its window_size). An engine that steps faster rearranges sooner; an idle one, whose
    load does not change, not at all."""
    min_improvement: float = Field(0.05, ge=0, le=1)
    """Apply a new placement only when it lowers the predicted busiest-rank load (over the mean rank
    load) by at least this fraction of the current one: 0.05 is 5 %. 0 applies every improvement.
    Torch engine only: vLLM 0.32 has no such setting (it applies each rearrangement it computes; only
    on ROCm does it skip one that gains under a fixed 5 %)."""


class ExpertsSpec(ApiModel):
    """Expert placement within each expert-parallel serving group: redundant copies of hot experts, and
    rebalancing from the load each rank reports. Absent: each rank keeps its contiguous block of
    experts (E / EP of them) and nothing is rebalanced. Roles without expert parallelism ignore it.

    Torch engine: each pod starts with --redundant-experts and the placement in the ConfigMap
    <name>-<role>-experts, mounted at /etc/kubemoe/experts (until the operator first writes it, pods
    start from contiguous blocks); the operator gathers the groups' load and rewrites the placement.
    vLLM: each pod runs vLLM's own expert load balancing, --enable-eplb with --eplb-config
    {num_redundant_experts, window_size, step_interval}; vLLM measures and rearranges by itself, and
    the planner counts its buffers (one MoE layer of a rank's expert slots and the load window,
    eplbBuffersGiB) besides the copies. vLLM runs it only on CUDA, ROCm and XPU devices, so on cpu
    accelerators this is refused for vLLM (use engine.kind torch)."""

    redundant: int = Field(0, ge=0, le=MAX_REDUNDANT_EXPERTS)
    """Extra expert slots per serving group, spread evenly over its expert-parallel ranks (so a
    multiple of every role's EP size; the planner checks it): each rank holds E / EP + redundant /
    EP experts, and its expert weights grow by that share (`kubemoe plan` shows it). The slots hold
    copies of the hottest experts, whose tokens are split among their copies. Roles without expert
    parallelism ignore it. 0 still rebalances: experts move between ranks, none is copied. vLLM
    gets it as num_redundant_experts."""
    rebalance: RebalanceSpec = Field(default_factory=RebalanceSpec, json_schema_extra=EMPTY_OBJECT_DEFAULT)
    """When to compute and apply a new placement. Torch engine: the operator computes it and writes it
    to the ConfigMap <name>-<role>-experts, which the role's pods load at start (mounted at
    /etc/kubemoe/experts). vLLM: vLLM's own expert load balancing (--enable-eplb) computes and applies
    it inside the engine; the planner counts its buffers (eplbBuffersGiB). vLLM runs it only on CUDA,
    ROCm and XPU devices: on a cpu accelerator spec.experts is refused for vLLM."""


CIDR_PATTERN = r"^[0-9a-fA-F:.]+/[0-9]{1,3}$"


class ApiClient(ApiModel):
    """Who may open connections to the OpenAI API port: the pods whose labels match podLabels in the
    namespaces whose labels match namespaceLabels, or (alone) the addresses in cidr."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.cidr) || (!has(self.namespaceLabels) && !has(self.podLabels))",
                "cidr stands alone: give it in an entry of its own, without namespaceLabels or podLabels",
                field_path=".cidr",
            )
        )
    )

    namespace_labels: dict[str, str] | None = Field(None, max_length=16)
    """Namespaces whose labels all match these ({} matches every namespace; the label
    kubernetes.io/metadata.name names one); absent: the ModelDeployment's own namespace."""
    pod_labels: dict[str, str] | None = Field(None, max_length=16)
    """Pods whose labels all match these; absent or {}: every pod of those namespaces."""
    cidr: str | None = Field(None, max_length=43, pattern=CIDR_PATTERN)
    """Addresses outside the cluster's pods (a load balancer's or NodePort's clients), as a network,
    e.g. 10.0.0.0/8; 0.0.0.0/0 and ::/0 are everyone."""

    @field_validator("cidr")
    @classmethod
    def _network(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.ip_network(value, strict=True)
            except ValueError as err:
                raise ValueError(f"not a network address (e.g. 10.0.0.0/8): {err}") from None
        return value

    @model_validator(mode="after")
    def _cidr_alone(self) -> ApiClient:  # the CEL rule above, for `kubemoe plan` and the operator
        if self.cidr is not None and (self.namespace_labels is not None or self.pod_labels is not None):
            raise ValueError(
                "cidr stands alone: give it in an entry of its own, without namespaceLabels or podLabels"
            )
        return self


class RouterSpec(ApiModel):
    """The OpenAI-compatible front door."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.apiKeySecret) || self.replicas >= 1",
                "apiKeySecret needs a router (replicas >= 1): the workers do not check API keys",
                field_path=".apiKeySecret",
            )
        )
    )

    replicas: int = Field(1, ge=0, le=64)
    """0 only in colocated mode (clients then talk to workers directly)."""
    policy: Literal["round-robin", "least-load", "prefix-hash"] = "least-load"
    resources: Resources | None = None
    """Container resources of each router pod; requests default to cpu 500m, memory 512Mi."""
    allow_from: list[ApiClient] | None = Field(None, max_length=16)
    """Who may reach the API port (the router's; the workers' when replicas is 0), rendered as
    NetworkPolicies: any entry admits. Absent: every pod of the ModelDeployment's namespace; []: no
    one. Serving pods accept nothing else but their own ModelDeployment's pods and the operator's
    metric scrapes. NetworkPolicies take effect only where the network plugin enforces them."""
    local_prefill_below_tokens: int = Field(1024, ge=0, le=1_048_576)
    """Disaggregated mode: prompts the router estimates shorter than this many tokens skip the KV
    hand-off and go to a decode alone, which prefills them itself. 1024 by default, measured by
    bench/bench_pd_ttft.py: below it the hand-off's extra hop costs 18-118 % more time to first
    token, while the prefill it would move off the decode is short (tens of ms) and barely delays
    the decode's other streams; from 2048 tokens P/D's time to first token is within 10 % of
    colocated's. Measure on your hardware with that bench. The router estimates without a
    tokenizer: UTF-8 bytes / 4, token-id prompts exactly. 0: every prompt takes the hand-off."""
    api_key_secret: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """A Secret in this namespace whose key `api-key` holds the API keys, one per line; the router
    then answers 401 to requests without `Authorization: Bearer KEY` (/health, /ready and /metrics
    stay open) and re-reads the keys when the Secret changes. Needs replicas >= 1."""
    pod: PodTemplateOptions | None = None
    """The router's pods only: environment, annotations, labels, volumes, affinity, tolerations, node
    selector, priority class, ServiceAccount (not for SGLang's P/D router, which has its own)."""

    @model_validator(mode="after")
    def _keys_need_a_router(self) -> RouterSpec:  # the CEL rule above, for `kubemoe plan` and the operator
        if self.api_key_secret is not None and self.replicas < 1:
            raise ValueError("apiKeySecret needs a router (replicas >= 1): the workers do not check API keys")
        return self


class PodOptions(ApiModel):
    """What every pod of the ModelDeployment carries besides the operator's own: serving groups and
    the router. The operator's --pod-annotation, --pod-label and --image-pull-secret (chart values
    runtimePodAnnotations, runtimePodLabels, runtimeImagePullSecrets) give defaults; these add to
    them and win on the same key."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                label_rule(),
                "labels must not use the prefixes kubemoe.io/, app.kubernetes.io/ or "
                "leaderworkerset.sigs.k8s.io/ (the operator's and LeaderWorkerSet's own)",
                field_path=".labels",
            )
        )
    )

    annotations: dict[str, str] = Field(default_factory=dict, max_length=MAX_POD_METADATA)
    """Pod annotations (e.g. for a service mesh, a log collector or a cost tool)."""
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_POD_METADATA)
    """Pod labels, except under kubemoe.io/, app.kubernetes.io/ and leaderworkerset.sigs.k8s.io/."""
    image_pull_secrets: list[Annotated[str, Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]] = Field(
        default_factory=list, max_length=16
    )
    """Secrets in the ModelDeployment's namespace for pulling the runtime image (a private registry)."""


class SchedulingSpec(ApiModel):
    """Where the pods may run."""

    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict, max_length=32
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    priority_class_name: str | None = Field(None, max_length=253, pattern=OPTIONAL_DNS_SUBDOMAIN_PATTERN)


class ModelDeploymentSpec(ApiModel):
    """The desired state of a ModelDeployment."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.serving.mode != 'colocated' || "
                "(has(self.roles.worker) && !has(self.roles.prefill) && !has(self.roles.decode))",
                "colocated mode takes exactly one role, worker (no prefill or decode)",
                field_path=".roles",
            ),
            cel(
                "self.serving.mode != 'disaggregated' || "
                "(has(self.roles.prefill) && has(self.roles.decode) && !has(self.roles.worker))",
                "disaggregated mode needs roles prefill and decode, and no worker",
                field_path=".roles",
            ),
            cel(
                "self.serving.mode != 'disaggregated' || self.router.replicas >= 1",
                "disaggregated mode needs at least one router replica",
                field_path=".router.replicas",
            ),
            cel(
                "self.engine.kind != 'sglang' || self.serving.mode != 'disaggregated'"
                " || !has(self.router.pod) || !has(self.router.pod.serviceAccountName)",
                "SGLang's P/D router runs as the ServiceAccount the operator gives it (it reads the "
                "namespace's pods): remove router.pod.serviceAccountName",
                field_path=".router.pod.serviceAccountName",
            ),
            *(
                cel(
                    f"!has(self.roles.{role}) || !has(self.roles.{role}.pod)"
                    f" || !has(self.roles.{role}.pod.nodeSelector) || !has(self.scheduling.nodeSelector)"
                    f" || self.roles.{role}.pod.nodeSelector.all(k, !(k in self.scheduling.nodeSelector)"
                    f" || self.scheduling.nodeSelector[k] == self.roles.{role}.pod.nodeSelector[k])",
                    f"roles.{role}.pod.nodeSelector gives a key of scheduling.nodeSelector another value: "
                    "keep one value per key (a pod cannot be on both)",
                    field_path=f".roles.{role}.pod.nodeSelector",
                )
                for role in ("prefill", "decode", "worker")
            ),
            *cel_rules(),
        )
    )

    model: ModelSpec
    engine: EngineSpec = Field(default_factory=EngineSpec, json_schema_extra=EMPTY_OBJECT_DEFAULT)
    accelerator: AcceleratorSpec
    serving: ServingSpec = Field(default_factory=ServingSpec, json_schema_extra=EMPTY_OBJECT_DEFAULT)
    roles: Roles
    router: RouterSpec = Field(default_factory=RouterSpec, json_schema_extra=EMPTY_OBJECT_DEFAULT)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec, json_schema_extra=EMPTY_OBJECT_DEFAULT)
    pod: PodOptions = Field(default_factory=PodOptions, json_schema_extra=EMPTY_OBJECT_DEFAULT)
    experts: ExpertsSpec | None = None
    """Redundant experts and rebalancing for expert-parallel groups; absent: fixed contiguous blocks."""
