from __future__ import annotations

import json

import pytest
import yaml

from kubemoe_operator.cli.kubemoe import main
from kubemoe_operator.gen.crd import crd_yaml
from tests.operator.helpers import EXAMPLES, INVALID, REPO


def test_plan_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(REPO / "examples" / "deepseek-v3.yaml")]) == 0
    out = capsys.readouterr().out
    assert "layout P1x(EP16) D1x(EP16): 32 GPUs in 4 pods" in out
    assert "LeaderWorkerSet" in out
    assert "$(LWS_LEADER_ADDRESS)" in out


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_plan_machine_readable(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(EXAMPLES[0]), "-o", fmt]) == 0
    out = capsys.readouterr().out
    data = json.loads(out) if fmt == "json" else yaml.safe_load(out)
    assert data["apiVersion"] == "kubemoe.io/v1alpha1"
    assert data["kind"] == "Plan"
    assert {"layout", "devices", "pods", "roles", "router"} <= data.keys()


def test_plan_errors_exit_2_naming_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    path = next(p for p in INVALID if "expert-not-data-times-tensor" in p.name)
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.roles.decode.parallelism.expert" in err
    assert "fix:" in err


def test_plan_missing_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "/nonexistent.yaml"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crd"]) == 0
    assert capsys.readouterr().out == crd_yaml()
