"""One rank's memory (dense weights, its share of the routed experts and of the redundant slots, vLLM's
EPLB buffers, the torch engine's rebalance staging, and the KV cache in what is left), and the smallest
layouts that fit, which the planner suggests where a role leaves its parallelism out.

vLLM, SGLang and TGI size their KV cache from the memory left (the budget), so a layout fits when the
budget holds one sequence of maxModelLen. The torch engine allocates a fixed KV cache up front instead,
(--max-num-seqs + 1) x (--max-model-len + 1) positions per rank (the runtime's kv_budget.kv_cache_bytes),
so a layout fits it only when the budget holds all of those (`TorchKv`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from kubemoe_operator.api.engine_flags import normalised
from kubemoe_operator.api.quantity import parse_quantity
from kubemoe_operator.api.spec import MAX_DATA_PARALLEL, Parallelism, RoleSpec
from kubemoe_operator.catalog.facts import DTYPE_BYTES, GIB, GpuFacts, ModelFacts
from kubemoe_operator.plan.model import MemoryPlan
from kubemoe_operator.plan.redundant import eplb_buffers_gib, redundant_problem, torch_staging_gib

# A suggested layout must leave KV for at least this many maximum-length sequences per rank (not on the
# torch engine, whose KV cache is the fixed one it allocates: TorchKv).
SUGGEST_HEADROOM_SEQUENCES = 4

TORCH_MAX_NUM_SEQS = 16
"""The runtime's default --max-num-seqs (runtime/kubemoe_runtime/pod/settings.py): the KV-cache slots, one
sequence each, a torch-engine rank allocates; plan/command.py passes none, engine.extraArgs may."""
TORCH_MAX_NUM_SEQS_FLAG = "max-num-seqs"
TORCH_MAX_NUM_SEQS_SHORTEST = len("max-num-s")
"""The runtime's argparse takes a unique prefix of a flag: from `--max-num-s` on (`--max-num-` is shared with
--max-num-batched-tokens)."""


@dataclass(frozen=True)
class TorchKv:
    """The torch engine's KV cache: each rank allocates it up front, whatever memory is left,
    (max_num_seqs + 1) slots x (maxModelLen + 1) positions (one spare slot for dummy rows, one spare
    position for padding: the runtime's kv_budget.kv_cache_bytes), and serves at most max_num_seqs
    sequences at once."""

    max_num_seqs: int = TORCH_MAX_NUM_SEQS
    given: bool = False
    """Whether engine.extraArgs set --max-num-seqs (else the runtime's default)."""

    def positions(self, max_len: int) -> int:
        return (self.max_num_seqs + 1) * (max_len + 1)

    def flag(self) -> str:
        """`--max-num-seqs N` and where N comes from, for the plan's text."""
        where = "from engine.extraArgs" if self.given else "the runtime's default"
        return f"--max-num-seqs {self.max_num_seqs}, {where}"

    def shape(self, max_len: int) -> str:
        return f"({self.max_num_seqs} + 1) x ({max_len} + 1) positions"


def torch_kv(extra_args: Sequence[str]) -> TorchKv:
    """The torch engine's KV slots: extraArgs' --max-num-seqs (`--max-num-seqs N`, `--max-num-seqs=N`, or a
    prefix of it the runtime's argparse takes; the last one wins), else the runtime's default. A value the
    runtime would refuse (not a positive integer) stops the pod as it starts, so it sizes nothing here."""
    value = _flag_value(extra_args, TORCH_MAX_NUM_SEQS_FLAG, shortest=TORCH_MAX_NUM_SEQS_SHORTEST)
    if value is not None and value.strip().isdigit() and int(value) >= 1:
        return TorchKv(max_num_seqs=int(value), given=True)
    return TorchKv()


@dataclass(frozen=True)
class Sizing:
    memory: MemoryPlan
    weights_fit: bool
    longest: int = 0
    """The longest maxModelLen the KV budget holds (the one to suggest): one sequence of it, or on the torch
    engine the whole cache it allocates (`TorchKv`) at that length."""
    budget_tokens: int = 0
    """Tokens the KV budget holds (memory.kv_tokens, but on the torch engine: its sequences' tokens)."""
    torch: TorchKv | None = None
    """The torch engine's up-front KV cache; None for the engines that size theirs from the budget."""

    def kv_cache_gib(self) -> float:
        """The KV cache the torch engine allocates per rank, in GiB (0 for the other engines)."""
        if self.torch is None:
            return 0.0
        return self.torch.positions(self.memory.max_model_len) * self.memory.kv_bytes_per_token / GIB

    def kv_short(self) -> str:
        """What the KV budget falls short of, for the problems (`... leaves KV for ...`)."""
        mem = self.memory
        if self.torch is None:
            return f"KV for {mem.kv_tokens} tokens, less than one sequence of maxModelLen={mem.max_model_len}"
        return (
            f"{mem.kv_budget_gib:.2f} GiB for KV, less than the {self.kv_cache_gib():.2f} GiB KV cache the"
            f" torch engine allocates up front ({self.torch.shape(mem.max_model_len)}; {self.torch.flag()})"
        )


def divisors(n: int) -> list[int]:
    """Divisors in order, in O(sqrt n) (the API caps every count this is asked about)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def expert_shards(par: Parallelism) -> int:
    """How many ranks of a group share one copy of the routed experts: the EP size with expert
    parallelism; without it every rank of the group, data x tensor. vLLM shards MoE weights over
    data x tensor when expert parallelism is off (FusedMoEParallelConfig.make: flatten_tp_across_dp),
    and an SGLang group is one server of --tp-size data x tensor ranks; TGI has no data parallelism and
    the torch engine no tensor parallelism (and data > 1 only with expert parallelism), so for them it
    is the tensor size, or the one rank holding every expert."""
    return par.expert_size if par.expert_parallel else par.ranks


def vllm_batched_tokens(gpu: GpuFacts) -> int:
    """vLLM's default max_num_batched_tokens for its API server on `gpu` (its chunked-prefill step; vLLM
    0.32's EngineArgs defaults by the device's memory): 16384 from 160 GiB (B200, MI300X), 8192 from 70 GiB
    except on an A100 (H100, H200), else 2048 (A100, L40S)."""
    if gpu.memory_gib >= 160:
        return 16384
    if gpu.memory_gib >= 70 and "a100" not in gpu.name.lower():
        return 8192
    return 2048


def _flag_value(args: Sequence[str], flag: str, *, shortest: int | None = None) -> str | None:
    """The value extraArgs give `flag` (`--flag V`, `--flag=V`, with _ for -; the last one wins, as argparse
    keeps it), or None; an abbreviation of it is recognised only from `shortest` characters on (None: not
    at all)."""
    value = None
    for i, arg in enumerate(args):
        name = normalised(arg)
        named = name == flag or (shortest is not None and len(name) >= shortest and flag.startswith(name))
        if arg.startswith("--") and named:
            value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else None)
    return value


def _switched(args: Sequence[str], flag: str) -> bool | None:
    """The last of `--flag` / `--no-flag` in extraArgs (argparse keeps the last): True, False, or None."""
    last = None
    for arg in args:
        if arg.startswith("--") and normalised(arg) in (flag, f"no-{flag}"):
            last = normalised(arg) == flag
    return last


def vllm_in_flight_tokens(gpu: GpuFacts, extra_args: Sequence[str] = ()) -> int:
    """Tokens vLLM schedules and has not yet settled (VllmConfig.max_in_flight_tokens): max_num_batched_tokens
    (extraArgs' --max-num-batched-tokens, else `vllm_batched_tokens`) times its concurrent batches, 2 with
    async scheduling (on wherever nothing rules it out; 1 after extraArgs' --no-async-scheduling). A
    sliding-window or chunked layer holds these beyond its window, as blocks are freed only once their step
    is processed."""
    given = _flag_value(extra_args, "max-num-batched-tokens")
    batched = int(given) if given is not None and given.isdigit() else vllm_batched_tokens(gpu)
    batches = 1 if _switched(extra_args, "async-scheduling") is False else 2
    return batches * batched


def _hybrid_kept(extra_args: Sequence[str]) -> bool:
    """Whether extraArgs leave vLLM's hybrid KV cache manager on: not turned off
    (--disable-hybrid-kv-cache-manager), nor LMCache's offloading chosen (--kv-offloading-backend lmcache:
    its connector does not support the manager)."""
    disabled = _switched(extra_args, "disable-hybrid-kv-cache-manager") is True
    return not disabled and _flag_value(extra_args, "kv-offloading-backend") != "lmcache"


def engine_kv(
    model: ModelFacts, *, engine: str, gpu: GpuFacts, connector: str | None, extra_args: Sequence[str] = ()
) -> ModelFacts:
    """`model` with the tokens of a sequence each sliding-window and each chunked layer keeps in `engine`
    (`sliding_kept`, `chunked_kept`). vLLM's hybrid KV cache manager keeps window - 1 + in-flight tokens
    (`vllm_in_flight_tokens`) of them in a sliding-window layer (SlidingWindowSpec.
    max_admission_blocks_per_request) and attention_chunk_size + in-flight tokens in a chunked one
    (ChunkedLocalAttentionSpec's: the current chunk and the steps' tokens), with no KV connector or one that
    supports it (NIXL: not LMCache nor the example connector), and not turned off in extraArgs
    (`_hybrid_kept`), else it makes every layer a full one. (With chunked layers vLLM also turns it off for
    an EAGLE draft model, or where VLLM_ALLOW_CHUNKED_LOCAL_ATTN_WITH_HYBRID_KV_CACHE=0; it defaults to 1.)
    Counted on GPUs only: vLLM's
    CPU build keeps windows too, but its batch there follows the model and the memory, so a CPU plan counts
    every layer full (it promises less KV than there is, never more). The other engines keep every token in
    every layer."""
    hybrid = engine == "vllm" and not gpu.is_cpu and connector in (None, "nixl") and _hybrid_kept(extra_args)
    window = model.sliding_window if hybrid and model.sliding_window_layers else None
    chunk = model.attention_chunk_size if hybrid and model.chunked_layers else None
    in_flight = vllm_in_flight_tokens(gpu, extra_args) if window or chunk else 0
    return replace(
        model,
        sliding_kept=window - 1 + in_flight if window else None,
        chunked_kept=chunk + in_flight if chunk else None,
    )


def device_memory_gib(*, role: RoleSpec, gpu: GpuFacts, devices_per_pod: int) -> float | None:
    """Memory one rank may use: the GPU's, or for cpu the pod's memory request split over its ranks."""
    if not gpu.is_cpu:
        return gpu.memory_gib
    res = role.resources
    quantity = None if res is None else res.requests.get("memory", res.limits.get("memory"))
    if quantity is None:
        return None
    return parse_quantity(quantity) / GIB / devices_per_pod


def size_rank(
    *,
    model: ModelFacts,
    par: Parallelism,
    device_gib: float,
    utilization: float,
    reserve_gib: float,
    max_len: int,
    redundant: int = 0,
    eplb: bool = False,
    staging: bool = False,
    torch: TorchKv | None = None,
) -> Sizing:
    """One rank's memory; `redundant` expert slots per group add redundant / EP experts to each rank,
    `eplb` (vLLM's expert load balancing) its buffers, and `staging` (the torch engine's live rebalances)
    its staging reserve (redundant.py `torch_staging_gib`: counted in the reserve), on an expert-parallel
    rank. With `torch` (the torch engine's KV cache) kv_tokens and sequences_at_max_len are the cache's:
    max_num_seqs sequences of maxModelLen, which it serves at most, whatever the budget; kv_budget_gib is
    the memory left for KV either way."""
    tp, ep = par.tensor, par.expert_size
    shards = expert_shards(par)
    # every rank holds all the routers; the rest of the dense weights is split over the tensor ranks
    dense = ((model.dense_weight_bytes - model.router_bytes) / tp + model.router_bytes) / GIB
    routed_bytes = model.routed_params * DTYPE_BYTES[model.expert_weight_dtype]
    extra = routed_bytes / model.num_routed_experts * (redundant / ep) / GIB if par.expert_parallel else 0.0
    experts = routed_bytes / shards / GIB + extra
    buffers = eplb_buffers_gib(model, par, redundant) if eplb and par.expert_parallel else 0.0
    reserve_gib += torch_staging_gib(experts) if staging and par.expert_parallel else 0.0
    usable = device_gib * utilization - reserve_gib
    budget = max(0.0, usable - dense - experts - buffers)
    per_token = model.kv_bytes_per_token(tensor=tp, max_len=max_len)
    tokens = int(budget * GIB // per_token)
    if torch is None:
        kv_tokens, sequences = tokens, round(tokens / max_len, 2)
        longest = model.longest_sequence(budget * GIB, tensor=tp)
    else:  # every layer keeps every token on the torch engine (engine_kv), so per_token is constant
        kv_tokens, sequences = torch.max_num_seqs * max_len, float(torch.max_num_seqs)
        longest = tokens // (torch.max_num_seqs + 1) - 1
    memory = MemoryPlan(
        device_gib=round(device_gib, 2),
        utilization=utilization,
        reserve_gib=round(reserve_gib, 4),
        dense_weights_gib=round(dense, 4),
        expert_weights_gib=round(experts, 4),
        redundant_weights_gib=round(extra, 4),
        weights_gib=round(dense + experts, 4),
        eplb_buffers_gib=round(buffers, 4),
        kv_budget_gib=round(budget, 4),
        kv_bytes_per_token=per_token,
        kv_tokens=kv_tokens,
        max_model_len=max_len,
        sequences_at_max_len=sequences,
    )
    return Sizing(
        memory=memory,
        weights_fit=dense + experts + buffers < usable,
        longest=longest,
        budget_tokens=tokens,
        torch=torch,
    )


def fits(sizing: Sizing, max_len: int, sequences: int = 1) -> bool:
    """Whether the weights fit with KV for `sequences` sequences of `max_len` (the length `sizing` was sized
    for), or, on the torch engine, with the whole KV cache it allocates (more sequences would go unused)."""
    need = sizing.torch.positions(max_len) if sizing.torch is not None else sequences * max_len
    return sizing.weights_fit and sizing.budget_tokens >= need


def layout_ok(ranks: int, per_pod: int) -> bool:
    return ranks <= per_pod or ranks % per_pod == 0


def _headroom(
    *,
    model: ModelFacts,
    gpu: GpuFacts,
    role: RoleSpec,
    par: Parallelism,
    devices_per_pod: int,
    utilization: float,
    max_len: int,
    redundant: int = 0,
    eplb: bool = False,
    staging: bool = False,
    sequences: int = SUGGEST_HEADROOM_SEQUENCES,
    torch: TorchKv | None = None,
) -> bool | None:
    """Whether `par` holds the weights with KV for `sequences` sequences of `max_len` (the suggestions'
    test; 1 is the planner's own `fits`), or with the torch engine's KV cache (`torch`); None when the
    role's device memory is unknown."""
    device = device_memory_gib(role=role, gpu=gpu, devices_per_pod=devices_per_pod)
    if device is None:
        return None
    sizing = size_rank(
        model=model,
        par=par,
        device_gib=device,
        utilization=utilization,
        reserve_gib=gpu.reserve_gib,
        max_len=max_len,
        redundant=redundant,
        eplb=eplb,
        staging=staging,
        torch=torch,
    )
    return fits(sizing, max_len, sequences)


def suggest_parallelism(
    *,
    model: ModelFacts,
    gpu: GpuFacts,
    role: RoleSpec,
    per_pod: int,
    utilization: float,
    max_len: int,
    redundant: int = 0,
    eplb: bool = False,
    staging: bool = False,
    sequences: int = SUGGEST_HEADROOM_SEQUENCES,
    torch: TorchKv | None = None,
) -> Parallelism | None:
    """The smallest EP (tensor 1, data = EP) that fits with KV for `sequences` sequences of `max_len`
    (SUGGEST_HEADROOM_SEQUENCES for a role without parallelism; 1, the planner's `fits`, for the fix of a
    layout that does not fit), or with the torch engine's whole KV cache (`torch`), and whose ranks share
    `redundant` expert slots evenly (EP 1 has no expert parallelism, so no redundant slots), with vLLM's
    EPLB buffers when `eplb` and the torch engine's staging reserve when `staging`. Only for an engine
    that runs expert parallelism where the role runs (not vLLM on cpu: the planner asks `suggest_tensor`)."""
    for ep in divisors(model.num_routed_experts):
        if ep > MAX_DATA_PARALLEL:
            break
        if not layout_ok(ep, per_pod):
            continue
        if ep > 1 and redundant_problem(redundant, ep=ep, experts=model.num_routed_experts) is not None:
            continue
        par = Parallelism(tensor=1, data=ep)
        room = _headroom(
            model=model, gpu=gpu, role=role, par=par, devices_per_pod=min(per_pod, ep),
            utilization=utilization, max_len=max_len, redundant=redundant, eplb=eplb, staging=staging,
            sequences=sequences, torch=torch,
        )  # fmt: skip
        if room is None:
            return None
        if room:
            return par
    return None


def suggest_tensor(
    *,
    model: ModelFacts,
    gpu: GpuFacts,
    role: RoleSpec,
    per_pod: int,
    utilization: float,
    max_len: int,
    sequences: int = SUGGEST_HEADROOM_SEQUENCES,
) -> Parallelism | None:
    """For engines without expert parallelism (tgi), or that cannot run it where the role runs (vLLM on cpu:
    EngineSupport.cpu_parallel): the smallest tensor-parallel size within one pod (dividing the attention
    heads) that fits with KV for `sequences` sequences of `max_len`, without data or expert parallelism
    (expert 1: experts sharded by tensor parallelism)."""
    for tp in divisors(model.num_attention_heads):
        if tp > per_pod:
            break
        kv = model.num_key_value_heads
        if not model.mla and kv % tp and tp % kv:
            continue
        par = Parallelism(tensor=tp, data=1, expert=1)
        room = _headroom(
            model=model, gpu=gpu, role=role, par=par, devices_per_pod=tp, utilization=utilization,
            max_len=max_len, sequences=sequences,
        )  # fmt: skip
        if room is None:
            return None
        if room:
            return par
    return None
