"""Hypothesis strategies for whatever a CRD's OpenAPI schema accepts: every field optional or
present, numbers over their whole allowed range (boundaries first, as hypothesis does), strings
matching their patterns and lengths. CEL rules are not applied, so this is a superset of what the
API server admits. (hypothesis-jsonschema would do this, but its 0.23 relies on a hypothesis
internal that 6.170 no longer has.)"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

# Unbounded integers in the schema are int64 in the API server.
INT64 = 2**63 - 1
MAX_ITEMS = 4


def from_crd_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    if schema.get("x-kubernetes-int-or-string"):
        return st.one_of(_integer({}), st.text(max_size=24), st.from_regex(r"\A[0-9.]+[a-zA-Z]{0,2}\Z"))
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        return _object(schema)
    if kind == "array":
        lo = schema.get("minItems", 0)
        hi = min(schema.get("maxItems", MAX_ITEMS), max(lo, MAX_ITEMS))
        return st.lists(from_crd_schema(schema.get("items", {})), min_size=lo, max_size=hi)
    if kind == "string":
        return _string(schema)
    if kind == "integer":
        return _integer(schema)
    if kind == "number":
        return st.floats(
            min_value=schema.get("minimum"),
            max_value=schema.get("maximum"),
            exclude_min=bool(schema.get("exclusiveMinimum")),
            exclude_max=bool(schema.get("exclusiveMaximum")),
            allow_nan=False,  # JSON has neither
            allow_infinity=False,
        )
    if kind == "boolean":
        return st.booleans()
    return st.none()


def _integer(schema: dict[str, Any]) -> st.SearchStrategy[int]:
    lo = schema.get("minimum", -INT64 - 1) + (1 if schema.get("exclusiveMinimum") else 0)
    hi = schema.get("maximum", INT64) - (1 if schema.get("exclusiveMaximum") else 0)
    return st.integers(lo, hi)


def _string(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    lo, hi = schema.get("minLength", 0), min(schema.get("maxLength", 64), 300)
    if "pattern" in schema:
        base = st.from_regex(schema["pattern"])
        return base.filter(lambda s: lo <= len(s) <= schema.get("maxLength", 1 << 30))
    return st.text(min_size=lo, max_size=hi)


def _object(schema: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    props: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    extra = schema.get("additionalProperties")
    if not props and isinstance(extra, dict):
        hi = min(schema.get("maxProperties", MAX_ITEMS), MAX_ITEMS)
        return st.dictionaries(st.text(min_size=1, max_size=16), from_crd_schema(extra), max_size=hi)
    fields = {k: from_crd_schema(v) for k, v in props.items()}
    return st.fixed_dictionaries(
        {k: s for k, s in fields.items() if k in required},
        optional={k: s for k, s in fields.items() if k not in required},
    )
