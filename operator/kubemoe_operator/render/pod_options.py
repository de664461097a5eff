"""Annotations, labels and image pull secrets every rendered pod carries: the operator's defaults
(chart values runtimePodAnnotations, runtimePodLabels, runtimeImagePullSecrets) with spec.pod on top.
The operator's own labels always win (its selectors depend on them; both sources are validated
against the reserved prefixes before they get here)."""

from __future__ import annotations

from typing import Any

from kubemoe_operator.api.spec import PodOptions


def merged(defaults: PodOptions, spec: PodOptions) -> PodOptions:
    """`spec` over `defaults`: its annotations and labels win on the same key; secrets are the union."""
    secrets = list(dict.fromkeys([*defaults.image_pull_secrets, *spec.image_pull_secrets]))
    return PodOptions(
        annotations={**defaults.annotations, **spec.annotations},
        labels={**defaults.labels, **spec.labels},
        image_pull_secrets=secrets,
    )


def with_options(template: dict[str, Any], options: PodOptions) -> dict[str, Any]:
    """A pod template with `options` added (its own labels kept)."""
    meta = template["metadata"]
    meta["labels"] = {**options.labels, **meta["labels"]}
    if options.annotations:
        meta["annotations"] = dict(options.annotations)
    if options.image_pull_secrets:
        template["spec"]["imagePullSecrets"] = [{"name": n} for n in options.image_pull_secrets]
    return template
