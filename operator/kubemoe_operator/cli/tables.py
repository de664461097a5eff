"""The plan as a human-readable table (`kubemoe plan` default output)."""

from __future__ import annotations

from kubemoe_operator.api.engines import describe, support
from kubemoe_operator.grid import grid
from kubemoe_operator.plan.model import Plan, RolePlan


def _gib(value: float) -> str:
    return f"{value:.1f} GiB" if value >= 1 else f"{value * 1024:.1f} MiB"


def _tokens(value: int) -> str:
    return (
        f"{value / 1e6:.2f}M"
        if value >= 1_000_000
        else f"{value / 1e3:.0f}k"
        if value >= 10_000
        else str(value)
    )


def _experts(role: RolePlan, *, first: int, count: int) -> str:
    if not role.expert_parallel:
        # every rank of the group holds a slice of every expert (plan/sizing.py expert_shards)
        return f"all (1/{role.ranks} slice)" if role.ranks > 1 else "all"
    return f"{first}-{first + count - 1}"


def _slots(role: RolePlan) -> str:
    """Experts per rank: its own block, plus its share of the group's redundant slots ("16+2")."""
    extra = role.slots_per_rank - role.experts_per_rank
    return f"{role.experts_per_rank}+{extra}" if extra > 0 else str(role.experts_per_rank)


def render_table(plan: Plan) -> str:
    device = "GPU" if plan.resource else "RANK"
    lines = [
        f"{plan.name or 'ModelDeployment'}: {plan.model} ({plan.architecture})",
        f"  engine {plan.engine}, {plan.mode}"
        + (f" (KV via {plan.connector})" if plan.connector else "")
        + f", accelerator {plan.accelerator}, router {plan.router.replicas}x {plan.router.policy}",
        f"  layout {plan.layout}: {plan.devices} {'GPUs' if plan.resource else 'rank processes'}"
        f" in {plan.pods} pods",
        f"  {plan.engine} supports: "
        + "; ".join(f"{what} {value}" for what, value in describe(support(plan.engine))[:10]),
        "",
    ]
    header = [
        "ROLE",
        "GROUPS",
        "TP",
        "DP",
        "EP",
        f"{device}S/GROUP",
        "PODS/GROUP",
        f"{device}S/POD",
        "WORKLOAD",
    ]
    header += ["EXPERTS/RANK", "WEIGHTS/RANK", "KV/RANK", "KV TOKENS/RANK", "MAX-LEN SEQS"]
    rows = []
    for r in plan.roles:
        m = r.memory
        rows.append(
            [
                r.role + (" *" if r.suggested else ""),
                str(r.replicas),
                str(r.tensor),
                str(r.data),
                str(r.expert) if r.expert_parallel or r.ranks == 1 else "-",
                str(r.devices_per_group),
                str(r.pods_per_group),
                str(r.devices_per_pod),
                r.workload,
                _slots(r),
                _gib(m.weights_gib),
                _gib(m.kv_budget_gib),
                _tokens(m.kv_tokens),
                f"{m.sequences_at_max_len:.1f} x {m.max_model_len}",
            ]
        )
    lines += grid(header, rows)
    lines += ["", "Pods of one group (every group is alike):"]
    pod_rows = []
    for r in plan.roles:
        for p in r.pods:
            first, last = p.ranks[0], p.ranks[-1]
            pod_rows.append(
                [
                    r.role,
                    str(p.index),
                    "leader" if p.leader else "worker",
                    f"{first.rank}-{last.rank}" if len(p.ranks) > 1 else str(first.rank),
                    str(p.start_rank),
                    str(p.data_local),
                    p.address or "-",
                    _experts(
                        r,
                        first=first.first_expert,
                        count=last.first_expert + last.expert_count - first.first_expert,
                    ),
                ]
            )
    lines += grid(
        ["ROLE", "POD", "KIND", "RANKS", "DP START", "DP LOCAL", "LEADER ADDRESS", "ROUTED EXPERTS"], pod_rows
    )
    redundant = [r for r in plan.roles if r.redundant_experts]
    lines += [
        "",
        "Memory per rank: dense weights / TP + routed experts / EP"
        + (" (+ redundant slots / EP)" if redundant else "")
        + "; KV = memory x utilisation - reserve - weights"
        + (" - EPLB buffers" if any(r.memory.eplb_buffers_gib for r in plan.roles) else "")
        + ".",
    ]
    for r in plan.roles:
        m = r.memory
        lines.append(
            f"  {r.role}: {_gib(m.device_gib)} x {m.utilization:g} - {m.reserve_gib:g} GiB reserve - "
            f"{_gib(m.dense_weights_gib)} dense - {_gib(m.expert_weights_gib)} experts"
            + (f" ({_gib(m.redundant_weights_gib)} in redundant slots)" if r.redundant_experts else "")
            + (f" - {_gib(m.eplb_buffers_gib)} vLLM EPLB buffers" if m.eplb_buffers_gib else "")
            + f" = {_gib(m.kv_budget_gib)} KV "
            f"at {m.kv_bytes_per_token / 1024:.1f} KiB/token"
        )
    for r in redundant:
        lines.append(
            f"  {r.role}: {r.redundant_experts} redundant expert slots per group, {r.slots_per_rank} expert"
            f" slots per rank ({r.experts_per_rank} own + {r.slots_per_rank - r.experts_per_rank} copies"
            " of hot experts)."
        )
    if plan.notes:
        lines += ["", "Notes:", *(f"  - {n}" for n in plan.notes)]
    return "\n".join(lines)
