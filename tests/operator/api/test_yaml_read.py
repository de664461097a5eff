"""Manifests read as kubectl reads them (api/yaml_read.py): the plain scalars where go-yaml v2, under
kubectl, and PyYAML's SafeLoader disagree. e2e/test_crd.py checks the same readings against what the
real API server gets from kubectl."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from kubemoe_operator.api import yaml_read
from kubemoe_operator.api.manifest import manifest_from_text
from kubemoe_operator.api.problems import ManifestError

TINY = Path(__file__).resolve().parents[3] / "examples" / "tiny-moe.yaml"


@pytest.mark.parametrize(
    ("text", "kubectl", "pyyaml"),
    [
        ("1e1", 10.0, "1e1"),
        ("9e-1", 0.9, "9e-1"),
        ("-2E+2", -200.0, "-2E+2"),
        ("y", True, "y"),
        ("N", False, "N"),
        ("0o17", 15, "0o17"),
        ("1:30", "1:30", 90),
        ("1_0.5", "1_0.5", 10.5),
    ],
)
def test_where_the_readings_differ_kubectls_is_taken(text: str, kubectl: object, pyyaml: object) -> None:
    assert yaml.safe_load(f"v: {text}")["v"] == pyyaml  # the difference this module is for
    got = yaml_read.load(f"v: {text}")["v"]
    assert got == kubectl
    assert type(got) is type(kubectl)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3),
        ("-5", -5),
        ("017", 15),  # Go's leading-zero octal, as YAML 1.1's
        ("0x1F", 31),
        ("0b101", 5),
        ("1_000", 1000),
        ("3.0", 3.0),
        (".5", 0.5),
        ("true", True),
        ("off", False),
        ("yes", True),
        ("~", None),
        ("null", None),
        ("abc", "abc"),
        ('"1e1"', "1e1"),  # quoted: text to both
        ("'y'", "y"),
    ],
)
def test_where_they_agree_nothing_changes(text: str, value: object) -> None:
    assert yaml_read.load(f"v: {text}")["v"] == value == yaml.safe_load(f"v: {text}")["v"]


def test_infinities_and_nan_read_as_floats() -> None:
    doc = yaml_read.load("a: .inf\nb: -.Inf\nc: .NaN")
    assert (doc["a"], doc["b"]) == (math.inf, -math.inf)
    assert math.isnan(doc["c"])


def test_every_document_of_a_stream_is_read() -> None:
    assert yaml_read.load_all("a: y\n---\nb: 1e2\n") == [{"a": True}, {"b": 100.0}]


def test_a_manifest_is_read_with_kubectls_numbers() -> None:
    """`replicas: 2e0` is the number 2 to kubectl, whose API server takes it for an integer field; kubemoe
    took it for text and refused it ("write it without quotes")."""
    text = TINY.read_text().replace("  router:\n    replicas: 1", "  router:\n    replicas: 2e0")
    assert "replicas: 2e0" in text
    assert manifest_from_text(text, source="tiny").spec.router.replicas == 2


def test_a_plain_y_for_a_name_is_refused_saying_to_quote_it() -> None:
    text = TINY.read_text().replace("    name: tiny-qwen3-moe", "    name: y")
    with pytest.raises(ManifestError) as refused:
        manifest_from_text(text, source="tiny")
    (problem,) = refused.value.problems
    assert problem.field == "spec.model.name"
    assert problem.fix.startswith("quote it")
