from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.api.problems import ManifestError
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


def test_plan_of_a_file_that_is_not_utf8_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"metadata:\n  name: caf\xe9\n")
    assert main(["plan", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: is not UTF-8 text (byte 0xe9 at offset 21)." in err
    assert "fix: give a YAML manifest saved as UTF-8." in err


def test_plan_of_a_file_with_two_model_deployments_refuses_naming_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Planning (or running, `kubemoe up`) only the first would drop the second without a word."""
    md = yaml.safe_load((REPO / "examples" / "tiny-moe.yaml").read_text())
    second = {**md, "metadata": {**md["metadata"], "name": "second"}}
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump_all([config, md, second]))
    assert main(["plan", str(both)]) == 2
    err = capsys.readouterr().err
    assert f"{both} holds 2 ModelDeployments ({md['metadata']['name']}, second)" in err
    assert "a file of its own" in err
    odd = tmp_path / "odd.yaml"  # metadata that is no mapping: still the same refusal, not a crash
    odd.write_text(yaml.safe_dump_all([{**md, "metadata": "a"}, {**md, "metadata": ["b"]}]))
    assert main(["plan", str(odd)]) == 2
    assert f"{odd} holds 2 ModelDeployments (?, ?)" in capsys.readouterr().err
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump_all([config, md]))  # other kinds beside one ModelDeployment: fine
    assert main(["plan", str(one)]) == 0


def test_plan_of_a_directory_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == f"kubemoe plan: {tmp_path}: is a directory (give the manifest file in it)\n"
    )


def test_a_manifest_that_cannot_be_read_is_a_problem_naming_it(tmp_path: Path) -> None:
    """What `kubemoe up` reads through too: a directory or a missing file is a ManifestError naming it."""
    with pytest.raises(ManifestError) as err:
        load_manifest(tmp_path)
    assert [(p.field, p.message) for p in err.value.problems] == [(str(tmp_path), "is a directory.")]
    with pytest.raises(ManifestError) as err:
        load_manifest(tmp_path / "missing.yaml")
    assert err.value.problems[0].field == str(tmp_path / "missing.yaml")
    assert "No such file" in err.value.problems[0].message


def _plan_stdin(data: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "kubemoe_operator.cli.kubemoe", "plan", "-", "-o", "json"],
        input=data,
        capture_output=True,
        cwd=REPO,
        timeout=120,
    )


def test_plan_reads_the_manifest_from_stdin_for_a_dash() -> None:
    result = _plan_stdin((REPO / "examples" / "tiny-moe.yaml").read_bytes())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "tiny-moe"
    bad = _plan_stdin(b"\xff\xfe")
    assert bad.returncode == 2
    assert b"<stdin>: is not UTF-8 text" in bad.stderr


def test_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crd"]) == 0
    assert capsys.readouterr().out == crd_yaml()
