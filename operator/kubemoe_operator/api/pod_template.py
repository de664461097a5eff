"""What a role's pods (spec.roles.<role>.pod) or the router's (spec.router.pod) may carry besides the
operator's own: Kubernetes' container and pod fields as the spec takes them (resources, environment,
volumes, affinity, tolerations), and the names, prefixes and mount points the operator keeps for itself,
which these refuse (CEL here, Python twins in api/rules.py)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from kubemoe_operator.api.base import ApiModel, cel, validations
from kubemoe_operator.api.patterns import (
    DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    ENV_NAME_PATTERN,
    ENV_PREFIX_PATTERN,
    LABEL_VALUE_PATTERN,
    OPTIONAL_DNS_SUBDOMAIN_PATTERN,
    QUALIFIED_NAME_PATTERN,
    QUANTITY_PATTERN,
    Quantity,
    cel_list,
    cel_prefixes,
    list_map,
)
from kubemoe_operator.api.quantity import parse_quantity

# Label prefixes the operator and LeaderWorkerSet own on pods (selectors, groups, metrics).
RESERVED_LABEL_PREFIXES = ("kubemoe.io/", "app.kubernetes.io/", "leaderworkerset.sigs.k8s.io/")
MAX_POD_METADATA = 64

RESERVED_ENV_PREFIXES = ("KUBEMOE_", "LWS_")
"""The runtime's settings and LeaderWorkerSet's group facts (LWS_LEADER_ADDRESS, LWS_WORKER_INDEX...)."""
RESERVED_ENV_NAMES = (
    "HOME",
    "HF_HOME",
    "HUGGINGFACE_HUB_CACHE",
    "VLLM_NIXL_SIDE_CHANNEL_HOST",
    "HF_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
)
"""Variables the operator sets in a pod: writable directories, the KV side channel, the model's
credentials (from model.credentialsSecret)."""
RESERVED_VOLUMES = ("model", "hf-cache", "home", "cache", "dshm", "experts", "api-keys")
"""Volume names the operator's pods use (render/sources.py, filesystem.py, experts.py, pods.py)."""
RESERVED_MOUNT_PATHS = ("/mnt/models", "/cache", "/home/kubemoe", "/dev/shm", "/etc/kubemoe")
"""The operator's mount points: the model claim, the model cache, HOME, /dev/shm, the expert
placement and the router's API keys (under /etc/kubemoe). A mount at or under one is refused."""
ACCELERATOR_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu")
"""The accelerators' extended resources (catalog/gpus.yaml): the plan sets their count."""
ACCELERATOR_RESOURCE_PREFIXES = ("nvidia.com/mig-",)
VOLUME_SOURCES = (
    "hostPath",
    "emptyDir",
    "secret",
    "configMap",
    "persistentVolumeClaim",
    "projected",
    "downwardAPI",
    "csi",
    "ephemeral",
    "image",
    "nfs",
    "iscsi",
    "fc",
    "rbd",
    "cephfs",
    "cinder",
    "flexVolume",
    "azureFile",
    "azureDisk",
    "gcePersistentDisk",
    "awsElasticBlockStore",
    "vsphereVolume",
    "portworxVolume",
    "glusterfs",
)
"""Kubernetes' volume sources (core/v1 VolumeSource)."""
MAX_POD_LIST = 32
MAX_ENV = 64
MAX_GROUP_ID = 2**31 - 1
"""Kubernetes' largest group id (IsValidGroupID)."""


def _accelerator_rule(field: str) -> dict[str, Any]:
    prefixes = cel_prefixes("k", ACCELERATOR_RESOURCE_PREFIXES)
    return cel(
        f"!has(self.{field}) || self.{field}.all(k, !(k in {cel_list(ACCELERATOR_RESOURCES)}) && {prefixes})",
        "accelerators (nvidia.com/gpu, amd.com/gpu, MIG slices) are the plan's: set accelerator.type and "
        "perPod instead; give other extended resources (e.g. rdma/hca) here",
        field_path=f".{field}",
    )


def _non_negative_rule(field: str) -> dict[str, Any]:
    """Twin of parse_quantity's sign check: the schema's pattern admits a sign and says nothing of an
    integer (x-kubernetes-int-or-string), and a pod with a negative request is refused only at apply."""
    value = f"self.{field}[k]"  # dyn: an int or a string (type() first; startsWith costs by the prefix)
    return cel(
        f"!has(self.{field}) || self.{field}.all(k, "
        f"type({value}) == int ? {value} >= 0 : !{value}.startsWith('-'))",
        "a resource quantity is at least 0 (e.g. cpu: 4, memory: 512Mi)",
        field_path=f".{field}",
    )


class Resources(ApiModel):
    """Container resources per pod; accelerators are added from the plan. Other extended resources
    (rdma/hca, an SR-IOV network's VFs) pass through; one given only in requests is limited alike
    (Kubernetes requires it)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            _accelerator_rule("requests"),
            _accelerator_rule("limits"),
            _non_negative_rule("requests"),
            _non_negative_rule("limits"),
        )
    )

    requests: dict[str, Quantity] = Field(default_factory=dict, max_length=32)
    limits: dict[str, Quantity] = Field(default_factory=dict, max_length=32)

    @field_validator("requests", "limits")
    @classmethod
    def _quantities(cls, value: dict[str, int | str]) -> dict[str, int | str]:
        for name, quantity in value.items():
            try:
                parse_quantity(quantity)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        return value


def label_rule() -> str:
    prefixes = " && ".join(f"!k.startsWith('{p}')" for p in RESERVED_LABEL_PREFIXES)
    return f"!has(self.labels) || self.labels.all(k, {prefixes})"


class Toleration(ApiModel):
    """A Kubernetes toleration."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "value must be empty when operator is Exists",
                field_path=".value",
            ),
            cel(
                "self.operator == 'Exists' || (has(self.key) && self.key != '')",
                "a toleration without a key must have operator Exists",
                field_path=".operator",
            ),
            cel(
                "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                "tolerationSeconds applies only to effect NoExecute",
                field_path=".tolerationSeconds",
            ),
        )
    )

    key: str | None = Field(None, max_length=316, pattern=QUALIFIED_NAME_PATTERN)
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = Field(None, max_length=63, pattern=LABEL_VALUE_PATTERN)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class KeyRef(ApiModel):
    """A key of a ConfigMap or Secret in the ModelDeployment's namespace."""

    name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    key: str = Field(min_length=1, max_length=253)
    optional: bool | None = None


class FieldRef(ApiModel):
    """A field of the pod (metadata.name, status.podIP, ...)."""

    field_path: str = Field(min_length=1, max_length=256)
    api_version: str | None = Field(None, max_length=64)


class ResourceFieldRef(ApiModel):
    """A resource of the container (requests.cpu, limits.memory, ...)."""

    resource: str = Field(min_length=1, max_length=256)
    container_name: str | None = Field(None, max_length=63)
    divisor: str | None = Field(None, max_length=64, pattern=QUANTITY_PATTERN)


class EnvVarSource(ApiModel):
    """Exactly one of fieldRef, resourceFieldRef, configMapKeyRef, secretKeyRef."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "(has(self.fieldRef) ? 1 : 0) + (has(self.resourceFieldRef) ? 1 : 0)"
                " + (has(self.configMapKeyRef) ? 1 : 0) + (has(self.secretKeyRef) ? 1 : 0) == 1",
                "valueFrom takes exactly one of fieldRef, resourceFieldRef, configMapKeyRef, secretKeyRef",
            )
        )
    )

    field_ref: FieldRef | None = None
    resource_field_ref: ResourceFieldRef | None = None
    config_map_key_ref: KeyRef | None = None
    secret_key_ref: KeyRef | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvVarSource:  # the CEL rule above
        given = [self.field_ref, self.resource_field_ref, self.config_map_key_ref, self.secret_key_ref]
        if sum(x is not None for x in given) != 1:
            raise ValueError(
                "valueFrom takes exactly one of fieldRef, resourceFieldRef, configMapKeyRef, secretKeyRef"
            )
        return self


class EnvVar(ApiModel):
    """A Kubernetes EnvVar: a value, or valueFrom."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("!has(self.value) || !has(self.valueFrom)", "give value or valueFrom, not both")
        )
    )

    name: str = Field(max_length=256, pattern=ENV_NAME_PATTERN)
    value: str | None = Field(None, max_length=32768)
    value_from: EnvVarSource | None = None

    @model_validator(mode="after")
    def _one_value(self) -> EnvVar:  # the CEL rule above
        if self.value is not None and self.value_from is not None:
            raise ValueError("give value or valueFrom, not both")
        return self


class EnvSourceRef(ApiModel):
    """A ConfigMap or Secret in the ModelDeployment's namespace."""

    name: str = Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    optional: bool | None = None


class EnvFromSource(ApiModel):
    """Every key of a ConfigMap or Secret as a variable (optionally prefixed). Variables the
    operator sets win over these (Kubernetes: env over envFrom)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.configMapRef) != has(self.secretRef)",
                "envFrom entries take exactly one of configMapRef, secretRef",
            )
        )
    )

    prefix: str | None = Field(None, max_length=256, pattern=ENV_PREFIX_PATTERN)
    config_map_ref: EnvSourceRef | None = None
    secret_ref: EnvSourceRef | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvFromSource:  # the CEL rule above
        if (self.config_map_ref is None) == (self.secret_ref is None):
            raise ValueError("envFrom entries take exactly one of configMapRef, secretRef")
        return self


class NodeSelectorRequirement(ApiModel):
    """key operator values, as in a Kubernetes node selector term's matchExpressions: a node label's key
    and values (label values: at most 63 characters)."""

    key: str = Field(min_length=1, max_length=316)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: list[Annotated[str, Field(max_length=63)]] = Field(default_factory=list, max_length=64)


class NodeFieldSelectorRequirement(NodeSelectorRequirement):
    """A matchFields requirement: the key is a node field (metadata.name, the only one Kubernetes
    takes) and the values node names, DNS subdomains of up to 253 characters, not label values."""

    values: list[Annotated[str, Field(max_length=253)]] = Field(default_factory=list, max_length=64)


class NodeSelectorTerm(ApiModel):
    """Requirements that must all hold (Kubernetes' NodeSelectorTerm)."""

    match_expressions: list[NodeSelectorRequirement] = Field(default_factory=list, max_length=16)
    match_fields: list[NodeFieldSelectorRequirement] = Field(default_factory=list, max_length=16)


class RequiredNodeSelector(ApiModel):
    """Terms of which at least one must hold."""

    node_selector_terms: list[NodeSelectorTerm] = Field(min_length=1, max_length=16)


class PreferredSchedulingTerm(ApiModel):
    weight: int = Field(ge=1, le=100)
    preference: NodeSelectorTerm


class NodeAffinity(ApiModel):
    """Kubernetes' NodeAffinity. The operator ANDs its accelerator term into every required term."""

    required_during_scheduling_ignored_during_execution: RequiredNodeSelector | None = None
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] = Field(
        default_factory=list, max_length=16
    )


OPEN_OBJECT: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}


class Affinity(ApiModel):
    """Kubernetes' Affinity. nodeAffinity is typed (the operator merges its own into it); podAffinity
    and podAntiAffinity pass through as written and the API server checks them when the operator
    creates the pods' workload (their full schema would repeat 12 KB in the CRD for every role)."""

    node_affinity: NodeAffinity | None = None
    pod_affinity: dict[str, Any] | None = Field(None, json_schema_extra=OPEN_OBJECT)
    """Kubernetes' PodAffinity (requiredDuringSchedulingIgnoredDuringExecution, preferred...)."""
    pod_anti_affinity: dict[str, Any] | None = Field(None, json_schema_extra=OPEN_OBJECT)
    """Kubernetes' PodAntiAffinity."""


class Volume(ApiModel):
    """A Kubernetes Volume: a name and one volume source (hostPath, emptyDir, configMap, secret,
    persistentVolumeClaim, csi, ...), passed through as written; the API server checks the source
    when the operator creates the pods' workload."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    name: str = Field(max_length=63, pattern=DNS_LABEL_PATTERN)

    @model_validator(mode="after")
    def _one_source(self) -> Volume:
        sources = sorted((self.model_extra or {}).keys())
        if len(sources) != 1 or sources[0] not in VOLUME_SOURCES:
            raise ValueError(
                f"a volume takes a name and exactly one source ({', '.join(VOLUME_SOURCES[:5])}, ...); "
                f"got {sources or 'none'}"
            )
        if not isinstance((self.model_extra or {})[sources[0]], dict):
            raise ValueError(f"{sources[0]} must be an object (e.g. {sources[0]}: {{}})")
        return self


class VolumeMount(ApiModel):
    """A Kubernetes VolumeMount of one of this pod template's own volumes."""

    name: str = Field(max_length=63, pattern=DNS_LABEL_PATTERN)
    mount_path: str = Field(min_length=2, max_length=1024, pattern=r"^/")
    read_only: bool | None = None
    sub_path: str | None = Field(None, max_length=1024)
    sub_path_expr: str | None = Field(None, max_length=1024)
    mount_propagation: Literal["None", "HostToContainer", "Bidirectional"] | None = None


def _mount_rule() -> str:
    reserved = " && ".join(
        f"m.mountPath != '{p}' && !m.mountPath.startsWith('{p}/')" for p in RESERVED_MOUNT_PATHS
    )
    return f"!has(self.volumeMounts) || self.volumeMounts.all(m, {reserved})"


def _pod_template_rules() -> dict[str, Any]:
    env_prefixes = cel_prefixes("e.name", RESERVED_ENV_PREFIXES)
    from_prefixes = cel_prefixes("s.prefix", RESERVED_ENV_PREFIXES)
    return validations(
        cel(
            label_rule(),
            "labels must not use the prefixes kubemoe.io/, app.kubernetes.io/ or "
            "leaderworkerset.sigs.k8s.io/ (the operator's and LeaderWorkerSet's own)",
            field_path=".labels",
        ),
        cel(
            f"!has(self.env) || self.env.all(e, {env_prefixes}"
            f" && !(e.name in {cel_list(RESERVED_ENV_NAMES)}))",
            "env must not set KUBEMOE_*, LWS_* or the variables the operator sets (HOME, HF_HOME, "
            "HUGGINGFACE_HUB_CACHE, VLLM_NIXL_SIDE_CHANNEL_HOST, HF_TOKEN, AWS_*): rename the variable; "
            "model credentials go in model.credentialsSecret",
            field_path=".env",
        ),
        cel(
            f"!has(self.envFrom) || self.envFrom.all(s, !has(s.prefix) || ({from_prefixes}))",
            "envFrom prefix must not start with KUBEMOE_ or LWS_ (the runtime's and LeaderWorkerSet's)",
            field_path=".envFrom",
        ),
        cel(
            f"!has(self.volumes) || self.volumes.all(v, !(v.name in {cel_list(RESERVED_VOLUMES)}))",
            "volumes must not be named like the operator's own (model, hf-cache, home, cache, dshm, "
            "experts, api-keys): choose another name",
            field_path=".volumes",
        ),
        cel(
            _mount_rule(),
            "volumeMounts must not be at or under the operator's mount points (/mnt/models, /cache, "
            "/home/kubemoe, /dev/shm, /etc/kubemoe): mount elsewhere",
            field_path=".volumeMounts",
        ),
        cel(
            "!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes)"
            " && self.volumes.exists(v, v.name == m.name))",
            "each volumeMount must name a volume of this pod template's volumes",
            field_path=".volumeMounts",
        ),
    )


class PodTemplateOptions(ApiModel):
    """What one role's pods (both the leader and the worker template of a LeaderWorkerSet, or a
    Deployment's pods), or the router's, carry besides the operator's own, e.g. for wide expert
    parallelism on an RDMA fabric: a Multus network annotation, NCCL/UCX variables, hostPath or
    emptyDir volumes. Extended resources (rdma/hca, SR-IOV VFs) go in the role's resources. The
    operator's own parts are protected: its labels, variables, volumes and mount points are refused
    here, the engine's arguments are spec.engine's, and its accelerator node affinity always holds."""

    model_config = ConfigDict(json_schema_extra=_pod_template_rules())

    annotations: dict[str, str] = Field(default_factory=dict, max_length=MAX_POD_METADATA)
    """Pod annotations (e.g. k8s.v1.cni.cncf.io/networks for Multus); over spec.pod's on the same key."""
    labels: dict[str, str] = Field(default_factory=dict, max_length=MAX_POD_METADATA)
    """Pod labels, over spec.pod's on the same key; not under kubemoe.io/, app.kubernetes.io/ or
    leaderworkerset.sigs.k8s.io/."""
    env: list[EnvVar] = Field(default_factory=list, max_length=MAX_ENV, json_schema_extra=list_map("name"))
    """Environment variables of the container (e.g. NCCL_IB_HCA, UCX_NET_DEVICES), after the
    operator's. Not KUBEMOE_*, LWS_* or a variable the operator sets (HOME, HF_HOME,
    HUGGINGFACE_HUB_CACHE, VLLM_NIXL_SIDE_CHANNEL_HOST; HF_TOKEN and AWS_* come from
    model.credentialsSecret)."""
    env_from: list[EnvFromSource] = Field(default_factory=list, max_length=16)
    """ConfigMaps and Secrets whose keys become variables; the operator's variables win over them."""
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict, max_length=32
    )
    """Node labels the pods require, with scheduling.nodeSelector's (the same key with another value is
    refused); naming the accelerator's node label (e.g. nvidia.com/gpu.product) replaces the operator's
    choice, as there."""
    affinity: Affinity | None = None
    """Node affinity, pod affinity and pod anti-affinity. The operator's required node affinity for the
    accelerator (when it has one) is ANDed into each required node selector term, never replaced."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Added to scheduling.tolerations."""
    volumes: list[Volume] = Field(
        default_factory=list, max_length=MAX_POD_LIST, json_schema_extra=list_map("name")
    )
    """Pod volumes: each a name and one Kubernetes volume source, as in a pod spec (the API server checks
    the source). Not named like the operator's (model, hf-cache, home, cache, dshm, experts, api-keys)."""
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list, max_length=MAX_POD_LIST, json_schema_extra=list_map("mountPath")
    )
    """Mounts of these volumes into the container; not at or under /mnt/models, /cache, /home/kubemoe,
    /dev/shm or /etc/kubemoe (the operator's)."""
    priority_class_name: str | None = Field(None, max_length=253, pattern=OPTIONAL_DNS_SUBDOMAIN_PATTERN)
    """PriorityClass of these pods; replaces scheduling.priorityClassName."""
    service_account_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    """ServiceAccount the pods run as (e.g. for a cloud identity); the namespace's default when absent.
    Not for SGLang's P/D router, which runs as its own (it reads the namespace's pods)."""
    supplemental_groups: list[Annotated[int, Field(ge=1, le=MAX_GROUP_ID)]] = Field(
        default_factory=list, max_length=MAX_POD_LIST
    )
    """Group ids the pods' processes belong to besides the images' own (the pod's securityContext), for
    device files the node gives a group: on AMD GPUs the node's video and render groups, which own
    /dev/kfd and /dev/dri (`getent group video render` on the node; the ids differ between
    distributions). Not 0, the root group."""
