"""What only the in-cluster operator refuses: specs that `kubemoe plan` and `kubemoe up` accept
but no pod in a cluster could serve.

A file:// source is a path on the machine that runs `kubemoe up`; rendered into a cluster it
would become a path no pod has, and every pod would fail to load. The operator refuses it before
planning, with reason SourceNotInCluster on Planned and Ready, and creates nothing.
"""

from __future__ import annotations

from kubemoe_operator.api.problems import ManifestError, Problem
from kubemoe_operator.api.spec import ModelDeploymentSpec

REASON_SOURCE_NOT_IN_CLUSTER = "SourceNotInCluster"


class NotForClusterError(ManifestError):
    """A valid spec that cannot run in a cluster."""

    reason = REASON_SOURCE_NOT_IN_CLUSTER


def check_for_cluster(spec: ModelDeploymentSpec) -> None:
    """Raise NotForClusterError if `spec` cannot run in a cluster."""
    source = spec.model.source
    if source.startswith("file://"):
        raise NotForClusterError(
            [
                Problem(
                    field="spec.model.source",
                    message=f"{source} is a path on the machine that runs `kubemoe up`; "
                    "no pod in the cluster has it.",
                    fix="copy the weights to a PersistentVolumeClaim and use pvc://CLAIM/PATH "
                    "(or hf://ORG/NAME, s3://BUCKET/PREFIX); file:// is for `kubemoe up` only.",
                )
            ]
        )
