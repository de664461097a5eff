"""What Kubernetes accepts in a pod's labels, annotations, tolerations, node selector, node affinity and
volume mounts' subPath (apimachinery's validation.IsQualifiedName and IsValidLabelValue, and core's
toleration, node selector requirement and volume mount rules), checked before render: a LeaderWorkerSet
takes any pod template, and only its controller, creating the StatefulSet, would find the template
invalid; the ModelDeployment would roll out forever (a Deployment's would be refused at apply, naming the
Deployment's field, not the ModelDeployment's)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from kubemoe_operator.api.patterns import DNS_SUBDOMAIN_PATTERN
from kubemoe_operator.api.pod_template import (
    NodeAffinity,
    NodeFieldSelectorRequirement,
    NodeSelectorRequirement,
    NodeSelectorTerm,
    Toleration,
    VolumeMount,
)
from kubemoe_operator.api.problems import Problem

_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_SUBDOMAIN = re.compile(DNS_SUBDOMAIN_PATTERN)
NAME_FIX = "alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
NODE_LABELS = "kubectl get nodes --show-labels"
NODE_NAME_FIELD = "metadata.name"
"""The one field a node selector term's matchFields may name (nodeFieldSelectorValidators)."""
_INTEGER = re.compile(r"^[+-]?[0-9]+$")
_INT64 = 2**63


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


def node_selector_problems(selector: Mapping[str, str], *, field: str) -> list[Problem]:
    """`field` (a nodeSelector) entries Kubernetes refuses: keys are label keys (qualified names), values
    label values (core validation's ValidateLabels on the pod's nodeSelector)."""
    problems = []
    for key, value in selector.items():
        if (why := qualified_name_problem(key)) is not None:
            fix = f"use the key of a node label ({NODE_LABELS}), e.g. topology.kubernetes.io/zone."
            problems.append(Problem(field=f"{field}[{key}]", message=f"{why}.", fix=fix))
        elif (why := label_value_problem(value)) is not None:
            fix = f"use the value the nodes' label has ({NODE_LABELS})."
            problems.append(Problem(field=f"{field}[{key}]", message=f"value {value!r}: {why}.", fix=fix))
    return problems


def _gt_lt_problem(req: NodeSelectorRequirement) -> str | None:
    """Why Gt/Lt's values are not exactly one integer (the API server counts them; the scheduler parses
    the one as a 64-bit integer and, failing, leaves the pod Pending), or None."""
    if len(req.values) != 1:
        return f"operator {req.operator} compares the label with exactly one value; got {len(req.values)}"
    value = req.values[0]
    if not _INTEGER.match(value) or not -_INT64 <= int(value) < _INT64:
        return f"operator {req.operator} compares the label as an integer; {value!r} is not one"
    return None


def _values_problem(req: NodeSelectorRequirement) -> tuple[str, str] | None:
    """What is wrong with the number of values for the operator, and the fix, or None."""
    op = req.operator
    if op in ("In", "NotIn") and not req.values:
        return f"operator {op} needs at least one value.", "list the label values to match, or use Exists."
    if op in ("Exists", "DoesNotExist") and req.values:
        return (
            f"operator {op} matches the key alone and takes no values.",
            "remove values, or use operator In / NotIn.",
        )
    if op in ("Gt", "Lt") and (why := _gt_lt_problem(req)) is not None:
        return f"{why}.", "give one integer, e.g. values: ['3']."
    return None


def requirement_problems(req: NodeSelectorRequirement, *, field: str, required: bool) -> list[Problem]:
    """A matchExpressions entry Kubernetes refuses (core validation's ValidateNodeSelectorRequirement): a
    key that is no label key, values the operator does not take, and, in a required term, values that are
    no label values (refused since Kubernetes 1.33; no node label could match them anyway)."""
    problems = []
    if (why := qualified_name_problem(req.key)) is not None:
        fix = f"use the key of a node label ({NODE_LABELS}), e.g. topology.kubernetes.io/zone."
        problems.append(Problem(field=f"{field}.key", message=f"{why}.", fix=fix))
    if (bad := _values_problem(req)) is not None:
        problems.append(Problem(field=f"{field}.values", message=bad[0], fix=bad[1]))
    for k, value in enumerate(req.values if required else []):
        if (why := label_value_problem(value)) is not None:
            fix = f"use a value the nodes' label has ({NODE_LABELS})."
            problems.append(Problem(field=f"{field}.values[{k}]", message=f"{value!r}: {why}.", fix=fix))
    return problems


def field_requirement_problems(req: NodeFieldSelectorRequirement, *, field: str) -> list[Problem]:
    """A matchFields entry Kubernetes refuses (ValidateNodeFieldSelectorRequirement): the only field is
    metadata.name, with operator In or NotIn and exactly one node name (a DNS subdomain of at most 253
    characters, as the schema's NodeFieldSelectorRequirement bounds it)."""
    problems = []
    if req.key != NODE_NAME_FIELD:
        problems.append(
            Problem(
                field=f"{field}.key",
                message=f"{req.key!r} is not a node field matchFields can select; only {NODE_NAME_FIELD} is.",
                fix=f"use key: {NODE_NAME_FIELD}, or move the requirement to matchExpressions (node labels).",
            )
        )
    if req.operator not in ("In", "NotIn") or len(req.values) != 1:
        problems.append(
            Problem(
                field=f"{field}.values" if req.operator in ("In", "NotIn") else f"{field}.operator",
                message=f"matchFields takes operator In or NotIn with exactly one node name; got operator"
                f" {req.operator} with {len(req.values)} value{'' if len(req.values) == 1 else 's'}.",
                fix="use one entry per node name (operator In or NotIn, values: [NODE]).",
            )
        )
    for k, value in enumerate(req.values):
        if len(value) > 253 or not _SUBDOMAIN.match(value):
            problems.append(
                Problem(
                    field=f"{field}.values[{k}]",
                    message=f"{value!r} is not a node name (lowercase letters, digits, '-' and '.').",
                    fix="use a node's name (kubectl get nodes).",
                )
            )
    return problems


def term_problems(term: NodeSelectorTerm, *, field: str, required: bool) -> list[Problem]:
    """A node selector term's requirements that Kubernetes refuses."""
    problems = []
    for j, req in enumerate(term.match_expressions):
        problems += requirement_problems(req, field=f"{field}.matchExpressions[{j}]", required=required)
    for j, req in enumerate(term.match_fields):
        problems += field_requirement_problems(req, field=f"{field}.matchFields[{j}]")
    return problems


def node_affinity_problems(affinity: NodeAffinity | None, *, field: str) -> list[Problem]:
    """`field` (a nodeAffinity) terms Kubernetes refuses, in its required and its preferred terms."""
    if affinity is None:
        return []
    problems = []
    required = affinity.required_during_scheduling_ignored_during_execution
    where = f"{field}.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms"
    for i, term in enumerate(required.node_selector_terms if required is not None else []):
        problems += term_problems(term, field=f"{where}[{i}]", required=True)
    where = f"{field}.preferredDuringSchedulingIgnoredDuringExecution"
    for i, preferred in enumerate(affinity.preferred_during_scheduling_ignored_during_execution):
        problems += term_problems(preferred.preference, field=f"{where}[{i}].preference", required=False)
    return problems


def local_path_problem(path: str) -> str | None:
    """Why `path` is not a path within the volume (core validation's validateLocalDescendingPath: relative,
    no '..' component), or None."""
    if path.startswith("/"):
        return f"{path!r} is absolute; it must be a path relative to the volume's root"
    if ".." in path.split("/"):
        return f"{path!r} has a '..' component; it must stay within the volume"
    return None


def sub_path_problems(mounts: Sequence[VolumeMount], *, field: str) -> list[Problem]:
    """`field` (volumeMounts) subPath and subPathExpr values Kubernetes refuses: not relative, stepping out
    with '..', or both given."""
    problems = []
    for i, mount in enumerate(mounts):
        where = f"{field}[{i}]"
        for name, path in (("subPath", mount.sub_path), ("subPathExpr", mount.sub_path_expr)):
            if path and (why := local_path_problem(path)) is not None:
                fix = "give a path within the volume, e.g. data/models (no leading '/', no '..')."
                problems.append(Problem(field=f"{where}.{name}", message=f"{why}.", fix=fix))
        if mount.sub_path and mount.sub_path_expr:
            problems.append(
                Problem(
                    field=f"{where}.subPathExpr",
                    message="subPath and subPathExpr are mutually exclusive.",
                    fix="keep one of them (subPathExpr expands $(VAR) from the container's env).",
                )
            )
    return problems
