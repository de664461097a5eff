"""`plan(spec, model_facts, gpu_facts) -> Plan`: the layout of every role, pure.

Per role, one serving group holds data x tensor ranks (with expert parallelism, vLLM's EP size
is data x tensor) spread over ceil(ranks / perPod) pods. Each rank holds the dense weights
split by tensor parallelism and its share of the routed experts, plus its share of the group's
redundant expert slots (`spec.experts.redundant`: E / EP + redundant / EP experts per rank) and, on
vLLM with spec.experts, the buffers of vLLM's expert load balancing (EPLB); what is left of
`gpuMemoryUtilization` x memory, less a runtime reserve, is the KV cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kubemoe_operator.api.engines import expert_default, support
from kubemoe_operator.api.problems import ManifestError, Problem
from kubemoe_operator.api.quantity import parse_quantity
from kubemoe_operator.api.resource import ModelDeployment
from kubemoe_operator.api.spec import MAX_DATA_PARALLEL, ModelDeploymentSpec, Parallelism, RoleName, RoleSpec
from kubemoe_operator.catalog import Catalog, load_catalog, resolve_gpu, resolve_model
from kubemoe_operator.catalog.facts import DTYPE_BYTES, GIB, GpuFacts, ModelFacts
from kubemoe_operator.plan.cache import cache_claim_name, cache_path, served_source
from kubemoe_operator.plan.command import LWS_LEADER_ADDRESS, pod_command
from kubemoe_operator.plan.host_sizing import host_plan, limit_problems
from kubemoe_operator.plan.model import MemoryPlan, Plan, PodPlan, RankPlan, RolePlan, RouterPlan

# A suggested layout must leave KV for at least this many maximum-length sequences per rank.
SUGGEST_HEADROOM_SEQUENCES = 4

VLLM_EPLB_WINDOW_STEPS = 1000
"""Engine steps of expert load vLLM's EPLB keeps (its own default). Rendered explicitly, so the
window counted in eplb_buffers_gib is the one vLLM allocates."""
VLLM_NOMINAL_STEPS_PER_SECOND = 5
"""vLLM's EPLB rearranges experts every so many engine steps, never after so many seconds, so
spec.experts.rebalance.intervalSeconds is rendered as that many seconds of steps at this nominal rate
(a 200 ms step): the default ten minutes is vLLM's own default, 3000 steps. An engine that steps
faster (short decode steps) rearranges sooner; an idle one, whose load does not change, not at all."""
EPLB_LOAD_BYTES = 4
"""vLLM's EPLB counts each physical expert's tokens per step and MoE layer in int32."""


def vllm_eplb(spec: ModelDeploymentSpec) -> bool:
    """Whether vLLM's expert-parallel roles run vLLM's expert load balancing: spec.experts on vLLM."""
    return spec.engine.kind == "vllm" and spec.experts is not None


def vllm_eplb_step_interval(interval_seconds: int) -> int:
    """vLLM's eplb_config.step_interval for spec.experts.rebalance.intervalSeconds."""
    return interval_seconds * VLLM_NOMINAL_STEPS_PER_SECOND


def _eplb_buffers_gib(model: ModelFacts, par: Parallelism, redundant: int) -> float:
    """vLLM's EPLB state on one rank (vllm/distributed/eplb/eplb_state.py): a buffer shaped like one MoE
    layer's expert weights on the rank ((E + N) / EP slots), through which rearranged experts move, and
    the int32 load of every physical expert of every MoE layer for the window's steps and the current one."""
    physical = model.num_routed_experts + redundant
    layer = physical // par.expert_size * model.params_per_expert * DTYPE_BYTES[model.expert_weight_dtype]
    loads = (VLLM_EPLB_WINDOW_STEPS + 1) * model.moe_layers * physical * EPLB_LOAD_BYTES
    return (layer + loads) / GIB


@dataclass(frozen=True)
class _Sizing:
    memory: MemoryPlan
    weights_fit: bool


def _divisors(n: int) -> list[int]:
    """Divisors in order, in O(sqrt n) (the API caps every count this is asked about)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def _device_memory_gib(*, role: RoleSpec, gpu: GpuFacts, devices_per_pod: int) -> float | None:
    """Memory one rank may use: the GPU's, or for cpu the pod's memory request split over its ranks."""
    if not gpu.is_cpu:
        return gpu.memory_gib
    res = role.resources
    quantity = None if res is None else res.requests.get("memory", res.limits.get("memory"))
    if quantity is None:
        return None
    return parse_quantity(quantity) / GIB / devices_per_pod


def _size(
    *,
    model: ModelFacts,
    par: Parallelism,
    device_gib: float,
    utilization: float,
    reserve_gib: float,
    max_len: int,
    redundant: int = 0,
    eplb: bool = False,
) -> _Sizing:
    """One rank's memory; `redundant` expert slots per group add redundant / EP experts to each rank,
    and `eplb` (vLLM's expert load balancing) its buffers, on an expert-parallel rank."""
    tp, ep = par.tensor, par.expert_size
    expert_shards = ep if par.expert_parallel else tp
    dense = model.dense_params * DTYPE_BYTES[model.weight_dtype] / tp / GIB
    routed_bytes = model.routed_params * DTYPE_BYTES[model.expert_weight_dtype]
    extra = routed_bytes / model.num_routed_experts * (redundant / ep) / GIB if par.expert_parallel else 0.0
    experts = routed_bytes / expert_shards / GIB + extra
    buffers = _eplb_buffers_gib(model, par, redundant) if eplb and par.expert_parallel else 0.0
    usable = device_gib * utilization - reserve_gib
    budget = max(0.0, usable - dense - experts - buffers)
    per_token = model.kv_bytes_per_token(tensor=tp)
    tokens = int(budget * GIB // per_token)
    memory = MemoryPlan(
        device_gib=round(device_gib, 2),
        utilization=utilization,
        reserve_gib=reserve_gib,
        dense_weights_gib=round(dense, 4),
        expert_weights_gib=round(experts, 4),
        redundant_weights_gib=round(extra, 4),
        weights_gib=round(dense + experts, 4),
        eplb_buffers_gib=round(buffers, 4),
        kv_budget_gib=round(budget, 4),
        kv_bytes_per_token=per_token,
        kv_tokens=tokens,
        max_model_len=max_len,
        sequences_at_max_len=round(tokens / max_len, 2),
    )
    return _Sizing(memory=memory, weights_fit=dense + experts + buffers < usable)


def _fits(sizing: _Sizing, max_len: int) -> bool:
    return sizing.weights_fit and sizing.memory.kv_tokens >= max_len


def _redundant_too_big(
    sizing: _Sizing, *, role: RoleName, ep: int, redundant: int, fits: int, gpu: GpuFacts
) -> Problem:
    """The problem when the model fits a role's ranks without its redundant slots but not with them."""
    mem = sizing.memory
    usable = mem.device_gib * mem.utilization - mem.reserve_gib
    short = (
        f"leave KV for {mem.kv_tokens} tokens, less than one sequence of maxModelLen={mem.max_model_len}"
        if sizing.weights_fit
        else f"pass the {usable:.1f} GiB {gpu.name} leaves"
    )
    buffers = f" (and {mem.eplb_buffers_gib:.2f} GiB of vLLM's EPLB buffers)" if mem.eplb_buffers_gib else ""
    return Problem(
        field=REDUNDANT_FIELD,
        message=f"{redundant} redundant expert slots put {redundant // ep} more experts on each of the"
        f" EP={ep} ranks of {role} ({mem.redundant_weights_gib:.2f} GiB), so its {mem.weights_gib:.1f} GiB"
        f" of weights{buffers} {short}.",
        fix=f"set experts.redundant <= {fits} (a multiple of {ep}), or spread the model over more ranks.",
    )


def _eplb_too_big(mem: MemoryPlan, *, role: RoleName, max_len: int) -> Problem:
    """The problem when a role fits without vLLM's EPLB buffers, but not with them."""
    return Problem(
        field=EXPERTS_FIELD,
        message=f"vLLM's expert load balancing (EPLB), which spec.experts turns on, needs"
        f" {mem.eplb_buffers_gib:.2f} GiB on each rank of {role}, which leaves KV for {mem.kv_tokens} tokens,"
        f" less than one sequence of maxModelLen={max_len}.",
        fix="remove experts, lower engine.maxModelLen, or spread the model over more ranks.",
    )


def _layout_ok(ranks: int, per_pod: int) -> bool:
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
) -> bool | None:
    """Whether `par` holds the weights with SUGGEST_HEADROOM_SEQUENCES sequences of KV (the suggestions'
    test); None when the role's device memory is unknown."""
    device = _device_memory_gib(role=role, gpu=gpu, devices_per_pod=devices_per_pod)
    if device is None:
        return None
    sizing = _size(
        model=model,
        par=par,
        device_gib=device,
        utilization=utilization,
        reserve_gib=gpu.reserve_gib,
        max_len=max_len,
        redundant=redundant,
        eplb=eplb,
    )
    return sizing.weights_fit and sizing.memory.kv_tokens >= SUGGEST_HEADROOM_SEQUENCES * max_len


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
) -> Parallelism | None:
    """The smallest EP (tensor 1, data = EP) that fits with SUGGEST_HEADROOM_SEQUENCES of KV, and whose
    ranks share `redundant` expert slots evenly (EP 1 has no expert parallelism, so no redundant slots),
    with vLLM's EPLB buffers when `eplb`."""
    for ep in _divisors(model.num_routed_experts):
        if ep > MAX_DATA_PARALLEL:
            break
        if not _layout_ok(ep, per_pod):
            continue
        if ep > 1 and _redundant_problem(redundant, ep=ep, experts=model.num_routed_experts) is not None:
            continue
        par = Parallelism(tensor=1, data=ep)
        room = _headroom(
            model=model, gpu=gpu, role=role, par=par, devices_per_pod=min(per_pod, ep),
            utilization=utilization, max_len=max_len, redundant=redundant, eplb=eplb,
        )  # fmt: skip
        if room is None:
            return None
        if room:
            return par
    return None


def suggest_tensor(
    *, model: ModelFacts, gpu: GpuFacts, role: RoleSpec, per_pod: int, utilization: float, max_len: int
) -> Parallelism | None:
    """For engines without expert parallelism (tgi): the smallest tensor-parallel size within one pod
    (dividing the attention heads and perPod) that fits with SUGGEST_HEADROOM_SEQUENCES of KV."""
    for tp in _divisors(per_pod):
        if model.num_attention_heads % tp:
            continue
        kv = model.num_key_value_heads
        if not model.mla and kv % tp and tp % kv:
            continue
        par = Parallelism(tensor=tp, data=1, expert=1)
        room = _headroom(
            model=model, gpu=gpu, role=role, par=par, devices_per_pod=tp, utilization=utilization,
            max_len=max_len,
        )  # fmt: skip
        if room is None:
            return None
        if room:
            return par
    return None


REDUNDANT_FIELD = "spec.experts.redundant"
EXPERTS_FIELD = "spec.experts"


def _redundant_problem(redundant: int, *, ep: int, experts: int, role: str = "") -> Problem | None:
    """Redundant slots EP ranks cannot share evenly, or more than a copy of every expert on every rank."""
    if redundant % ep:
        lower, upper = redundant // ep * ep, (redundant // ep + 1) * ep
        return Problem(
            field=REDUNDANT_FIELD,
            message=f"redundant={redundant} expert slots do not spread evenly over the EP={ep} ranks"
            + (f" of {role}." if role else "."),
            fix=f"use a multiple of {ep} (every expert-parallel role's EP size),"
            f" e.g. {lower or upper} or {upper}.",
        )
    most = experts * (ep - 1)
    if redundant > most:
        return Problem(
            field=REDUNDANT_FIELD,
            message=f"redundant={redundant} is more than a copy of each of the {experts} experts on every"
            f" one of the {ep} ranks" + (f" of {role}" if role else "") + f" ({most}).",
            fix=f"use at most {most}.",
        )
    return None


def _check_shape(*, model: ModelFacts, par: Parallelism, per_pod: int, path: str) -> list[Problem]:
    problems: list[Problem] = []
    tp, heads, kv = par.tensor, model.num_attention_heads, model.num_key_value_heads
    tp_choices = [d for d in _divisors(heads) if d <= per_pod and per_pod % d == 0]
    if heads % tp:
        problems.append(
            Problem(
                field=f"{path}.tensor",
                message=f"tensor={tp} does not divide the {heads} attention heads.",
                fix=f"use tensor in {tp_choices}.",
            )
        )
    elif not model.mla and kv % tp and tp % kv:
        problems.append(
            Problem(
                field=f"{path}.tensor",
                message=f"tensor={tp} neither divides nor is a multiple of the {kv} KV heads.",
                fix=f"use tensor in {[d for d in tp_choices if kv % d == 0 or d % kv == 0]}.",
            )
        )
    if tp > per_pod or per_pod % tp:
        problems.append(
            Problem(
                field=f"{path}.tensor",
                message=f"a tensor-parallel group of {tp} must fit one pod (accelerator.perPod={per_pod}).",
                fix=f"use tensor in {[d for d in _divisors(per_pod) if heads % d == 0]},"
                " or raise accelerator.perPod.",
            )
        )
    experts = model.num_routed_experts
    if par.expert_parallel and experts % par.expert_size:
        field = f"{path}.expert" if par.expert is not None else f"{path}.data"
        problems.append(
            Problem(
                field=field,
                message=f"EP={par.expert_size} (data x tensor) does not divide the {experts} routed experts.",
                fix=f"choose data x tensor in {[d for d in _divisors(experts) if d > 1]}.",
            )
        )
    if not _layout_ok(par.ranks, per_pod):
        problems.append(
            Problem(
                field=f"{path}.data",
                message=f"{par.ranks} ranks (data x tensor) are not a multiple of"
                f" accelerator.perPod={per_pod},"
                " so pods would differ.",
                fix=f"use data x tensor = {per_pod * max(1, par.ranks // per_pod)} or "
                f"{per_pod * (par.ranks // per_pod + 1)}, or change accelerator.perPod.",
            )
        )
    return problems


def _pods(*, par: Parallelism, model: ModelFacts, devices_per_pod: int) -> list[PodPlan]:
    tp = par.tensor
    pods_per_group = par.ranks // devices_per_pod
    data_local = devices_per_pod // tp
    experts = model.num_routed_experts
    per_rank = experts // par.expert_size if par.expert_parallel else experts
    pods: list[PodPlan] = []
    for index in range(pods_per_group):
        start = index * data_local
        ranks = [
            RankPlan(
                rank=dp * tp + t,
                data_rank=dp,
                tensor_rank=t,
                device=(dp - start) * tp + t,
                first_expert=(dp * tp + t) * per_rank if par.expert_parallel else 0,
                expert_count=per_rank,
            )
            for dp in range(start, start + data_local)
            for t in range(tp)
        ]
        address = LWS_LEADER_ADDRESS if pods_per_group > 1 else None
        pods.append(
            PodPlan(
                index=index,
                leader=index == 0,
                start_rank=start,
                data_local=data_local,
                devices=devices_per_pod,
                address=address,
                ranks=ranks,
            )
        )
    return pods


def _params(count: int) -> str:
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"


def _layout_part(role: RolePlan) -> str:
    parts = []
    if role.data > 1 and (role.tensor > 1 or not role.expert_parallel):
        parts.append(f"DP{role.data}")
    if role.tensor > 1:
        parts.append(f"TP{role.tensor}")
    if role.expert_parallel or role.ranks == 1:
        parts.append(f"EP{role.expert}")
    return f"{role.role[0].upper()}{role.replicas}x({','.join(parts)})"


def _plan_role(
    *,
    name: RoleName,
    role: RoleSpec,
    spec: ModelDeploymentSpec,
    model: ModelFacts,
    gpu: GpuFacts,
    max_len: int,
) -> tuple[RolePlan | None, list[Problem]]:
    path = f"spec.roles.{name}"
    per_pod = spec.accelerator.per_pod
    utilization = spec.engine.gpu_memory_utilization
    par = role.parallelism
    wanted = spec.experts.redundant if spec.experts is not None else 0
    eplb = vllm_eplb(spec)

    engine = support(spec.engine.kind)

    def suggest() -> Parallelism | None:
        if not engine.expert:
            return suggest_tensor(
                model=model, gpu=gpu, role=role, per_pod=per_pod, utilization=utilization, max_len=max_len
            )
        return suggest_parallelism(
            model=model,
            gpu=gpu,
            role=role,
            per_pod=per_pod,
            utilization=utilization,
            max_len=max_len,
            redundant=wanted,
            eplb=eplb,
        )

    if par is None:
        par = suggest()
        if par is None and wanted:
            return None, [
                Problem(
                    field=REDUNDANT_FIELD,
                    message=f"no expert-parallel size up to {model.num_routed_experts} that shares {wanted}"
                    f" redundant expert slots evenly fits {model.name} on {gpu.name} with KV for"
                    f" {SUGGEST_HEADROOM_SEQUENCES} sequences of {max_len} tokens.",
                    fix=f"lower experts.redundant, or set {path}.parallelism.",
                )
            ]
        if par is None and not engine.expert:
            return None, [
                Problem(
                    field=f"{path}.parallelism",
                    message=f"no tensor-parallel size within one pod (accelerator.perPod={per_pod}) fits"
                    f" {model.name} on {gpu.name} with KV for {SUGGEST_HEADROOM_SEQUENCES} sequences of"
                    f" {max_len} tokens, and engine {spec.engine.kind} serves a group from one pod.",
                    fix=f"raise accelerator.perPod, use a larger accelerator or a smaller"
                    f" engine.maxModelLen, or use {engine.instead} (groups over several pods).",
                )
            ]
        if par is None:
            return None, [
                Problem(
                    field=f"{path}.parallelism",
                    message=f"no expert-parallel size up to {model.num_routed_experts} fits {model.name} on "
                    f"{gpu.name} with KV for {SUGGEST_HEADROOM_SEQUENCES} sequences of {max_len} tokens.",
                    fix="set parallelism (tensor > 1 splits the dense weights), a larger accelerator, "
                    "or a smaller engine.maxModelLen.",
                )
            ]
        suggested = True
    else:
        suggested = False
    par = expert_default(spec.engine.kind, par)
    problems = _check_shape(model=model, par=par, per_pod=per_pod, path=f"{path}.parallelism")
    if problems:
        return None, problems
    redundant = wanted if par.expert_parallel else 0
    if redundant:
        bad = _redundant_problem(redundant, ep=par.expert_size, experts=model.num_routed_experts, role=name)
        if bad is not None:
            return None, [bad]
    devices_per_pod = min(per_pod, par.ranks)
    device_gib = _device_memory_gib(role=role, gpu=gpu, devices_per_pod=devices_per_pod)
    if device_gib is None:
        return None, [
            Problem(
                field=f"{path}.resources.requests.memory",
                message="the cpu accelerator sizes each rank from the pod's memory request, and none is set.",
                fix="set resources.requests.memory (e.g. 2Gi).",
            )
        ]

    def size(slots: int, *, balancing: bool = eplb) -> _Sizing:
        return _size(
            model=model,
            par=par,
            device_gib=device_gib,
            utilization=utilization,
            reserve_gib=gpu.reserve_gib,
            max_len=max_len,
            redundant=slots,
            eplb=balancing,
        )

    sizing = size(redundant)
    mem = sizing.memory
    if redundant and not _fits(sizing, max_len) and _fits(size(0), max_len):
        ep = par.expert_size
        fits = max(k * ep for k in range(redundant // ep) if _fits(size(k * ep), max_len))
        return None, [_redundant_too_big(sizing, role=name, ep=ep, redundant=redundant, fits=fits, gpu=gpu)]
    if mem.eplb_buffers_gib and not _fits(size(0), max_len) and _fits(size(0, balancing=False), max_len):
        return None, [_eplb_too_big(size(0).memory, role=name, max_len=max_len)]
    usable = mem.device_gib * utilization - mem.reserve_gib
    shards = f"EP{par.expert_size}" if par.expert_parallel else f"TP{par.tensor}"

    def hint() -> str:
        better = suggest()
        if better is not None and better.expert_size > par.expert_size:
            return f"set parallelism {{tensor: 1, data: {better.data}}} (EP{better.expert_size})"
        return "spread the model over more ranks (data or tensor)"

    if not sizing.weights_fit:
        buffers = f" + {mem.eplb_buffers_gib:.1f} vLLM EPLB buffers" if mem.eplb_buffers_gib else ""
        problems.append(
            Problem(
                field=f"{path}.parallelism",
                message=f"weights need {mem.weights_gib:.1f} GiB per rank ({mem.dense_weights_gib:.1f} dense"
                f" / TP{par.tensor} + {mem.expert_weights_gib:.1f} experts / {shards}{buffers})"
                f" but {gpu.name} leaves {usable:.1f} GiB "
                f"({mem.device_gib:.1f} GiB x {utilization:g} - {mem.reserve_gib:g} GiB reserve).",
                fix=f"{hint()}, or use a larger accelerator.",
            )
        )
    elif mem.kv_tokens < max_len:
        problems.append(
            Problem(
                field="spec.engine.maxModelLen",
                message=f"the {name} KV budget ({mem.kv_budget_gib:.2f} GiB per rank) holds {mem.kv_tokens}"
                " tokens, "
                f"less than one sequence of maxModelLen={max_len}.",
                fix=f"set engine.maxModelLen <= {mem.kv_tokens}, or {hint()}.",
            )
        )
    if problems:
        return None, problems
    pods = _pods(par=par, model=model, devices_per_pod=devices_per_pod)
    role_plan = RolePlan(
        role=name,
        replicas=role.replicas,
        tensor=par.tensor,
        data=par.data,
        expert=par.expert_size,
        expert_parallel=par.expert_parallel,
        ranks=par.ranks,
        pods_per_group=len(pods),
        devices_per_pod=devices_per_pod,
        devices_per_group=par.ranks,
        devices=role.replicas * par.ranks,
        workload="LeaderWorkerSet" if len(pods) > 1 else "Deployment",
        experts_per_rank=pods[0].ranks[0].expert_count,
        redundant_experts=redundant,
        slots_per_rank=pods[0].ranks[0].expert_count + redundant // par.expert_size,
        suggested=suggested,
        memory=mem,
        host=host_plan(role=role, gpu=gpu, devices_per_pod=devices_per_pod),
        pods=pods,
    )
    return role_plan, []


def _eplb_on_cpu(roles: list[RoleName]) -> Problem:
    return Problem(
        field=EXPERTS_FIELD,
        message=f"spec.experts turns on vLLM's expert load balancing (EPLB) for {', '.join(roles)}, and"
        " vLLM runs it only on CUDA, ROCm and XPU devices, not on cpu.",
        fix="remove experts, or set engine.kind: torch (kubemoe's engine places and rebalances"
        " experts on cpu).",
    )


def _eplb_note(role: RoleName, interval: int) -> str:
    steps = vllm_eplb_step_interval(interval)
    return (
        f"{role}: vLLM balances its experts itself (--enable-eplb): it rearranges them every {steps} engine"
        f" steps (experts.rebalance.intervalSeconds={interval} at a nominal {VLLM_NOMINAL_STEPS_PER_SECOND}"
        f" steps/s) from the last {VLLM_EPLB_WINDOW_STEPS} steps' load; experts.rebalance.minImprovement"
        " does not apply."
    )


def plan(spec: ModelDeploymentSpec, *, model_facts: ModelFacts, gpu_facts: GpuFacts, name: str = "") -> Plan:
    """The layout for `spec`, or ManifestError listing every reason it cannot fit."""
    max_len = spec.engine.max_model_len or model_facts.max_position_embeddings
    if max_len is None:
        raise ManifestError(
            [
                Problem(
                    field="spec.engine.maxModelLen",
                    message="neither engine.maxModelLen nor the model's maxPositionEmbeddings is known.",
                    fix="set engine.maxModelLen.",
                )
            ]
        )
    roles: list[RolePlan] = []
    problems: list[Problem] = []
    for role_name, role in spec.roles.items():
        role_plan, role_problems = _plan_role(
            name=role_name, role=role, spec=spec, model=model_facts, gpu=gpu_facts, max_len=max_len
        )
        problems += role_problems
        if role_plan is not None:
            roles.append(role_plan)
    for r in roles:
        problems += limit_problems(role_name=r.role, role=getattr(spec.roles, r.role), planned=r.host)
    balanced = [r.role for r in roles if r.expert_parallel] if vllm_eplb(spec) else []
    if balanced and gpu_facts.is_cpu:
        problems.append(_eplb_on_cpu(balanced))
    if problems:
        raise ManifestError(problems)
    notes = []
    for r in roles:
        if r.suggested:
            notes.append(
                f"{r.role}: parallelism suggested (smallest EP with KV for {SUGGEST_HEADROOM_SEQUENCES} "
                f"sequences of {max_len} tokens): data={r.data}, EP{r.expert}."
            )
        if spec.experts is not None and spec.experts.redundant and not r.expert_parallel:
            notes.append(f"{r.role}: no expert parallelism, so experts.redundant does not apply.")
        if r.role in balanced and spec.experts is not None:
            notes.append(_eplb_note(r.role, spec.experts.rebalance.interval_seconds))
        if r.devices_per_pod < spec.accelerator.per_pod:
            notes.append(
                f"{r.role}: a group needs {r.ranks} of the {spec.accelerator.per_pod} devices per pod."
            )
    if model_facts.weight_dtype != model_facts.expert_weight_dtype or model_facts.weight_dtype not in {
        "float32",
        "bfloat16",
        "float16",
    }:
        notes.append(
            f"weights sized as {model_facts.weight_dtype} (dense) and {model_facts.expert_weight_dtype}"
            " (experts); "
            "quantisation scales and higher-precision embeddings add a little."
        )
    claim = cache_claim_name(name, spec)
    if claim is not None:
        notes.append(
            f"model.cache: a Job fills claim {claim} ({cache_path(spec.model.source)}) from"
            f" {spec.model.source} once; the serving groups start when it has, and load from the claim."
        )
    if not gpu_facts.is_cpu and gpu_facts.label_key is None:
        notes.append(
            f"{gpu_facts.name} is not in the accelerator catalog, so pods get no node selector for it: "
            "set scheduling.nodeSelector to the label of its nodes (e.g. nvidia.com/gpu.product)."
        )
    connector = spec.serving.kv_transfer.connector if spec.serving.mode == "disaggregated" else None
    draft = Plan(
        name=name,
        model=spec.model.name,
        source=served_source(name, spec),
        architecture=f"{model_facts.num_layers} layers, {model_facts.num_routed_experts} experts top-"
        f"{model_facts.experts_per_token}, {_params(model_facts.total_params)} params",
        reference=model_facts.reference,
        engine=spec.engine.kind,
        dtype=model_facts.dtype,
        accelerator=gpu_facts.name,
        resource=gpu_facts.resource,
        node_label=gpu_facts.label_key,
        node_label_values=product_labels(gpu_facts, spec.accelerator.type),
        mode=spec.serving.mode,
        connector=connector,
        extra_args=list(spec.engine.extra_args),
        layout=" ".join(_layout_part(r) for r in roles),
        devices=sum(r.devices for r in roles),
        pods=sum(r.replicas * r.pods_per_group for r in roles),
        roles=roles,
        router=RouterPlan(
            replicas=spec.router.replicas,
            policy=spec.router.policy,
            local_prefill_below_tokens=spec.router.local_prefill_below_tokens,
        ),
        notes=notes,
    )
    return _with_commands(draft)


def product_labels(gpu: GpuFacts, wanted: str) -> list[str]:
    """The node label values pods may run on: the one spec.accelerator.type names, when it names a
    label value (e.g. NVIDIA-H200-NVL), else every product label of the catalog entry."""
    if gpu.label_key is None:
        return []
    exact = [v for v in gpu.product_labels if v.lower() == wanted.lower()]
    return exact or list(gpu.product_labels)


def _with_commands(draft: Plan) -> Plan:
    roles = [
        r.model_copy(
            update={
                "pods": [
                    p.model_copy(update={"command": pod_command(plan=draft, role=r, pod=p)}) for p in r.pods
                ]
            }
        )
        for r in draft.roles
    ]
    return draft.model_copy(update={"roles": roles})


def plan_manifest(md: ModelDeployment, *, catalog: Catalog | None = None) -> Plan:
    """Resolve the model and accelerator facts against the catalog, then plan."""
    catalog = catalog or load_catalog()
    problems: list[Problem] = []
    model_facts: ModelFacts | None = None
    gpu_facts: GpuFacts | None = None
    try:
        model_facts = resolve_model(md.spec.model, catalog)
    except ManifestError as err:
        problems += err.problems
    try:
        gpu_facts = resolve_gpu(md.spec.accelerator, catalog)
    except ManifestError as err:
        problems += err.problems
    if model_facts is None or gpu_facts is None:
        raise ManifestError(problems)
    return plan(md.spec, model_facts=model_facts, gpu_facts=gpu_facts, name=md.metadata.name)
