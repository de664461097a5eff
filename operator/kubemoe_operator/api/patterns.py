"""The forms Kubernetes gives names and values, as the spec's schema checks them (pattern, as
controller-gen writes them into CRDs), and the schema fragments the spec's models share."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

EMPTY_OBJECT_DEFAULT: dict[str, Any] = {"default": {}}

QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
"""resource.Quantity's form, as controller-gen writes it into CRDs (the API server checks it)."""
Quantity = Annotated[int | str, Field(json_schema_extra={"pattern": QUANTITY_PATTERN})]

ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Kubernetes checks a toleration's key, an envFrom prefix and a priorityClassName only when they are not
# empty ("" is "not set": `key: ""` with operator Exists tolerates every taint), so "" matches these.
QUALIFIED_NAME_PATTERN = (  # [DNS subdomain/]name, as a label or annotation key (lengths: pod_metadata.py)
    r"^(([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"
)
ENV_PREFIX_PATTERN = r"^([-._a-zA-Z][-._a-zA-Z0-9]*)?$"
OPTIONAL_DNS_SUBDOMAIN_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)?$"
LABEL_VALUE_PATTERN = r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$"


def cel_list(values: tuple[str, ...]) -> str:
    """A CEL list literal of strings."""
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def cel_prefixes(var: str, prefixes: tuple[str, ...]) -> str:
    """CEL: `var` starts with none of `prefixes`."""
    return " && ".join(f"!{var}.startsWith('{p}')" for p in prefixes)


def list_map(*keys: str) -> dict[str, Any]:
    """A list the API server merges by `keys` (server-side apply; duplicates refused)."""
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": list(keys)}
