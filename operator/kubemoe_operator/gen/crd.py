"""The CustomResourceDefinition, generated from the pydantic models (`kubemoe crd`).

Pydantic's JSON Schema becomes a structural OpenAPI v3 schema: `$defs` are inlined, titles
dropped, `X | None` becomes plain X (the apiserver prunes nulls of non-nullable fields, which
matches None meaning "absent"), `int | str` becomes `x-kubernetes-int-or-string`,
`additionalProperties: false` is dropped (the apiserver rejects unknown fields under strict
field validation and prunes them otherwise), `additionalProperties: true` (a model with extra="allow")
only beside `x-kubernetes-preserve-unknown-fields`, and JSON Schema 2020's numeric
`exclusiveMinimum` becomes OpenAPI's boolean form. Anything else unexpected is an error, so a
new pydantic construct cannot slip through unconverted.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from kubemoe_operator.api.resource import (
    CATEGORIES,
    GROUP,
    KIND,
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
)
from kubemoe_operator.api.spec import ModelDeploymentSpec
from kubemoe_operator.api.status import ModelDeploymentStatus

_KEPT = frozenset(
    {
        "type",
        "format",
        "description",
        "properties",
        "required",
        "items",
        "additionalProperties",
        "enum",
        "default",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "pattern",
        "minItems",
        "maxItems",
        "maxProperties",
        "nullable",
    }
)

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Layout", "type": "string", "jsonPath": ".status.layout"},
    {
        "name": "Prefill",
        "type": "integer",
        "jsonPath": ".status.roles.prefill.ready",
        "description": "Ready prefill groups",
    },
    {
        "name": "Decode",
        "type": "integer",
        "jsonPath": ".status.roles.decode.ready",
        "description": "Ready decode groups",
    },
    {
        "name": "Worker",
        "type": "integer",
        "jsonPath": ".status.roles.worker.ready",
        "description": "Ready worker groups (serving.mode colocated)",
    },
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        return {**target, **siblings}
    return node


def to_structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """One pydantic JSON Schema node -> a structural OpenAPI v3 node."""
    node = _resolve(node, defs)
    if "anyOf" in node:
        branches = [_resolve(b, defs) for b in node["anyOf"]]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        non_null = [b for b in branches if b.get("type") != "null"]
        if len(non_null) == 1:
            node = {**non_null[0], **rest}
        elif sorted(b.get("type", "") for b in non_null) == ["integer", "string"]:
            node = {**rest, "x-kubernetes-int-or-string": True}
        else:
            raise ValueError(f"cannot express anyOf {node['anyOf']} in a structural schema")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs") or (key == "default" and value is None):
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key == "additionalProperties" and value is True:
            if not node.get("x-kubernetes-preserve-unknown-fields"):
                raise ValueError("an open object (extra='allow') needs x-kubernetes-preserve-unknown-fields")
            continue  # kept as written: the apiserver keeps the unknown fields
        if key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum" and not isinstance(value, bool):
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum" and not isinstance(value, bool):
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "properties":
            out[key] = {name: to_structural(prop, defs) for name, prop in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = to_structural(value, defs)
        elif key.startswith("x-kubernetes-") or key in _KEPT:
            out[key] = copy.deepcopy(value)  # shared $defs must not become YAML anchors
        else:
            raise ValueError(f"unexpected JSON Schema keyword {key!r}")
    return out


def _schema(model: type[ModelDeploymentSpec] | type[ModelDeploymentStatus]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return to_structural(raw, raw.get("$defs", {}))


NAME_RULES = [
    {
        "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
        "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters: the operator adds "
        "role suffixes (e.g. -prefill-12) and Kubernetes limits those names",
    },
    {
        "rule": f"self.metadata.name.matches('{NAME_PATTERN}')",
        "message": "metadata.name must be lower-case letters, digits and '-', start with a letter and end "
        "with a letter or digit: it names Services",
    },
]


def crd() -> dict[str, Any]:
    """The ModelDeployment CRD as a dict."""
    status = _schema(ModelDeploymentStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A Mixture-of-Experts model served with expert parallelism, "
                            "optionally disaggregated into prefill and decode.",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": _schema(ModelDeploymentSpec),
                                "status": status,
                            },
                            "required": ["spec"],
                            "x-kubernetes-validations": NAME_RULES,
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `kubemoe crd` from kubemoe_operator.api; do not edit by hand.\n"
    return header + yaml.dump(crd(), Dumper=_NoAliasDumper, sort_keys=False, width=120)


class _NoAliasDumper(yaml.SafeDumper):
    """Writes repeated objects out in full: no &anchors or *aliases in a CRD."""

    def ignore_aliases(self, data: Any) -> bool:
        return True
