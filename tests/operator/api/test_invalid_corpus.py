"""The invalid-manifest corpus (examples/invalid) is rejected by the Python rules too, on the same field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.api.problems import ManifestError
from tests.operator.helpers import INVALID


def expected_field(path: Path) -> str:
    match = re.search(r"^# expect: (\S+)$", path.read_text(), re.MULTILINE)
    assert match, f"{path.name} needs a '# expect: FIELD' line"
    return match.group(1)


def test_corpus_is_large_enough() -> None:
    assert len(INVALID) >= 20


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_rejected_naming_the_field(path: Path) -> None:
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    fields = [p.field for p in err.value.problems]
    assert any(f.startswith(expected_field(path)) for f in fields), fields
