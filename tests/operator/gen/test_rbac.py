"""The operator's RBAC rules (the chart's ClusterRole): least privilege, yet enough for every child kind."""

from __future__ import annotations

from kubemoe_operator.gen.rbac import CLUSTER_RULES, LEASE_RULES, cluster_role
from kubemoe_operator.kube.kinds import CHILD_KINDS


def test_rbac_has_no_wildcards_and_covers_every_child_kind() -> None:
    rules = [*CLUSTER_RULES, *LEASE_RULES]
    for rule in rules:
        assert "*" not in rule["verbs"]
        assert "*" not in rule["resources"]
        assert "*" not in rule["apiGroups"]
    for kind in CHILD_KINDS:
        group = kind.api_version.rpartition("/")[0]
        plural = kind.plural
        verbs = {v for r in rules if group in r["apiGroups"] and plural in r["resources"] for v in r["verbs"]}
        assert {"list", "watch", "patch", "create", "delete"} <= verbs, kind.kind
    assert cluster_role()["kind"] == "ClusterRole"
