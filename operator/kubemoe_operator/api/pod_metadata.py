"""What Kubernetes accepts in a pod's labels, annotations and tolerations (apimachinery's
validation.IsQualifiedName and IsValidLabelValue, and core's toleration rules), checked before
render: a LeaderWorkerSet takes any pod template, and only its controller, creating the
StatefulSet, would find the template invalid; the ModelDeployment would roll out forever."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from kubemoe_operator.api.patterns import DNS_SUBDOMAIN_PATTERN
from kubemoe_operator.api.pod_template import Toleration
from kubemoe_operator.api.problems import Problem

_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_SUBDOMAIN = re.compile(DNS_SUBDOMAIN_PATTERN)
NAME_FIX = "alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"


def qualified_name_problem(key: str) -> str | None:
    """Why `key` is not a qualified name ([prefix/]name: a DNS subdomain of at most 253 characters,
    then a name of at most 63), or None."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and not prefix:
        return "the prefix before '/' is empty"
    if prefix and (len(prefix) > 253 or not _SUBDOMAIN.match(prefix)):
        return f"the prefix {prefix!r} is not a DNS subdomain (lowercase letters, digits, '-' and '.')"
    if not name or len(name) > 63 or not _NAME.match(name):
        return f"the name {name!r} must be 1-63 characters: {NAME_FIX}"
    return None


def label_value_problem(value: str) -> str | None:
    if value and (len(value) > 63 or not _NAME.match(value)):
        return f"a label value must be empty or 1-63 characters: {NAME_FIX}"
    return None


def metadata_problems(
    labels: Mapping[str, str], annotations: Mapping[str, str], *, field: str
) -> list[Problem]:
    """`field`.labels and `field`.annotations that Kubernetes refuses."""
    problems = []
    for key, value in labels.items():
        why = qualified_name_problem(key) or label_value_problem(value)
        if why is not None:
            problems.append(Problem(field=f"{field}.labels[{key}]", message=f"{why}.", fix="rename it."))
    for key in annotations:
        why = qualified_name_problem(key.lower())  # as apimachinery: annotation keys in any case
        if why is not None:
            problems.append(Problem(field=f"{field}.annotations[{key}]", message=f"{why}.", fix="rename it."))
    return problems


def toleration_problems(tolerations: Sequence[Toleration], *, field: str) -> list[Problem]:
    """Tolerations Kubernetes refuses."""
    problems = []
    for i, tol in enumerate(tolerations):
        where = f"{field}[{i}]"
        if not tol.key and tol.operator != "Exists":
            problems.append(
                Problem(
                    field=f"{where}.operator",
                    message="a toleration without a key must have operator Exists (it tolerates any taint).",
                    fix="set key, or operator: Exists.",
                )
            )
        if tol.key and (why := qualified_name_problem(tol.key)) is not None:
            problems.append(Problem(field=f"{where}.key", message=f"{why}.", fix="use the taint's key."))
        if tol.value and (why := label_value_problem(tol.value)) is not None:
            problems.append(Problem(field=f"{where}.value", message=f"{why}.", fix="use the taint's value."))
        if tol.toleration_seconds is not None and tol.effect != "NoExecute":
            problems.append(
                Problem(
                    field=f"{where}.tolerationSeconds",
                    message="tolerationSeconds applies only to effect NoExecute.",
                    fix="set effect: NoExecute, or remove tolerationSeconds.",
                )
            )
    return problems
