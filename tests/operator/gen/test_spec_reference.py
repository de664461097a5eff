"""docs/spec-reference.md is generated from the models and documents every spec field."""

from __future__ import annotations

from pathlib import Path

from kubemoe_operator.api.spec import ModelDeploymentSpec
from kubemoe_operator.gen.spec_reference import reference

DOC = Path(__file__).resolve().parents[3] / "docs" / "spec-reference.md"


def test_reference_matches_the_models() -> None:
    assert DOC.read_text() == reference(), "regenerate with `make crds`"


def test_every_top_level_spec_field_has_a_row() -> None:
    text = reference()
    for field in ModelDeploymentSpec.model_fields.values():
        assert f"| `{field.alias}` |" in text
    assert "### `spec.roles.prefill`" in text
    assert "### `status.conditions[]`" in text
