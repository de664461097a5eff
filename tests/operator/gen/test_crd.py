"""The committed CRD is exactly `kubemoe crd`, and it is a structural schema."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import yaml

from kubemoe_operator.api.patterns import QUANTITY_PATTERN
from kubemoe_operator.gen.crd import crd, crd_yaml
from tests.operator.helpers import REPO

CRD_PATH = REPO / "crds" / "kubemoe.io_modeldeployments.yaml"
CHART_CRD_PATH = REPO / "charts" / "kubemoe" / "crds" / "kubemoe.io_modeldeployments.yaml"
REGENERATE = "run `make crds` (or `.venv/bin/kubemoe crd > crds/kubemoe.io_modeldeployments.yaml`)"


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_committed_crd_has_not_drifted() -> None:
    assert CRD_PATH.read_text() == crd_yaml(), REGENERATE


def test_chart_copy_has_not_drifted() -> None:
    assert CHART_CRD_PATH.read_text() == crd_yaml(), REGENERATE


def test_yaml_round_trips_without_anchors() -> None:
    text = crd_yaml()
    assert yaml.safe_load(text) == crd()
    assert "&id" not in text


def test_schema_is_structural() -> None:
    for path, node in _nodes(_schema()):
        assert not {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const"} & node.keys(), path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        assert node.get("additionalProperties") is not False, path
        if "properties" in node:
            assert node["type"] == "object", path
            assert set(node.get("required", [])) <= set(node["properties"]), path


def test_names_columns_and_subresources() -> None:
    spec = crd()["spec"]
    assert spec["names"]["shortNames"] == ["md"]
    assert spec["names"]["categories"] == ["kubemoe"]
    version = spec["versions"][0]
    assert version["subresources"] == {"status": {}}
    names = [c["name"].upper() for c in version["additionalPrinterColumns"]]
    assert names == ["READY", "PHASE", "LAYOUT", "PREFILL", "DECODE", "WORKER", "ENDPOINT", "AGE"]


def test_conditions_are_a_list_map_keyed_by_type() -> None:
    conditions = _schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]


def test_cel_rules_are_present() -> None:
    rules = {
        path: [v["rule"] for v in node["x-kubernetes-validations"]]
        for path, node in _nodes(_schema())
        if "x-kubernetes-validations" in node
    }
    from kubemoe_operator.api.engines import cel_rules  # the admission table's (issue #18)

    pod_templates = 1 + 3  # the SGLang router's ServiceAccount; each role's nodeSelector (issue #20)
    assert len(rules[".spec"]) == 3 + pod_templates + len(cel_rules())
    assert any("self.router.pod.serviceAccountName" in r for r in rules[".spec"])
    for path in (".spec.roles.prefill.pod", ".spec.roles.worker.pod", ".spec.router.pod"):
        assert any("KUBEMOE_" in r for r in rules[path]), path
        assert any("/dev/shm" in r for r in rules[path]), path
    assert any("nvidia.com/gpu" in r for r in rules[".spec.roles.decode.resources"])
    assert any("self.engine.kind != 'tgi'" in r for r in rules[".spec"])
    assert any("minReplicas <= self.maxReplicas" in r for r in rules[".spec.roles.decode.autoscaling"])
    assert any("self.expert" in r for r in rules[".spec.roles.prefill.parallelism"])
    assert ".spec.engine" in rules
    assert ".spec.scheduling.tolerations[]" in rules


def test_nullable_optionals_become_plain_types_and_defaults_survive() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    assert spec["engine"]["default"] == {}
    assert spec["engine"]["properties"]["gpuMemoryUtilization"]["default"] == 0.9
    assert spec["engine"]["properties"]["maxModelLen"] == {
        "description": spec["engine"]["properties"]["maxModelLen"]["description"],
        "minimum": 1,
        "type": "integer",
    }
    assert spec["engine"]["properties"]["gpuMemoryUtilization"]["exclusiveMinimum"] is True
    requests = spec["roles"]["properties"]["decode"]["properties"]["resources"]["properties"]["requests"]
    assert requests["additionalProperties"] == {
        "x-kubernetes-int-or-string": True,
        "pattern": QUANTITY_PATTERN,
    }
