"""Hypothesis strategies for whatever a CRD's OpenAPI schema accepts: every field optional or
present, numbers over their whole allowed range (boundaries first, as hypothesis does), strings
matching their patterns and lengths. CEL rules are not applied, so this is a superset of what the
API server admits. (hypothesis-jsonschema would do this, but its 0.23 relies on a hypothesis
internal that 6.170 no longer has.)"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from kubemoe_operator.gen.crd import crd

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


# --- hostile specs: the examples, mutated within the schema (tests and bench/bench_hostile_specs.py) ---

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ("tiny-moe", "deepseek-v3", "mixtral-8x7b", "qwen3-235b")
"""The examples the hostile specs start from."""


@cache
def spec_schema() -> dict[str, Any]:
    schema: dict[str, Any] = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema["properties"]["spec"]  # type: ignore[no-any-return]


def spec_leaves(
    schema: dict[str, Any], path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every settable field of the spec (each role name for the roles map)."""
    if schema.get("type") == "object" and schema.get("properties"):
        return [leaf for k, v in schema["properties"].items() for leaf in spec_leaves(v, (*path, k))]
    if path and path[-1] == "roles":
        return [
            leaf
            for r in ("prefill", "decode", "worker")
            for leaf in spec_leaves(schema["additionalProperties"], (*path, r))
        ]
    return [(path, schema)]


def base_spec(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())["spec"]
    return spec


@st.composite
def hostile_specs(draw: st.DrawFn) -> dict[str, Any]:
    """An example's spec with up to four fields replaced by any value their schema allows."""
    spec = copy.deepcopy(base_spec(draw(st.sampled_from(EXAMPLES))))
    leaves = spec_leaves(spec_schema())
    for _ in range(draw(st.integers(1, 4))):
        path, schema = draw(st.sampled_from(leaves))
        node = spec
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = draw(from_crd_schema(schema))
    return spec
