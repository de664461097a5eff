"""The base model every API type shares: camelCase on the wire, unknown fields are errors."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """A Kubernetes-style object: camelCase field names, unknown fields rejected, immutable."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )


def cel(rule: str, message: str, *, field_path: str | None = None) -> dict[str, Any]:
    """One `x-kubernetes-validations` entry: a CEL rule the apiserver enforces."""
    entry: dict[str, Any] = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    return entry


def validations(*rules: dict[str, Any]) -> dict[str, Any]:
    """`json_schema_extra` carrying CEL rules onto a model's generated schema."""
    return {"x-kubernetes-validations": list(rules)}
