"""examples/invalid/planned/: manifests the API server admits (their rule needs the plan) and the
planner refuses, naming the field of the `# expect:` line and a fix: the operator's Planned=False."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.api.test_invalid_corpus import expected_field
from tests.operator.helpers import REPO

PLANNED = sorted((REPO / "examples" / "invalid" / "planned").glob("*.yaml"))


def test_there_are_planner_cases() -> None:
    assert PLANNED


@pytest.mark.parametrize("path", PLANNED, ids=lambda p: p.stem)
def test_admitted_then_refused_by_the_planner_naming_the_field_and_fix(path: Path) -> None:
    md = load_manifest(path)  # the schema and the CEL twins admit it
    with pytest.raises(ManifestError) as err:
        plan_manifest(md)
    matching = [p for p in err.value.problems if p.field.startswith(expected_field(path))]
    assert matching, [p.field for p in err.value.problems]
    assert all(p.fix for p in matching)
