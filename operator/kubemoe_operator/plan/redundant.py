"""spec.experts in the planner: redundant expert slots (`spec.experts.redundant`, shared by the EP ranks
of every expert-parallel role), on vLLM the buffers and notes of vLLM's expert load balancing (EPLB), and on
the torch engine the memory its live rebalances stage experts in (`torch_staging_gib`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from kubemoe_operator.api.problems import Problem
from kubemoe_operator.api.spec import ModelDeploymentSpec, Parallelism, RoleName
from kubemoe_operator.catalog.facts import DTYPE_BYTES, GIB, ModelFacts
from kubemoe_operator.plan.model import MemoryPlan

REDUNDANT_FIELD = "spec.experts.redundant"
EXPERTS_FIELD = "spec.experts"

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
TORCH_STAGING_SHARE = 1.0
"""The share of an expert-parallel rank's routed-expert bytes (its redundant slots included) the planner
reserves for the torch engine's live rebalances. A rank stages a new placement beside the running one: the
next expert stacks of every MoE layer whose slots change on it, until the switch frees the old ones (the
runtime's serve/placement_switch.py; new experts are read straight into them). The rebalancer may change
every layer in one generation, so the reserve is a whole copy; a cap on the layers one generation changes
would bring it down to that share. A rank that has not the memory when a rebalance comes refuses it before
allocating (the group keeps its placement) instead of being killed out of memory."""


def vllm_eplb(spec: ModelDeploymentSpec) -> bool:
    """Whether vLLM's expert-parallel roles run vLLM's expert load balancing: spec.experts on vLLM."""
    return spec.engine.kind == "vllm" and spec.experts is not None


def torch_staging(spec: ModelDeploymentSpec) -> bool:
    """Whether the torch engine's expert-parallel roles rebalance live: spec.experts on the torch engine."""
    return spec.engine.kind == "torch" and spec.experts is not None


def torch_staging_gib(experts_gib: float) -> float:
    """The torch engine's staging reserve on a rank holding `experts_gib` of routed experts."""
    return experts_gib * TORCH_STAGING_SHARE


def vllm_eplb_step_interval(interval_seconds: int) -> int:
    """vLLM's eplb_config.step_interval for spec.experts.rebalance.intervalSeconds."""
    return interval_seconds * VLLM_NOMINAL_STEPS_PER_SECOND


def eplb_buffers_gib(model: ModelFacts, par: Parallelism, redundant: int) -> float:
    """vLLM's EPLB state on one rank (vllm/distributed/eplb/eplb_state.py): a buffer shaped like one MoE
    layer's expert weights on the rank ((E + N) / EP slots), through which rearranged experts move, and
    the int32 load of every physical expert of every MoE layer for the window's steps and the current one."""
    physical = model.num_routed_experts + redundant
    layer = physical // par.expert_size * model.params_per_expert * DTYPE_BYTES[model.expert_weight_dtype]
    loads = (VLLM_EPLB_WINDOW_STEPS + 1) * model.moe_layers * physical * EPLB_LOAD_BYTES
    return (layer + loads) / GIB


def redundant_problem(
    redundant: int, *, ep: int, experts: int, role: str = "", sizes: Mapping[str, int] | None = None
) -> Problem | None:
    """Redundant slots EP ranks cannot share evenly, or more than a copy of every expert on every rank.
    `sizes`, every expert-parallel role's EP size by role, makes the fix suggest multiples of them all."""
    every = {**(sizes or {}), **({role: ep} if role else {})} or {"": ep}
    if redundant % ep:
        step = math.lcm(*every.values())
        most = experts * (min(every.values()) - 1)
        lower, upper = redundant // step * step, (redundant // step + 1) * step
        examples = [v for v in (lower, upper, upper + step) if 0 < v <= most][:2]
        if len(set(every.values())) > 1:
            roles = ", ".join(f"{name} EP{size}" for name, size in every.items())
            multiple = f"{step}, the least common multiple of every expert-parallel role's EP size ({roles})"
        else:
            multiple = f"{step} (every expert-parallel role's EP size)"
        fix = (
            f"use a multiple of {multiple}, e.g. {' or '.join(map(str, examples))}."
            if examples
            else f"set experts.redundant: 0 (no multiple of {step} is at most {most}), or choose EP sizes"
            " with a smaller common multiple."
        )
        return Problem(
            field=REDUNDANT_FIELD,
            message=f"redundant={redundant} expert slots do not spread evenly over the EP={ep} ranks"
            + (f" of {role}." if role else "."),
            fix=fix,
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


def redundant_too_big(
    mem: MemoryPlan,
    *,
    weights_fit: bool,
    role: RoleName,
    ep: int,
    redundant: int,
    fits: int,
    device: str,
    kv_short: str | None = None,
) -> Problem:
    """The problem when the model fits a role's ranks without its redundant slots but not with them;
    `kv_short`: what the KV budget falls short of (sizing.Sizing.kv_short), where not one sequence."""
    usable = mem.device_gib * mem.utilization - mem.reserve_gib
    kv = (
        kv_short
        or f"KV for {mem.kv_tokens} tokens, less than one sequence of maxModelLen={mem.max_model_len}"
    )
    short = f"leave {kv}" if weights_fit else f"pass the {usable:.1f} GiB {device} leaves"
    buffers = f" (and {mem.eplb_buffers_gib:.2f} GiB of vLLM's EPLB buffers)" if mem.eplb_buffers_gib else ""
    return Problem(
        field=REDUNDANT_FIELD,
        message=f"{redundant} redundant expert slots put {redundant // ep} more experts on each of the"
        f" EP={ep} ranks of {role} ({mem.redundant_weights_gib:.2f} GiB), so its {mem.weights_gib:.1f} GiB"
        f" of weights{buffers} {short}.",
        fix=f"set experts.redundant <= {fits} (a multiple of {ep}), or spread the model over more ranks.",
    )


def eplb_too_big(mem: MemoryPlan, *, role: RoleName, max_len: int) -> Problem:
    """The problem when a role fits without vLLM's EPLB buffers, but not with them."""
    return Problem(
        field=EXPERTS_FIELD,
        message=f"vLLM's expert load balancing (EPLB), which spec.experts turns on, needs"
        f" {mem.eplb_buffers_gib:.2f} GiB on each rank of {role}, which leaves KV for {mem.kv_tokens} tokens,"
        f" less than one sequence of maxModelLen={max_len}.",
        fix="remove experts, lower engine.maxModelLen, or spread the model over more ranks.",
    )


def staging_too_big(mem: MemoryPlan, *, role: RoleName, max_len: int, kv_short: str | None = None) -> Problem:
    """The problem when a torch-engine role fits without its staging reserve, but not with it (`mem`: its
    memory with the reserve; `kv_short`: what its KV budget falls short of, sizing.Sizing.kv_short)."""
    usable = mem.device_gib * mem.utilization - mem.reserve_gib
    kv = kv_short or f"KV for {mem.kv_tokens} tokens, less than one sequence of maxModelLen={max_len}"
    short = (
        f"leaves {kv}"
        if mem.weights_gib < usable
        else f"leaves {usable:.1f} GiB for {mem.weights_gib:.1f} GiB of weights"
    )
    return Problem(
        field=EXPERTS_FIELD,
        message=f"spec.experts rebalances {role} live, and the torch engine stages a new placement's experts"
        f" beside the running ones: the planner reserves a copy of a rank's experts,"
        f" {torch_staging_gib(mem.expert_weights_gib):.1f} GiB on each rank of {role}, which {short}.",
        fix="give the pods more memory, spread the model over more ranks, or remove experts"
        " (no rebalancing).",
    )


def torch_staging_note(role: RoleName, mem: MemoryPlan) -> str:
    staged = torch_staging_gib(mem.expert_weights_gib)
    return (
        f"{role}: {staged:.1f} GiB of each rank's {mem.reserve_gib:g} GiB reserve is for live rebalances"
        f" (spec.experts): the torch engine stages the experts of the layers a rebalance changes beside the"
        f" running ones, up to a copy of the rank's {mem.expert_weights_gib:.1f} GiB of experts."
    )


def eplb_on_cpu(roles: list[RoleName]) -> Problem:
    return Problem(
        field=EXPERTS_FIELD,
        message=f"spec.experts turns on vLLM's expert load balancing (EPLB) for {', '.join(roles)}, and"
        " vLLM runs it only on CUDA, ROCm and XPU devices, not on cpu.",
        fix="remove experts, or set engine.kind: torch (kubemoe's engine places and rebalances"
        " experts on cpu).",
    )


def eplb_note(role: RoleName, interval: int) -> str:
    steps = vllm_eplb_step_interval(interval)
    return (
        f"{role}: vLLM balances its experts itself (--enable-eplb): it rearranges them every {steps} engine"
        f" steps (experts.rebalance.intervalSeconds={interval} at a nominal {VLLM_NOMINAL_STEPS_PER_SECOND}"
        f" steps/s) from the last {VLLM_EPLB_WINDOW_STEPS} steps' load; experts.rebalance.minImprovement"
        " does not apply."
    )
