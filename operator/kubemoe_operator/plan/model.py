"""The plan: the layout the operator builds for a ModelDeployment, as data.

`kubemoe plan -o json` prints `Plan.model_dump(by_alias=True, mode="json")`; the shape is
stable within apiVersion kubemoe.io/v1alpha1 (fields are added, never renamed or removed):

- top level: name, model, architecture, reference, engine, accelerator, resource,
  nodeLabel and nodeLabelValues (the accelerator's product label), mode, connector,
  layout ("P1x(EP16) D1x(EP16)"), devices (GPUs, or rank processes for cpu),
  pods, roles[], router, notes[].
- roles[]: role, replicas (serving groups), tensor, data, expert (EP size), expertParallel,
  ranks (per group), podsPerGroup, devicesPerPod, devicesPerGroup, devices (all groups),
  workload (LeaderWorkerSet | Deployment), expertsPerRank, redundantExperts (extra expert slots
  per group, spec.experts.redundant), slotsPerRank (expert slots per rank: expertsPerRank +
  redundantExperts / EP), suggested (parallelism chosen by the planner), memory{...},
  host{cpu, memory, shm} (per pod, besides the accelerators), pods[] (one group; every group is alike).
- memory: deviceGiB, utilization, reserveGiB, denseWeightsGiB, expertWeightsGiB (redundant
  slots included), redundantWeightsGiB (their share of it), weightsGiB, eplbBuffersGiB (vLLM's
  expert load balancing), kvBudgetGiB, kvBytesPerToken, kvTokens, maxModelLen, sequencesAtMaxLen —
  all per rank. kvBudgetGiB is the memory left for KV; kvTokens and sequencesAtMaxLen are what it holds,
  except on the torch engine, which allocates a fixed KV cache up front, (--max-num-seqs + 1) x
  (maxModelLen + 1) positions (a note gives its size), and serves at most --max-num-seqs sequences:
  there they are --max-num-seqs x maxModelLen and --max-num-seqs.
- pods[]: index, leader, startRank (data-parallel), dataLocal, devices, address (leader's
  address for multi-pod groups), ranks[] {rank, dataRank, tensorRank, device, firstExpert,
  expertCount}, command (argv with vLLM's flag names).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubemoe_operator.api.base import ApiModel
from kubemoe_operator.api.engines import EngineKind
from kubemoe_operator.api.spec import RoleName


class RankPlan(ApiModel):
    rank: int
    """Global rank in the group: dataRank * tensor + tensorRank (also the EP rank)."""
    data_rank: int
    tensor_rank: int
    device: int
    """Device index within its pod."""
    first_expert: int
    """First routed expert this rank holds (with EP off: 0, and every expert as a 1/(data x tensor)
    slice: vLLM and SGLang shard the experts over all the group's ranks)."""
    expert_count: int


class PodPlan(ApiModel):
    index: int
    """Pod index within the group (LeaderWorkerSet worker index; 0 is the leader)."""
    leader: bool
    start_rank: int
    """--data-parallel-start-rank."""
    data_local: int
    """--data-parallel-size-local: data-parallel ranks in this pod."""
    devices: int
    address: str | None
    """--data-parallel-address (the group leader), for multi-pod groups."""
    ranks: list[RankPlan]
    command: list[str] = Field(default_factory=list)


class MemoryPlan(ApiModel):
    device_gib: float = Field(alias="deviceGiB")
    utilization: float
    reserve_gib: float = Field(alias="reserveGiB")
    dense_weights_gib: float = Field(alias="denseWeightsGiB")
    expert_weights_gib: float = Field(alias="expertWeightsGiB")
    """Routed experts per rank, the redundant slots' copies included."""
    redundant_weights_gib: float = Field(0.0, alias="redundantWeightsGiB")
    """The redundant slots' share of expert_weights_gib."""
    weights_gib: float = Field(alias="weightsGiB")
    eplb_buffers_gib: float = Field(0.0, alias="eplbBuffersGiB")
    """vLLM's expert load balancing (spec.experts on a vLLM expert-parallel role): the buffer one MoE
    layer's expert slots move through, and the window of per-step expert loads; 0 otherwise. Not
    weights, but taken from the KV budget like them."""
    kv_budget_gib: float = Field(alias="kvBudgetGiB")
    """The memory left for KV (the torch engine's cache, sized by --max-num-seqs, takes part of it)."""
    kv_bytes_per_token: float
    kv_tokens: int
    """KV tokens a rank holds: what the budget holds, or the torch engine's max_num_seqs x max_model_len."""
    max_model_len: int
    sequences_at_max_len: float
    """kv_tokens / max_model_len: on the torch engine its --max-num-seqs."""


class HostPlan(ApiModel):
    """One pod's share of its node besides the accelerators (planner.host_plan)."""

    cpu: str
    """CPU request (spec.roles.<role>.resources.requests.cpu overrides it)."""
    memory: str
    """Memory request, /dev/shm included (spec.roles.<role>.resources.requests.memory overrides it)."""
    shm: str
    """Size of the memory-backed /dev/shm."""


class RolePlan(ApiModel):
    role: RoleName
    replicas: int
    tensor: int
    data: int
    expert: int
    expert_parallel: bool
    ranks: int
    pods_per_group: int
    devices_per_pod: int
    devices_per_group: int
    devices: int
    workload: Literal["LeaderWorkerSet", "Deployment"]
    experts_per_rank: int
    """Routed experts each rank owns (its contiguous block; all of them with EP off)."""
    redundant_experts: int = 0
    """Extra expert slots per group (spec.experts.redundant; 0 with EP off)."""
    slots_per_rank: int = 0
    """Expert slots per rank: experts_per_rank + redundant_experts / EP."""
    suggested: bool
    memory: MemoryPlan
    host: HostPlan
    pods: list[PodPlan]


class RouterPlan(ApiModel):
    replicas: int
    policy: str
    local_prefill_below_tokens: int = 1024


class Plan(ApiModel):
    api_version: Literal["kubemoe.io/v1alpha1"] = Field("kubemoe.io/v1alpha1", alias="apiVersion")
    kind: Literal["Plan"] = "Plan"
    name: str
    model: str
    source: str
    architecture: str
    reference: str
    engine: EngineKind
    dtype: str
    accelerator: str
    resource: str | None
    node_label: str | None = None
    """The node label naming the accelerator product (e.g. nvidia.com/gpu.product); None for cpu
    and for accelerators the catalog lacks."""
    node_label_values: list[str] = Field(default_factory=list)
    """The values of node_label that serving pods require (any one of them)."""
    mode: Literal["disaggregated", "colocated"]
    connector: str | None
    extra_args: list[str] = Field(default_factory=list)
    layout: str
    devices: int
    pods: int
    roles: list[RolePlan]
    router: RouterPlan
    notes: list[str] = Field(default_factory=list)

    def role(self, name: str) -> RolePlan:
        for role in self.roles:
            if role.role == name:
                return role
        raise KeyError(name)
