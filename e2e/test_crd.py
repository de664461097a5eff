"""The generated CRD on a real kube-apiserver: it installs, accepts every example, and rejects
each manifest in examples/invalid/ with a message naming the field (its `# expect:` line)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from e2e.cluster.handle import Cluster
from kubemoe_operator.api.manifest import manifest_from_text, parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.api.resource import ModelDeployment
from kubemoe_operator.plan.planner import plan_manifest

REPO = Path(__file__).resolve().parents[1]
CRD_NAME = "modeldeployments.kubemoe.io"
EXAMPLES = sorted([*(REPO / "examples").glob("*.yaml"), *(REPO / "examples" / "engines").glob("*.yaml")])
INVALID = sorted((REPO / "examples" / "invalid").glob("*.yaml"))
PLANNED_INVALID = sorted((REPO / "examples" / "invalid" / "planned").glob("*.yaml"))
"""Manifests the API server admits (their rule needs the plan) and the planner refuses."""


def expected_field(path: Path) -> str:
    match = re.search(r"^# expect: (\S+)$", path.read_text(), re.MULTILINE)
    assert match, f"{path.name} needs a '# expect: FIELD' line"
    return match.group(1)


@pytest.fixture(scope="module")
def namespace(crd_installed: Cluster) -> Iterator[str]:
    name = f"crd-{uuid.uuid4().hex[:6]}"
    crd_installed.kubectl("create", "namespace", name)
    yield name
    crd_installed.kubectl("delete", "namespace", name, "--wait=false")


def test_crd_is_established_with_its_names(crd_installed: Cluster) -> None:
    crd = json.loads(crd_installed.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True"
    assert conditions["NamesAccepted"] == "True"
    assert crd["status"]["acceptedNames"]["shortNames"] == ["md"]
    assert crd["status"]["acceptedNames"]["categories"] == ["kubemoe"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_accepted(crd_installed: Cluster, namespace: str, path: Path) -> None:
    proc = crd_installed.kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", str(path), check=False
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_manifest_is_rejected_naming_the_field(
    crd_installed: Cluster, namespace: str, path: Path
) -> None:
    proc = crd_installed.kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", str(path), check=False
    )
    assert proc.returncode != 0, f"{path.name} was accepted:\n{proc.stdout}"
    assert expected_field(path) in proc.stderr, proc.stderr


@pytest.mark.parametrize("path", PLANNED_INVALID, ids=lambda p: p.stem)
def test_a_rule_that_needs_the_plan_is_admitted_then_refused_by_the_planner(
    crd_installed: Cluster, namespace: str, path: Path
) -> None:
    proc = crd_installed.kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", str(path), check=False
    )
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(ManifestError) as refused:
        plan_manifest(parse_manifest(yaml.safe_load(path.read_text())))
    assert any(p.field.startswith(expected_field(path)) for p in refused.value.problems), refused.value


def test_defaults_status_and_printer_columns(crd_installed: Cluster, namespace: str) -> None:
    """A stored object carries the schema's defaults, parses back into the pydantic model,
    takes a status through the subresource, and `kubectl get md` shows the printer columns."""
    cluster = crd_installed
    cluster.kubectl("apply", "--server-side", "-n", namespace, "-f", str(REPO / "examples" / "tiny-moe.yaml"))
    stored = json.loads(cluster.kubectl("get", "md", "tiny-moe", "-n", namespace, "-o", "json").stdout)
    assert stored["spec"]["engine"]["gpuMemoryUtilization"] == 0.9
    assert stored["spec"]["scheduling"] == {}
    md = ModelDeployment.model_validate(stored)
    layout = plan_manifest(md).layout

    status = {
        "status": {
            "observedGeneration": stored["metadata"]["generation"],
            "phase": "Ready",
            "layout": layout,
            "endpoint": f"http://tiny-moe.{namespace}.svc:8000/v1",
            "roles": {
                "prefill": {"replicas": 1, "ready": 1},
                "decode": {"replicas": 1, "ready": 1, "desired": 1},
            },
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "AllGroupsReady",
                    "message": "every group is ready",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                    "observedGeneration": stored["metadata"]["generation"],
                }
            ],
        }
    }
    cluster.kubectl(
        "patch",
        "md",
        "tiny-moe",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )
    table = cluster.kubectl("get", "md", "-n", namespace).stdout.splitlines()
    assert table[0].split() == [
        "NAME",
        "READY",
        "PHASE",
        "LAYOUT",
        "PREFILL",
        "DECODE",
        "WORKER",
        "ENDPOINT",
        "AGE",
    ]
    row = table[1].split()
    assert row[:4] == ["tiny-moe", "True", "Ready", layout.split()[0]]
    by_category = cluster.kubectl("get", "kubemoe", "-n", namespace, "-o", "name").stdout.split()
    assert by_category == ["modeldeployment.kubemoe.io/tiny-moe"]

    bad = {
        "status": {
            "conditions": [{"type": "Ready", "status": "Maybe", "reason": "x", "lastTransitionTime": "now"}]
        }
    }
    proc = cluster.kubectl(
        "patch",
        "md",
        "tiny-moe",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(bad),
        check=False,
    )
    assert proc.returncode != 0
    assert "status.conditions[0].status" in proc.stderr
    cluster.kubectl("delete", "md", "tiny-moe", "-n", namespace)


# Plain scalars that kubectl (sigs.k8s.io/yaml: go-yaml v2) and PyYAML's SafeLoader read differently;
# `kubemoe plan`/`up` read them as kubectl does (api/yaml_read.py).
KUBECTL_SCALARS = """\
  accelerator:
    type: cpu
    perPod: 1e0
    productLabel: n
  engine:
    kind: torch
    maxModelLen: 0o1000
"""


def _with_scalars(scalars: str) -> str:
    text = (REPO / "examples" / "tiny-moe.yaml").read_text()
    text = re.sub(r"^  engine:\n(?:    .*\n)+?(?=  accelerator:)", "", text, flags=re.MULTILINE)
    return re.sub(r"^  accelerator:\n(?:    .*\n)+", scalars, text, flags=re.MULTILINE)


def test_kubemoe_reads_plain_scalars_as_kubectl_sends_them(
    crd_installed: Cluster, namespace: str, tmp_path: Path
) -> None:
    """1e0 is the number 1, `n` is false and 0o1000 is 512 to kubectl (PyYAML reads all three as text):
    the API server admits the manifest with those values, and kubemoe's own reading agrees."""
    path = tmp_path / "scalars.yaml"
    path.write_text(_with_scalars(KUBECTL_SCALARS))
    proc = crd_installed.kubectl(
        "create",
        "--dry-run=server",
        "--validate=strict",
        "-n",
        namespace,
        "-o",
        "json",
        "-f",
        str(path),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)["spec"]
    assert (spec["accelerator"]["perPod"], spec["accelerator"]["productLabel"]) == (1, False)
    assert spec["engine"]["maxModelLen"] == 512
    md = manifest_from_text(path.read_text(), source=str(path))
    assert (md.spec.accelerator.per_pod, md.spec.accelerator.product_label) == (1, False)
    assert md.spec.engine.max_model_len == 512


def test_a_plain_y_where_text_belongs_is_refused_by_both(
    crd_installed: Cluster, namespace: str, tmp_path: Path
) -> None:
    """`type: y` is the bool true to kubectl: the API server refuses it as no string, and so does kubemoe,
    naming the field and saying to quote it."""
    path = tmp_path / "y.yaml"
    path.write_text(_with_scalars(KUBECTL_SCALARS.replace("type: cpu", "type: y")))
    proc = crd_installed.kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", str(path), check=False
    )
    assert proc.returncode != 0
    assert "spec.accelerator.type" in proc.stderr, proc.stderr
    with pytest.raises(ManifestError) as refused:
        manifest_from_text(path.read_text(), source=str(path))
    problem = refused.value.problems[0]
    assert problem.field == "spec.accelerator.type"
    assert problem.fix.startswith("quote it")
