"""The chart's values.yaml and values.schema.json are generated from chart_values.py: no drift,
and the schema really rejects what it should (checked with the models, the schema's source)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kubemoe_operator.gen.chart_values import Values, values_schema, values_yaml

CHART = Path(__file__).resolve().parents[3] / "charts" / "kubemoe"
REGENERATE = "regenerate with `make crds`"


def test_values_yaml_matches_the_models() -> None:
    assert (CHART / "values.yaml").read_text() == values_yaml(), REGENERATE


def test_values_schema_matches_the_models() -> None:
    assert json.loads((CHART / "values.schema.json").read_text()) == values_schema(), REGENERATE


def test_chart_crds_are_the_generated_crds() -> None:
    generated = CHART.parents[1] / "crds" / "kubemoe.io_modeldeployments.yaml"
    assert (CHART / "crds" / generated.name).read_text() == generated.read_text(), REGENERATE


def test_values_yaml_parses_back_to_the_defaults() -> None:
    assert Values.model_validate(yaml.safe_load(values_yaml())) == Values()


def test_every_key_is_documented() -> None:
    lines = values_yaml().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped and i > 0:
            assert lines[i - 1].strip().startswith("#"), f"undocumented key: {line!r}"


def _closed(node: object) -> bool:
    if isinstance(node, dict):
        if (
            node.get("type") == "object"
            and "properties" in node
            and node.get("additionalProperties") in (None, True)  # False, or a schema for its values
        ):
            return False
        return all(_closed(v) for v in node.values())
    if isinstance(node, list):
        return all(_closed(v) for v in node)
    return True


def test_schema_rejects_unknown_keys_at_every_level() -> None:
    schema = values_schema()
    assert _closed(schema)
    assert "$ref" not in json.dumps(schema)
    with pytest.raises(ValidationError, match="imagee"):
        Values.model_validate({"imagee": {"tag": "x"}})


def test_chart_rbac_rules_are_generated_from_the_operator() -> None:
    from kubemoe_operator.gen.rbac import chart_rules_template

    assert (CHART / "templates" / "_rules.tpl").read_text() == chart_rules_template(), REGENERATE
