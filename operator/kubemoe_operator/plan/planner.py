"""`plan(spec, model_facts, gpu_facts) -> Plan`: the layout of every role, pure.

Per role, one serving group holds data x tensor ranks (with expert parallelism, vLLM's EP size
is data x tensor) spread over ceil(ranks / perPod) pods. Each rank holds the dense weights
split by tensor parallelism and its share of the routed experts (whole experts with expert parallelism,
a 1 / (data x tensor) slice of each without: sizing.expert_shards), plus its share of the group's
redundant expert slots (`spec.experts.redundant`: E / EP + redundant / EP experts per rank) and, on
vLLM with spec.experts, the buffers of vLLM's expert load balancing (EPLB); what is left of
`gpuMemoryUtilization` x memory, less a runtime reserve, is the KV budget. vLLM, SGLang and TGI fill it
with their KV cache, and need it to hold one sequence of maxModelLen; the torch engine allocates a fixed
cache up front, (--max-num-seqs + 1) x (maxModelLen + 1) positions per rank (sizing.TorchKv), and needs
it to hold all of them.

Where a role leaves its parallelism out the planner suggests the smallest layout that the engine runs
where the role runs: expert parallelism (data = EP), or tensor parallelism alone for an engine without it
(TGI) or that cannot run it there (vLLM on cpu: EngineSupport.cpu_parallel).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from kubemoe_operator.api.engines import expert_default, support
from kubemoe_operator.api.lmcache import lmcache_problems
from kubemoe_operator.api.problems import ManifestError, Problem
from kubemoe_operator.api.resource import ModelDeployment
from kubemoe_operator.api.spec import ModelDeploymentSpec, Parallelism, RoleName, RoleSpec
from kubemoe_operator.catalog import Catalog, load_catalog, resolve_gpu, resolve_model
from kubemoe_operator.catalog.facts import GIB, GpuFacts, ModelFacts
from kubemoe_operator.plan.cache import cache_claim_name, cache_path, served_source
from kubemoe_operator.plan.command import LWS_LEADER_ADDRESS, pod_command
from kubemoe_operator.plan.host_sizing import host_plan, limit_problems
from kubemoe_operator.plan.model import Plan, PodPlan, RankPlan, RolePlan, RouterPlan
from kubemoe_operator.plan.redundant import (
    REDUNDANT_FIELD,
    VLLM_EPLB_WINDOW_STEPS,
    eplb_note,
    eplb_on_cpu,
    eplb_too_big,
    redundant_problem,
    redundant_too_big,
    staging_too_big,
    torch_staging,
    torch_staging_note,
    vllm_eplb,
    vllm_eplb_step_interval,
)
from kubemoe_operator.plan.sizing import (
    SUGGEST_HEADROOM_SEQUENCES,
    Sizing,
    device_memory_gib,
    divisors,
    engine_kv,
    fits,
    layout_ok,
    size_rank,
    suggest_parallelism,
    suggest_tensor,
)
from kubemoe_operator.plan.torch_kv import headroom_words, size_text, spec_torch_kv, torch_kv_problem

__all__ = [  # with what render/experts.py reads from here (plan/redundant.py's since they moved there)
    "SUGGEST_HEADROOM_SEQUENCES",
    "VLLM_EPLB_WINDOW_STEPS",
    "plan",
    "plan_manifest",
    "product_labels",
    "suggest_parallelism",
    "suggest_tensor",
    "vllm_eplb",
    "vllm_eplb_step_interval",
]


def _check_shape(*, model: ModelFacts, par: Parallelism, per_pod: int, path: str) -> list[Problem]:
    problems: list[Problem] = []
    tp, heads, kv = par.tensor, model.num_attention_heads, model.num_key_value_heads
    # A group within one pod may leave devices of the pod unused; a group over several pods fills each
    # pod with whole tensor-parallel groups (perPod / tensor data-parallel ranks per pod).
    spans_pods = par.ranks > per_pod
    tp_choices = [
        d for d in divisors(heads) if d <= per_pod and (per_pod % d == 0 or d * par.data <= per_pod)
    ]
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
    if tp > per_pod or (spans_pods and per_pod % tp):
        problems.append(
            Problem(
                field=f"{path}.tensor",
                message=f"a tensor-parallel group of {tp} must fit one pod (accelerator.perPod={per_pod})."
                if tp > per_pod
                else f"a group of {par.ranks} ranks spans pods of accelerator.perPod={per_pod}, and each pod"
                f" must hold whole tensor-parallel groups of {tp}.",
                fix=f"use tensor in {tp_choices}, or raise accelerator.perPod."
                if tp > per_pod
                else f"use tensor in {tp_choices}, keep the group within one pod (data x tensor <="
                f" {per_pod}), or make accelerator.perPod a multiple of {tp}.",
            )
        )
    experts = model.num_routed_experts
    if par.expert_parallel and experts % par.expert_size:
        field = f"{path}.expert" if par.expert is not None else f"{path}.data"
        problems.append(
            Problem(
                field=field,
                message=f"EP={par.expert_size} (data x tensor) does not divide the {experts} routed experts.",
                fix=f"choose data x tensor in {[d for d in divisors(experts) if d > 1]}.",
            )
        )
    if not layout_ok(par.ranks, per_pod):
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


def _memory_missing(path: str) -> Problem:
    return Problem(
        field=f"{path}.resources.requests.memory",
        message="the cpu accelerator sizes each rank from the pod's memory request, and none is set.",
        fix=f"set {path}.resources.requests.memory (e.g. 2Gi; a pod's ranks share it equally).",
    )


VLLM_CPU_PROCESS_GIB = 1.0
"""vLLM's CPU build allocates its KV cache by VLLM_CPU_KVCACHE_SPACE (render/engines.py sets it to the
plan's budget), besides what its process takes (torch's and vLLM's libraries, the scheduler: about a
GiB resident), which the cpu reserve (sized for the torch runtime) does not count."""


def _more_memory(path: str, gpu: GpuFacts, role: RoleSpec) -> str:
    """The fix for too little memory per rank: on cpu, the pod's memory request (the planner's only
    measure of a rank's memory); else a larger accelerator."""
    if not gpu.is_cpu:
        return "use a larger accelerator"
    res = role.resources
    given = None if res is None else res.requests.get("memory", res.limits.get("memory"))
    now = f"now {given}; " if given is not None else ""
    return f"raise {path}.resources.requests.memory ({now}a pod's ranks share it equally)"


def _shards_label(par: Parallelism) -> str:
    """The ranks one copy of the routed experts is spread over, for the problems: EP16, TP2, DP4xTP2."""
    if par.expert_parallel:
        return f"EP{par.expert_size}"
    return f"TP{par.tensor}" if par.data == 1 else f"DP{par.data}xTP{par.tensor}"


def _expert_layouts(spec: ModelDeploymentSpec, gpu: GpuFacts) -> bool:
    """Whether the engine runs expert (and data) parallelism where the roles run: not vLLM's CPU build
    (EngineSupport.cpu_parallel, which api/engines.py `limit_problems` enforces on a given parallelism)."""
    engine = support(spec.engine.kind)
    return engine.expert and (engine.cpu_parallel or not gpu.is_cpu)


def _plan_role(
    *,
    name: RoleName,
    role: RoleSpec,
    spec: ModelDeploymentSpec,
    model: ModelFacts,
    gpu: GpuFacts,
    max_len: int,
    ep_sizes: Mapping[str, int],
) -> tuple[RolePlan | None, list[Problem]]:
    """One role's plan, or its problems; `ep_sizes` holds every expert-parallel role's EP size (as far as
    the spec gives them), for the redundant slots' fix."""
    path = f"spec.roles.{name}"
    per_pod = spec.accelerator.per_pod
    utilization = spec.engine.gpu_memory_utilization
    par = role.parallelism
    wanted = spec.experts.redundant if spec.experts is not None else 0
    eplb = vllm_eplb(spec)
    staging = torch_staging(spec)

    engine = support(spec.engine.kind)
    kv = spec_torch_kv(spec)
    expert_layouts = _expert_layouts(spec, gpu)
    if spec.engine.kind == "vllm" and gpu.is_cpu:  # its process, besides the KV cache it is told to take
        gpu = dataclasses.replace(gpu, reserve_gib=gpu.reserve_gib + VLLM_CPU_PROCESS_GIB)
    if device_memory_gib(role=role, gpu=gpu, devices_per_pod=1) is None:
        return None, [_memory_missing(path)]

    def suggest(sequences: int = SUGGEST_HEADROOM_SEQUENCES) -> Parallelism | None:
        """The smallest layout with KV for `sequences` sequences of max_len (the torch engine: with its
        whole KV cache): tensor parallelism where the engine has no expert parallelism or cannot run it
        here (`expert_layouts`), else EP."""
        if not expert_layouts:
            return suggest_tensor(
                model=model,
                gpu=gpu,
                role=role,
                per_pod=per_pod,
                utilization=utilization,
                max_len=max_len,
                sequences=sequences,
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
            staging=staging,
            sequences=sequences,
            torch=kv,
        )

    headroom = headroom_words(kv, max_len)
    if par is None:
        par = suggest()
        if par is None and wanted and expert_layouts:
            return None, [
                Problem(
                    field=REDUNDANT_FIELD,
                    message=f"no expert-parallel size up to {model.num_routed_experts} that shares {wanted}"
                    f" redundant expert slots evenly fits {model.name} on {gpu.name} with {headroom}.",
                    fix=f"lower experts.redundant, or set {path}.parallelism.",
                )
            ]
        if par is None and not engine.expert:  # TGI
            return None, [
                Problem(
                    field=f"{path}.parallelism",
                    message=f"no tensor-parallel size within one pod (accelerator.perPod={per_pod}) fits"
                    f" {model.name} on {gpu.name} with KV for {SUGGEST_HEADROOM_SEQUENCES} sequences of"
                    f" {max_len} tokens, and engine {spec.engine.kind} serves a group from one pod.",
                    fix=f"raise accelerator.perPod, {_more_memory(path, gpu, role)}, or use a smaller"
                    f" engine.maxModelLen; or use {engine.instead} (groups over several pods).",
                )
            ]
        if par is None and not expert_layouts:  # vLLM on cpu
            return None, [
                Problem(
                    field=f"{path}.parallelism",
                    message=f"no tensor-parallel size within one pod (accelerator.perPod={per_pod}) fits"
                    f" {model.name} on {gpu.name} with {headroom}, and engine {spec.engine.kind} on"
                    " accelerator.type cpu runs no data or expert parallelism (its CPU build has neither).",
                    fix=f"{_more_memory(path, gpu, role)}, or use a smaller engine.maxModelLen; or use"
                    " engine.kind torch (expert-parallel groups over several pods on cpu).",
                )
            ]
        if par is None:
            return None, [
                Problem(
                    field=f"{path}.parallelism",
                    message=f"no expert-parallel size up to {model.num_routed_experts} fits {model.name} on "
                    f"{gpu.name} with {headroom}.",
                    fix=(
                        "set parallelism (tensor > 1 splits the dense weights), "
                        if engine.tensor and not gpu.is_cpu
                        else ""
                    )
                    + f"{_more_memory(path, gpu, role)}, or use a smaller engine.maxModelLen.",
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
        bad = redundant_problem(
            redundant, ep=par.expert_size, experts=model.num_routed_experts, role=name, sizes=ep_sizes
        )
        if bad is not None:
            return None, [bad]
    devices_per_pod = min(per_pod, par.ranks)
    device_gib = device_memory_gib(role=role, gpu=gpu, devices_per_pod=devices_per_pod)
    if device_gib is None:
        return None, [_memory_missing(path)]

    def size(slots: int, *, balancing: bool = eplb, staged: bool = staging) -> Sizing:
        return size_rank(
            model=model,
            par=par,
            device_gib=device_gib,
            utilization=utilization,
            reserve_gib=gpu.reserve_gib,
            max_len=max_len,
            redundant=slots,
            eplb=balancing,
            staging=staged,
            torch=kv,
        )

    sizing = size(redundant)
    mem = sizing.memory
    if redundant and not fits(sizing, max_len) and fits(size(0), max_len):
        ep = par.expert_size
        most = max(k * ep for k in range(redundant // ep) if fits(size(k * ep), max_len))
        too_big = redundant_too_big(
            mem,
            weights_fit=sizing.weights_fit,
            role=name,
            ep=ep,
            redundant=redundant,
            fits=most,
            device=gpu.name,
            kv_short=sizing.kv_short() if kv is not None else None,
        )
        return None, [too_big]
    if mem.eplb_buffers_gib and not fits(size(0), max_len) and fits(size(0, balancing=False), max_len):
        return None, [eplb_too_big(size(0).memory, role=name, max_len=max_len)]
    if staging and not fits(size(0), max_len) and fits(size(0, staged=False), max_len):
        short = size(0).kv_short() if kv is not None else None
        return None, [staging_too_big(size(0).memory, role=name, max_len=max_len, kv_short=short)]
    usable = mem.device_gib * utilization - mem.reserve_gib
    shards = _shards_label(par)
    device = (
        f"the pod's memory request over its {devices_per_pod} rank{'s' if devices_per_pod > 1 else ''}"
        if gpu.is_cpu
        else gpu.name
    )

    def hint() -> str:
        """The layout to move to: the smallest that passes the check this one failed (`fits`: the weights
        and KV for one sequence of maxModelLen, or the torch engine's whole KV cache), not the headroom a
        role without parallelism is given; only layouts the engine runs here (`expert_layouts`)."""
        better = suggest(sequences=1)
        if better is not None and expert_layouts and better.expert_size > par.expert_size:
            return f"set parallelism {{tensor: 1, data: {better.data}}} (EP{better.expert_size})"
        if better is not None and not expert_layouts and better.tensor > par.tensor:
            # expert: 1 spelled out where the engine has expert parallelism (vLLM: else data x tensor)
            return (
                f"set parallelism {{tensor: {better.tensor}, data: 1, expert: 1}}"
                if engine.expert
                else f"set parallelism {{tensor: {better.tensor}}}"
            )
        if engine.expert and not expert_layouts:  # vLLM on cpu: more tensor ranks split the same pod's memory
            return "use engine.kind torch (expert-parallel groups over several pods on cpu)"
        sizes = " or ".join(what for what, has in (("data", engine.data), ("tensor", engine.tensor)) if has)
        return f"spread the model over more ranks ({sizes})"

    if not sizing.weights_fit:
        buffers = f" + {mem.eplb_buffers_gib:.1f} vLLM EPLB buffers" if mem.eplb_buffers_gib else ""
        problems.append(
            Problem(
                field=f"{path}.parallelism",
                message=f"weights need {mem.weights_gib:.1f} GiB per rank ({mem.dense_weights_gib:.1f} dense"
                f" / TP{par.tensor} + {mem.expert_weights_gib:.1f} experts / {shards}{buffers})"
                f" but {device} leaves {usable:.1f} GiB "
                f"({mem.device_gib:.1f} GiB x {utilization:g} - {mem.reserve_gib:g} GiB reserve).",
                fix=f"{_more_memory(path, gpu, role)}, or {hint()}."
                if gpu.is_cpu
                else f"{hint()}, or use a larger accelerator.",
            )
        )
    elif kv is not None and not fits(sizing, max_len):
        problems.append(
            torch_kv_problem(
                sizing,
                kv=kv,
                name=name,
                device=device,
                devices_per_pod=devices_per_pod,
                hint=hint(),
                more=_more_memory(path, gpu, role),
            )
        )
    elif mem.kv_tokens < max_len:
        problems.append(
            Problem(
                field="spec.engine.maxModelLen",
                message=f"the {name} KV budget ({mem.kv_budget_gib:.2f} GiB per rank) holds {mem.kv_tokens}"
                " tokens, "
                f"less than one sequence of maxModelLen={max_len}.",
                fix=f"set engine.maxModelLen <= {sizing.longest} to keep this layout, or {hint()}."
                if sizing.longest >= 1
                else f"{hint()}.",
            )
        )
    elif spec.engine.kind == "vllm" and gpu.is_cpu and mem.kv_budget_gib < 1:
        # vLLM's CPU build takes its KV cache from VLLM_CPU_KVCACHE_SPACE, in whole GiB (render/engines.py
        # sets it to the budget): under one GiB it would still allocate one, past the pod's memory
        problems.append(
            Problem(
                field=f"{path}.resources.requests.memory",
                message=f"vLLM's CPU build allocates its KV cache in whole GiB (VLLM_CPU_KVCACHE_SPACE, at"
                f" least 1 per rank); the {name} KV budget is {mem.kv_budget_gib:.2f} GiB per rank.",
                fix=f"{_more_memory(path, gpu, role)}, or use engine.kind torch.",
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


def _max_model_len(spec: ModelDeploymentSpec, model: ModelFacts) -> int:
    """spec.engine.maxModelLen, or the model's context length; ManifestError when neither is known, or
    when maxModelLen passes the context length (vLLM and the torch engine refuse it as they start)."""
    wanted, context = spec.engine.max_model_len, model.max_position_embeddings
    if wanted is not None and context is not None and wanted > context:
        raise ManifestError(
            [
                Problem(
                    field="spec.engine.maxModelLen",
                    message=f"maxModelLen={wanted} is longer than the context length of {model.name},"
                    f" {context} tokens (its max_position_embeddings): the engine would refuse it as it"
                    " starts.",
                    fix=f"set engine.maxModelLen <= {context}, or leave it out (it defaults to {context});"
                    " where rope scaling extends the model's context (vLLM), set"
                    " spec.model.config.maxPositionEmbeddings to the extended length.",
                )
            ]
        )
    max_len = wanted or context
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
    return max_len


def _ep_sizes(spec: ModelDeploymentSpec) -> dict[str, int]:
    """The EP size of every role whose spec gives its parallelism and turns expert parallelism on."""
    layouts = {
        name: expert_default(spec.engine.kind, role.parallelism)
        for name, role in spec.roles.items()
        if role.parallelism is not None
    }
    return {name: par.expert_size for name, par in layouts.items() if par.expert_parallel}


def plan(spec: ModelDeploymentSpec, *, model_facts: ModelFacts, gpu_facts: GpuFacts, name: str = "") -> Plan:
    """The layout for `spec`, or ManifestError listing every reason it cannot fit."""
    connector = spec.serving.kv_transfer.connector if spec.serving.mode == "disaggregated" else None
    model_facts = engine_kv(
        model_facts,
        engine=spec.engine.kind,
        gpu=gpu_facts,
        connector=connector,
        extra_args=spec.engine.extra_args,
    )
    max_len = _max_model_len(spec, model_facts)
    ep_sizes = _ep_sizes(spec)
    roles: list[RolePlan] = []
    problems: list[Problem] = []
    for role_name, role in spec.roles.items():
        role_plan, role_problems = _plan_role(
            name=role_name,
            role=role,
            spec=spec,
            model=model_facts,
            gpu=gpu_facts,
            max_len=max_len,
            ep_sizes=ep_sizes,
        )
        problems += role_problems
        if role_plan is not None:
            roles.append(role_plan)
    for r in roles:
        problems += limit_problems(role_name=r.role, role=getattr(spec.roles, r.role), planned=r.host)
    problems += lmcache_problems(spec)  # not a CEL twin: a role's env may come from a ConfigMap
    balanced = [r.role for r in roles if r.expert_parallel] if vllm_eplb(spec) else []
    if balanced and gpu_facts.is_cpu:
        problems.append(eplb_on_cpu(balanced))
    if problems:
        raise ManifestError(problems)
    notes = []
    kv = spec_torch_kv(spec)
    headroom = headroom_words(kv, max_len)
    for r in roles:
        if r.suggested and _expert_layouts(spec, gpu_facts):
            notes.append(
                f"{r.role}: parallelism suggested (smallest EP with {headroom}): data={r.data}, EP{r.expert}."
            )
        elif r.suggested:
            why = (
                "runs neither on accelerator.type cpu" if support(spec.engine.kind).expert else "has neither"
            )
            notes.append(
                f"{r.role}: parallelism suggested (smallest tensor-parallel size within one pod with"
                f" {headroom}): tensor={r.tensor}, no data or expert parallelism (engine {spec.engine.kind}"
                f" {why})."
            )
        if kv is not None:
            cache = kv.positions(max_len) * r.memory.kv_bytes_per_token / GIB
            notes.append(
                f"{r.role}: the torch engine allocates each rank's KV cache up front, {kv.shape(max_len)}"
                f" ({kv.flag()}): {size_text(cache)} of the {size_text(r.memory.kv_budget_gib)} KV budget;"
                f" a rank serves at most {kv.max_num_seqs} sequences at once (--max-num-seqs in"
                " engine.extraArgs sets it)."
            )
        if spec.experts is not None and spec.experts.redundant and not r.expert_parallel:
            notes.append(f"{r.role}: no expert parallelism, so experts.redundant does not apply.")
        if r.role in balanced and spec.experts is not None:
            notes.append(eplb_note(r.role, spec.experts.rebalance.interval_seconds))
        if r.expert_parallel and torch_staging(spec):
            notes.append(torch_staging_note(r.role, r.memory))
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
            f" (experts), the embeddings, LM head and routers as {model_facts.dtype}; "
            "quantisation scales add a little."
        )
    claim = cache_claim_name(name, spec)
    if claim is not None:
        notes.append(
            f"model.cache: a Job fills claim {claim} ({cache_path(spec.model.source)}) from"
            f" {spec.model.source} once; the serving groups start when it has, and load from the claim."
        )
    if (image_note := cpu_image_note(spec, gpu_facts)) is not None:
        notes.append(image_note)
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


def cpu_image_note(spec: ModelDeploymentSpec, gpu: GpuFacts) -> str | None:
    """On cpu with no engine.image, the pods run the operator's runtimeImage, which the install builds
    from runtime/Dockerfile (vLLM's CUDA image): say which image to set. Not for a file:// model.source,
    which `kubemoe up` runs as local processes (no image) and a cluster refuses."""
    if not gpu.is_cpu or spec.engine.image is not None or support(spec.engine.kind).image_required:
        return None
    if spec.model.source.startswith("file://"):
        return None
    why = (
        "vLLM's CUDA build, which does not start on CPU nodes"
        if spec.engine.kind == "vllm"
        else "a CUDA image without the torch engine's kernels prebuilt: each pod compiles them as it"
        " starts, or without a compiler runs the slower torch path"
    )
    return (
        "accelerator.type cpu without engine.image: the serving pods run the operator's runtimeImage,"
        f" which the README's install builds from runtime/Dockerfile ({why}). Set engine.image to the"
        " CPU runtime image, built from runtime/Dockerfile.cpu (docker build -f runtime/Dockerfile.cpu -t"
        " REGISTRY/kubemoe-runtime:TAG-cpu runtime: vLLM's CPU build and the prebuilt kernels), unless"
        " the chart's runtimeImage already is that image."
    )


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
