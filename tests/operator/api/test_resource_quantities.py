"""A role's or the router's resources given as YAML integers get the checks strings get: no sign, at most
what the API server stores, and an error naming the field (an int of 10**400 once crashed the parse with
"int too large to convert to float"; `cpu: -4` planned, and the apiserver refused the Deployment later,
half-applied). The CRD's twin of the sign check is a CEL rule on requests and limits."""

from __future__ import annotations

from typing import Any

import pytest

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.api.quantity import MAX_QUANTITY, milli_units, parse_quantity
from kubemoe_operator.gen.crd import crd
from tests.operator.crd_strategy import base_spec

MANIFEST = {"apiVersion": "kubemoe.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "h"}}


def _refused(spec: dict[str, Any]) -> str:
    with pytest.raises(ManifestError) as err:
        parse_manifest({**MANIFEST, "spec": spec})
    return str(err.value)


@pytest.mark.parametrize(
    ("kind", "name", "value", "says"),
    [
        ("requests", "cpu", -4, "-4 is negative"),
        ("limits", "memory", -1, "-1 is negative"),
        ("requests", "memory", "-1Gi", "is negative"),
        ("requests", "cpu", 10**400, "401 digits is larger than any Kubernetes quantity"),
        ("limits", "cpu", MAX_QUANTITY + 1, "larger than any Kubernetes quantity"),
    ],
)
def test_a_bad_quantity_is_refused_naming_the_role_and_resource(
    kind: str, name: str, value: int | str, says: str
) -> None:
    spec = base_spec("tiny-moe")
    spec["roles"]["decode"]["resources"][kind] = {name: value}
    message = _refused(spec)
    assert f"spec.roles.decode.resources.{kind}: {name}: " in message
    assert says in message


def test_the_routers_resources_are_checked_alike() -> None:
    spec = base_spec("tiny-moe")
    spec["router"]["resources"] = {"requests": {"cpu": -2}}
    assert "spec.router.resources.requests: cpu: -2 is negative" in _refused(spec)


@pytest.mark.parametrize("value", [0, 4, MAX_QUANTITY, "0", "500m", "2Gi"])
def test_zero_and_positive_quantities_still_parse(value: int | str) -> None:
    assert parse_quantity(value) >= 0
    assert milli_units(value) >= 0
    spec = base_spec("tiny-moe")
    spec["roles"]["decode"]["resources"]["limits"] = {"cpu": value}
    spec["roles"]["decode"]["resources"]["requests"] = {"cpu": 0}
    parse_manifest({**MANIFEST, "spec": spec})


@pytest.mark.parametrize("value", [-1, -(10**400), 10**400, 2**63, "-0.5", "-1Ki"])
def test_parse_quantity_raises_value_error_only(value: int | str) -> None:
    with pytest.raises(ValueError, match=r"negative|larger than"):
        parse_quantity(value)
    with pytest.raises(ValueError, match=r"negative|larger than"):
        milli_units(value)


def _resources_schema() -> dict[str, Any]:
    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    schema: dict[str, Any] = spec["roles"]["properties"]["decode"]["properties"]["resources"]
    return schema


@pytest.mark.parametrize("field", ["requests", "limits"])
def test_the_crd_refuses_a_negative_int_or_string_quantity(field: str) -> None:
    schema = _resources_schema()
    assert schema["properties"][field]["additionalProperties"]["x-kubernetes-int-or-string"] is True
    (rule,) = [
        r for r in schema["x-kubernetes-validations"] if r["fieldPath"] == f".{field}" and ">= 0" in r["rule"]
    ]
    value = f"self.{field}[k]"
    assert rule["rule"] == (
        f"!has(self.{field}) || self.{field}.all(k, "
        f"type({value}) == int ? {value} >= 0 : !{value}.startsWith('-'))"
    )
    assert rule["fieldPath"] == f".{field}"
    assert "at least 0" in rule["message"]
