"""The cross-field rules of the spec, in Python: twins of the CEL rules in `spec.py` (extraArgs here is
the complete check, `api/engine_flags.py`; its CEL twin is a coarser first filter)."""

from __future__ import annotations

import re

from kubemoe_operator.api.engine_flags import extra_args_problems, offloading_problems
from kubemoe_operator.api.engines import engine_problems
from kubemoe_operator.api.patterns import DNS_SUBDOMAIN_PATTERN, ENV_NAME_PATTERN
from kubemoe_operator.api.pod_metadata import (
    metadata_problems,
    node_affinity_problems,
    node_selector_problems,
    sub_path_problems,
    toleration_problems,
)
from kubemoe_operator.api.pod_template import (
    ACCELERATOR_RESOURCE_PREFIXES,
    ACCELERATOR_RESOURCES,
    RESERVED_ENV_NAMES,
    RESERVED_ENV_PREFIXES,
    RESERVED_LABEL_PREFIXES,
    RESERVED_MOUNT_PATHS,
    RESERVED_VOLUMES,
    PodTemplateOptions,
    Resources,
)
from kubemoe_operator.api.problems import Problem
from kubemoe_operator.api.quantity import milli_units
from kubemoe_operator.api.spec import (
    CACHE_CLAIM_MESSAGE,
    CACHE_SOURCE_MESSAGE,
    AcceleratorSpec,
    Autoscaling,
    ModelDeploymentSpec,
)


def model_cache_problems(spec: ModelDeploymentSpec) -> list[Problem]:
    """model.cache's CEL rules (on ModelSpec) in Python."""
    model, out = spec.model, []
    if model.cache is not None and not model.source.startswith("hf://"):
        out.append(
            Problem(
                field="spec.model.cache",
                message=CACHE_SOURCE_MESSAGE + ".",
                fix="remove model.cache, or set model.source to hf://ORG/NAME.",
            )
        )
    if model.cache is not None and model.cache_claim is not None:
        out.append(
            Problem(
                field="spec.model.cache",
                message=CACHE_CLAIM_MESSAGE + ".",
                fix="remove model.cacheClaim (model.cache.claim can name the same claim).",
            )
        )
    return out


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
    problems += offloading_problems(
        spec.engine.extra_args,
        field="spec.engine.extraArgs",
        engine=spec.engine.kind,
        disaggregated=spec.serving.mode == "disaggregated",
    )
    problems += engine_problems(spec)
    problems += model_cache_problems(spec)
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
            problems += gpu_metric_problems(role.autoscaling, spec.accelerator, path=f"{path}.autoscaling")
        if role.resources is not None:
            problems += accelerator_resource_problems(role.resources, field=f"{path}.resources")
            problems += request_limit_problems(role.resources, field=f"{path}.resources")
        if role.pod is not None:
            problems += pod_template_problems(role.pod, field=f"{path}.pod")
            problems += node_selector_conflicts(
                role.pod.node_selector, spec.scheduling.node_selector, field=f"{path}.pod.nodeSelector"
            )
    if spec.router.resources is not None:
        problems += accelerator_resource_problems(spec.router.resources, field="spec.router.resources")
        problems += request_limit_problems(spec.router.resources, field="spec.router.resources")
    if spec.router.pod is not None:
        problems += pod_template_problems(spec.router.pod, field="spec.router.pod")
        if (
            spec.engine.kind == "sglang"
            and spec.serving.mode == "disaggregated"
            and spec.router.pod.service_account_name is not None
        ):
            problems.append(
                Problem(
                    field="spec.router.pod.serviceAccountName",
                    message="SGLang's P/D router runs as the ServiceAccount the operator gives it "
                    "(its service discovery reads the namespace's pods).",
                    fix="remove router.pod.serviceAccountName.",
                )
            )
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
    problems += metadata_problems(spec.pod.labels, spec.pod.annotations, field="spec.pod")
    problems += toleration_problems(spec.scheduling.tolerations, field="spec.scheduling.tolerations")
    problems += node_selector_problems(spec.scheduling.node_selector, field="spec.scheduling.nodeSelector")
    priority = spec.scheduling.priority_class_name
    if priority and not re.match(DNS_SUBDOMAIN_PATTERN, priority):
        problems.append(
            Problem(
                field="spec.scheduling.priorityClassName",
                message=f"{priority!r} is not a PriorityClass name (lowercase letters, digits, '-' and '.').",
                fix="name an existing PriorityClass (kubectl get priorityclass).",
            )
        )
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


NON_NVIDIA_TYPES: dict[str, str | None] = {
    "cpu": None,
    "mi300x": "amd.com/gpu",
    "amd_instinct_mi300x": "amd.com/gpu",
}
"""accelerator.type values (lower case: catalog/gpus.yaml's names and node labels) whose catalog entry
requests no nvidia.com/gpu, and the resource it requests instead (None: cpu). api/ may not import the
catalog; tests/operator/api checks this against it."""
NVML_RESOURCE = "nvidia.com/gpu"
"""The one device resource whose pods export kubemoe_gpu_utilization_ratio (the runtime's NVML collector;
MIG slices report no utilization)."""


def device_resource(accelerator: AcceleratorSpec) -> str | None:
    """The extended resource each pod requests, as catalog.resolve_gpu resolves it: accelerator.resource
    if given, else the catalog entry's (None for cpu), else nvidia.com/gpu for a type the catalog lacks."""
    if accelerator.resource is not None:
        return accelerator.resource
    return NON_NVIDIA_TYPES.get(accelerator.type.lower(), NVML_RESOURCE)


def gpu_metric_problems(scale: Autoscaling, accelerator: AcceleratorSpec, *, path: str) -> list[Problem]:
    """gpu-utilization where no pod exports it: the runtime's NVML collector reads NVIDIA GPUs only, so
    on any other device resource (amd.com/gpu, habana.ai/gaudi, cpu) the metric would always be
    missing, and a missing metric never scales down."""
    resource = device_resource(accelerator)
    if resource == NVML_RESOURCE:
        return []
    device = f"accelerator.type {accelerator.type} ({resource or 'CPU processes, no device'})"
    return [
        Problem(
            field=f"{path}.metrics[{i}].type",
            message=f"gpu-utilization reads kubemoe_gpu_utilization_ratio, which the pods export through"
            f" NVML for NVIDIA GPUs ({NVML_RESOURCE}) only; on {device} it is never there, and the role"
            " would never scale down.",
            fix="use itl-p90, ttft-p90, kv-cache-usage or queue-depth (docs/autoscaling.md) instead.",
        )
        for i, metric in enumerate(scale.metrics)
        if metric.type == "gpu-utilization"
    ]


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


def request_limit_problems(resources: Resources, *, field: str) -> list[Problem]:
    """A request above its limit: Kubernetes refuses the pod."""
    return [
        Problem(
            field=f"{field}.requests.{name}",
            message=f"{request} is above its limit ({resources.limits[name]}); Kubernetes refuses the pod.",
            fix=f"lower the request to at most {resources.limits[name]}, or raise the limit.",
        )
        for name, request in resources.requests.items()
        if name in resources.limits and milli_units(request) > milli_units(resources.limits[name])
    ]


def accelerator_resource_problems(resources: Resources, *, field: str) -> list[Problem]:
    """Accelerators in a container's resources: the plan sets their count (twin of the CEL rule on
    Resources)."""
    return [
        Problem(
            field=f"{field}.{kind}[{name}]",
            message=f"{name} is an accelerator: the plan requests accelerator.perPod of them per pod.",
            fix="remove it and set accelerator.type and perPod; other extended resources (e.g. rdma/hca) "
            "may stay.",
        )
        for kind, given in (("requests", resources.requests), ("limits", resources.limits))
        for name in given
        if name in ACCELERATOR_RESOURCES or name.startswith(ACCELERATOR_RESOURCE_PREFIXES)
    ]


def reserved_mount_path(path: str) -> str | None:
    """The operator's mount point `path` is at or under, if any."""
    return next((p for p in RESERVED_MOUNT_PATHS if path == p or path.startswith(p + "/")), None)


def pod_template_problems(pod: PodTemplateOptions, *, field: str) -> list[Problem]:
    """spec.roles.<role>.pod or spec.router.pod touching what the operator owns (twins of the CEL rules
    on PodTemplateOptions), duplicate names the API server's list maps refuse, and labels, tolerations,
    node selectors, node affinity and subPaths the API server would refuse in the pods' workload."""
    problems = reserved_label_problems(pod.labels, field=f"{field}.labels")
    problems += metadata_problems(pod.labels, pod.annotations, field=field)
    problems += toleration_problems(pod.tolerations, field=f"{field}.tolerations")
    problems += node_selector_problems(pod.node_selector, field=f"{field}.nodeSelector")
    if pod.affinity is not None:
        problems += node_affinity_problems(pod.affinity.node_affinity, field=f"{field}.affinity.nodeAffinity")
    problems += sub_path_problems(pod.volume_mounts, field=f"{field}.volumeMounts")
    for i, var in enumerate(pod.env):
        if var.name.startswith(RESERVED_ENV_PREFIXES) or var.name in RESERVED_ENV_NAMES:
            problems.append(
                Problem(
                    field=f"{field}.env[{i}].name",
                    message=f"{var.name} is the operator's (KUBEMOE_* and LWS_* are the runtime's and "
                    "LeaderWorkerSet's; HOME, HF_HOME, HUGGINGFACE_HUB_CACHE and "
                    "VLLM_NIXL_SIDE_CHANNEL_HOST it sets; HF_TOKEN and AWS_* come from "
                    "model.credentialsSecret).",
                    fix="rename the variable, or put model credentials in model.credentialsSecret.",
                )
            )
    for i, source in enumerate(pod.env_from):
        if source.prefix and not re.match(ENV_NAME_PATTERN, source.prefix):
            problems.append(
                Problem(
                    field=f"{field}.envFrom[{i}].prefix",
                    message=f"prefix {source.prefix!r} cannot start a variable name (letters, digits, "
                    "'_', '-' and '.', not starting with a digit).",
                    fix="choose another prefix.",
                )
            )
        if source.prefix is not None and source.prefix.startswith(RESERVED_ENV_PREFIXES):
            problems.append(
                Problem(
                    field=f"{field}.envFrom[{i}].prefix",
                    message=f"prefix {source.prefix!r} starts like the runtime's (KUBEMOE_) or "
                    "LeaderWorkerSet's (LWS_) variables.",
                    fix="choose another prefix.",
                )
            )
    names = [v.name for v in pod.volumes]
    for i, name in enumerate(names):
        if name in RESERVED_VOLUMES:
            problems.append(
                Problem(
                    field=f"{field}.volumes[{i}].name",
                    message=f"volume {name!r} is the operator's ({', '.join(RESERVED_VOLUMES)}).",
                    fix="choose another name (and use it in volumeMounts).",
                )
            )
        elif name in names[:i]:
            problems.append(
                Problem(
                    field=f"{field}.volumes[{i}].name",
                    message=f"volume {name!r} is given twice.",
                    fix="give each volume its own name.",
                )
            )
    paths = [m.mount_path for m in pod.volume_mounts]
    for i, mount in enumerate(pod.volume_mounts):
        owner = reserved_mount_path(mount.mount_path)
        if owner is not None:
            problems.append(
                Problem(
                    field=f"{field}.volumeMounts[{i}].mountPath",
                    message=f"{mount.mount_path} is at or under {owner}, one of the operator's mount points "
                    f"({', '.join(RESERVED_MOUNT_PATHS)}).",
                    fix="mount it elsewhere (e.g. /mnt/data).",
                )
            )
        elif mount.mount_path in paths[:i]:
            problems.append(
                Problem(
                    field=f"{field}.volumeMounts[{i}].mountPath",
                    message=f"{mount.mount_path} is mounted twice.",
                    fix="give each mount its own path.",
                )
            )
        if mount.name not in names:
            problems.append(
                Problem(
                    field=f"{field}.volumeMounts[{i}].name",
                    message=f"volume {mount.name!r} is not among this pod template's volumes.",
                    fix=f"add a volume named {mount.name} to {field}.volumes, or fix the name.",
                )
            )
    seen: set[str] = set()
    for i, var in enumerate(pod.env):
        if var.name in seen:
            problems.append(
                Problem(
                    field=f"{field}.env[{i}].name",
                    message=f"{var.name} is given twice.",
                    fix="keep one entry per variable.",
                )
            )
        seen.add(var.name)
    return problems


def node_selector_conflicts(own: dict[str, str], shared: dict[str, str], *, field: str) -> list[Problem]:
    """A role's nodeSelector giving a key of scheduling.nodeSelector another value (no node has both)."""
    return [
        Problem(
            field=f"{field}[{key}]",
            message=f"{key}={value} contradicts scheduling.nodeSelector's {key}={shared[key]}: "
            "no node has both.",
            fix="keep one value: drop the key here or in scheduling.nodeSelector.",
        )
        for key, value in own.items()
        if key in shared and shared[key] != value
    ]
