"""What rendered pods carry besides the operator's own. Every pod: annotations, labels and image pull
secrets, the operator's defaults (chart values runtimePodAnnotations, runtimePodLabels,
runtimeImagePullSecrets) with spec.pod on top. One role's pods, or the router's: its pod template
options (spec.roles.<role>.pod, spec.router.pod) on top of those, and their environment, volumes,
mounts and ServiceAccount added to the operator's (placement.py merges their scheduling).

The operator's own labels and annotations always win (its selectors depend on them); its variables,
volumes and mount points cannot be touched: api/rules.py refuses a template that names them, so what
is added here never replaces anything the operator renders."""

from __future__ import annotations

from typing import Any

from kubemoe_operator.api.pod_template import PodTemplateOptions
from kubemoe_operator.api.spec import ModelDeploymentSpec, PodOptions


def merged(defaults: PodOptions, spec: PodOptions) -> PodOptions:
    """`spec` over `defaults`: its annotations and labels win on the same key; secrets are the union."""
    secrets = list(dict.fromkeys([*defaults.image_pull_secrets, *spec.image_pull_secrets]))
    return PodOptions(
        annotations={**defaults.annotations, **spec.annotations},
        labels={**defaults.labels, **spec.labels},
        image_pull_secrets=secrets,
    )


def role_pod(spec: ModelDeploymentSpec, role: str) -> PodTemplateOptions | None:
    """spec.roles.<role>.pod (None for a role not in the spec)."""
    return next((given.pod for name, given in spec.roles.items() if name == role), None)


def _dump(items: list[Any]) -> list[dict[str, Any]]:
    return [i.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True) for i in items]


def with_options(
    template: dict[str, Any], options: PodOptions, own: PodTemplateOptions | None = None
) -> dict[str, Any]:
    """A pod template with `options` (every pod's) and `own` (this role's or the router's) added:
    labels and annotations under the operator's own, `own`'s over `options`'; `own`'s variables,
    envFrom and mounts after the container's own, its volumes after the pod's, its ServiceAccount."""
    pod = own or PodTemplateOptions()
    meta = template["metadata"]
    meta["labels"] = {**options.labels, **pod.labels, **meta["labels"]}
    annotations = {**options.annotations, **pod.annotations, **meta.get("annotations", {})}
    if annotations:
        meta["annotations"] = annotations
    spec = template["spec"]
    if options.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in options.image_pull_secrets]
    container = spec["containers"][0]
    if pod.env:
        container["env"] = [*container.get("env", []), *_dump(pod.env)]
    if pod.env_from:
        container["envFrom"] = _dump(pod.env_from)
    if pod.volume_mounts:
        container["volumeMounts"] = [*container.get("volumeMounts", []), *_dump(pod.volume_mounts)]
    if pod.volumes:
        spec["volumes"] = [*spec.get("volumes", []), *_dump(pod.volumes)]
    if pod.service_account_name is not None:
        spec["serviceAccountName"] = pod.service_account_name
    return template
