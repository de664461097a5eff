"""A manifest parsed locally (`kubemoe plan`, `kubemoe up`) takes the types the API server's structural
schema takes: no string for an integer, number or boolean (pydantic's lax mode read "3" as 3), while
enum strings, whole numbers for number fields and whole floats for integer fields (kubectl sends 3.0
as 3) are accepted, and quantities stay an integer or a string."""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemoe_operator.api.manifest import as_sent, load_manifest, manifest_from_text, parse_manifest
from kubemoe_operator.api.problems import ManifestError
from tests.operator.helpers import BASE, REPO


def _with(path: str, value: Any) -> dict[str, Any]:
    """BASE with the value at a dotted path (intermediate mappings created)."""
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


WRONG = [
    ("spec.roles.prefill.replicas", "3", "without quotes"),
    ("spec.roles.prefill.replicas", 3.5, "whole number"),
    ("spec.engine.maxModelLen", "8192", "without quotes"),
    ("spec.router.replicas", "1", "without quotes"),
    ("spec.engine.gpuMemoryUtilization", "0.9", "without quotes"),
    ("spec.accelerator.productLabel", "false", "without quotes"),
    ("spec.accelerator.productLabel", "maybe", "true or false"),
    ("spec.roles.prefill.replicas", "two", "whole number"),
    ("spec.accelerator.productLabel", 1, "true or false"),
    ("spec.accelerator.perPod", True, "whole number"),
    ("spec.scheduling.tolerations", [{"operator": "Exists", "tolerationSeconds": "30"}], "without quotes"),
]


@pytest.mark.parametrize(("path", "value", "fix"), WRONG, ids=str)
def test_a_wrong_type_is_refused_naming_the_field(path: str, value: Any, fix: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_manifest(_with(path, value))
    fields = {p.field: p for p in err.value.problems}
    where = path if not path.endswith("tolerations") else f"{path}[0].tolerationSeconds"
    assert where in fields, fields
    assert fix in fields[where].fix


def test_a_quoted_number_in_yaml_is_refused() -> None:
    text = yaml.safe_dump(BASE).replace("perPod: 8", "perPod: '8'")
    with pytest.raises(ManifestError) as err:
        manifest_from_text(text, source="m.yaml")
    (problem,) = err.value.problems
    assert str(problem) == (
        'spec.accelerator.perPod: Input should be a valid integer, not the string "8". Fix: write it '
        "without quotes (the API server refuses a string here)."
    )


def test_a_number_where_text_goes_is_told_to_quote_it() -> None:
    with pytest.raises(ManifestError) as err:
        parse_manifest(_with("spec.pod.labels", {"version": 1.5, "canary": True}))
    fixes = {p.field: p.fix for p in err.value.problems}
    quote = "quote it: YAML reads an unquoted number, true or false as such, not as text."
    assert fixes == {"spec.pod.labels.version": quote, "spec.pod.labels.canary": quote}


ACCEPTED = [
    ("spec.roles.prefill.replicas", 3.0, 3),  # kubectl sends 3
    ("spec.engine.gpuMemoryUtilization", 1, 1.0),
    ("spec.serving.mode", "disaggregated", "disaggregated"),
]


@pytest.mark.parametrize(("path", "value", "parsed"), ACCEPTED, ids=str)
def test_what_the_api_server_takes_is_taken(path: str, value: Any, parsed: Any) -> None:
    md = parse_manifest(_with(path, value))
    node: Any = md.model_dump(by_alias=True)
    for part in path.split("."):
        node = node[part]
    assert node == parsed
    assert type(node) is type(parsed)


@pytest.mark.parametrize("quantity", [4, "4", "500m", 4.0])
def test_a_quantity_is_an_integer_or_a_string(quantity: Any) -> None:
    md = parse_manifest(_with("spec.roles.prefill.resources", {"requests": {"cpu": quantity}}))
    resources = md.spec.roles.prefill.resources if md.spec.roles.prefill else None
    assert resources is not None
    assert resources.requests["cpu"] == quantity


def test_a_fractional_number_is_no_quantity() -> None:
    with pytest.raises(ManifestError) as err:  # x-kubernetes-int-or-string: neither an integer nor text
        parse_manifest(_with("spec.roles.prefill.resources", {"requests": {"cpu": 0.5}}))
    assert {p.field for p in err.value.problems} == {"spec.roles.prefill.resources.requests.cpu"}


def test_yaml_values_json_lacks_are_sent_as_text() -> None:
    sent = as_sent({"a": datetime.date(2026, 1, 2), 1: [2.0, 2.5, None, True], False: {"x": 1.0}})
    assert sent == {"a": "2026-01-02", "1": [2, 2.5, None, True], "false": {"x": 1}}
    md = parse_manifest(_with("spec.pod.annotations", {"built": datetime.date(2026, 1, 2)}))
    assert md.spec.pod.annotations == {"built": "2026-01-02"}


MANIFESTS = sorted(
    p for p in (REPO / "examples").rglob("*.yaml") if "invalid" not in p.parts and p.name != "hpa.yaml"
)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(REPO / "examples")))
def test_every_example_parses_strictly(path: Path) -> None:
    assert load_manifest(path).kind == "ModelDeployment"


@pytest.mark.parametrize("depth", [300, 5000])
def test_a_manifest_nested_too_deeply_is_refused_as_such(depth: int) -> None:
    nested: Any = 1
    for _ in range(depth):
        nested = [nested]
    with pytest.raises(ManifestError) as err:
        parse_manifest(_with("spec.roles.decode.pod", {"affinity": {"podAffinity": {"x": nested}}}))
    assert [str(p) for p in err.value.problems] == [
        "(root): nests mappings or lists more than 200 levels deep. Fix: nest less; a ModelDeployment "
        "needs about 15 levels."
    ]


def test_text_utf8_cannot_hold_is_refused() -> None:
    with pytest.raises(ManifestError) as err:
        parse_manifest(_with("spec.pod.annotations", {"a": "x\ud800y"}))
    (problem,) = err.value.problems
    assert problem.field == "(root)"
    assert "as JSON" in problem.message
    assert "line 1" not in problem.message
