"""The cross-field rules of the spec, in Python: twins of the CEL rules in `spec.py` (extraArgs here is
the complete check, `api/engine_flags.py`; its CEL twin is a coarser first filter)."""

from __future__ import annotations

from kubemoe_operator.api.engine_flags import extra_args_problems
from kubemoe_operator.api.engines import engine_problems
from kubemoe_operator.api.problems import Problem
from kubemoe_operator.api.spec import RESERVED_LABEL_PREFIXES, Autoscaling, ModelDeploymentSpec


def spec_problems(spec: ModelDeploymentSpec) -> list[Problem]:
    """Every cross-field rule the spec breaks, each naming its field."""
    problems: list[Problem] = []
    roles = spec.roles
    if spec.serving.mode == "colocated" and (roles.worker is None or roles.prefill or roles.decode):
        problems.append(
            Problem(
                field="spec.roles",
                message="colocated mode takes exactly one role, worker (no prefill or decode).",
                fix="rename the role to worker, or set serving.mode: disaggregated.",
            )
        )
    if spec.serving.mode == "disaggregated" and (
        roles.prefill is None or roles.decode is None or roles.worker
    ):
        problems.append(
            Problem(
                field="spec.roles",
                message="disaggregated mode needs roles prefill and decode, and no worker.",
                fix="give both prefill and decode, or set serving.mode: colocated with one worker role.",
            )
        )
    if spec.serving.mode == "disaggregated" and spec.router.replicas < 1:
        problems.append(
            Problem(
                field="spec.router.replicas",
                message="disaggregated mode needs at least one router replica.",
                fix="set router.replicas: 1 or more.",
            )
        )
    problems += extra_args_problems(
        spec.engine.extra_args, field="spec.engine.extraArgs", engine=spec.engine.kind
    )
    problems += engine_problems(spec)
    for name, role in roles.items():
        path = f"spec.roles.{name}"
        par = role.parallelism
        if par is not None and par.expert is not None and par.expert not in (1, par.ranks):
            problems.append(
                Problem(
                    field=f"{path}.parallelism.expert",
                    message=f"expert={par.expert} must be 1 (experts sharded by tensor parallelism) or "
                    f"data x tensor = {par.ranks} (vLLM's expert-parallel size).",
                    fix=f"set expert: {par.ranks}, or omit it.",
                )
            )
        if role.autoscaling is not None:
            problems += autoscaling_problems(role.autoscaling, role=name, path=f"{path}.autoscaling")
    for i, tol in enumerate(spec.scheduling.tolerations):
        if tol.operator == "Exists" and tol.value:
            problems.append(
                Problem(
                    field=f"spec.scheduling.tolerations[{i}].value",
                    message="value must be empty when operator is Exists.",
                    fix="drop value, or use operator: Equal.",
                )
            )
    problems += reserved_label_problems(spec.pod.labels, field="spec.pod.labels")
    return problems


def autoscaling_problems(scale: Autoscaling, *, role: str, path: str) -> list[Problem]:
    """The autoscaling block's own rules (twins of the CEL rules on Autoscaling and Roles)."""
    problems: list[Problem] = []
    if scale.max_replicas is not None and scale.min_replicas > scale.max_replicas:
        problems.append(
            Problem(
                field=f"{path}.minReplicas",
                message=f"minReplicas ({scale.min_replicas}) is above maxReplicas ({scale.max_replicas}).",
                fix="make minReplicas <= maxReplicas.",
            )
        )
    if scale.mode == "operator" and scale.max_replicas is None:
        problems.append(
            Problem(
                field=f"{path}.maxReplicas",
                message="maxReplicas is required when the operator scales the role (mode operator).",
                fix="set maxReplicas, or mode: external to leave the replicas to an HPA or ScaledObject.",
            )
        )
    if scale.mode == "external" and (scale.metrics or scale.per_decode):
        problems.append(
            Problem(
                field=f"{path}.mode",
                message="with mode external the HPA or ScaledObject holds the metrics, not this block.",
                fix="remove metrics and perDecode, or set mode: operator.",
            )
        )
    if scale.per_decode is not None and role != "prefill":
        problems.append(
            Problem(
                field=f"{path}.perDecode",
                message="perDecode ties prefill to decode: it is for roles.prefill.autoscaling only.",
                fix="move perDecode to roles.prefill.autoscaling.",
            )
        )
    if scale.per_decode is not None and scale.per_decode.min > scale.per_decode.max:
        problems.append(
            Problem(
                field=f"{path}.perDecode.min",
                message=f"perDecode.min ({scale.per_decode.min:g}) is above max ({scale.per_decode.max:g}).",
                fix="make min <= max (equal for a fixed ratio).",
            )
        )
    return problems


def reserved_label_problems(labels: dict[str, str], *, field: str) -> list[Problem]:
    """Labels under a prefix the operator or LeaderWorkerSet owns (their selectors depend on them)."""
    return [
        Problem(
            field=f"{field}[{key}]",
            message=f"{key!r} is under {prefix}, which the operator and LeaderWorkerSet own.",
            fix="use a label of your own domain (e.g. example.com/team).",
        )
        for key in labels
        for prefix in RESERVED_LABEL_PREFIXES
        if key.startswith(prefix)
    ]
