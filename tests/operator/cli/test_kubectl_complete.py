"""`kubectl moe <Tab>` (#20): kubectl runs `kubectl_complete-moe WORD... CUR` from PATH and reads one
candidate a line and a last `:DIRECTIVE` line (kubectl's pkg/cmd/plugin/plugin_completion.go). The
answers match what the bash script offers for the same line, and a real kubectl reads them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from kubemoe_operator.cli import kubectl_moe
from kubemoe_operator.cli.completion import (
    DIRECTIVE_DEFAULT,
    DIRECTIVE_ERROR,
    DIRECTIVE_NO_FILE_COMP,
    complete,
    kubectl_complete_moe,
)
from tests.operator.cli.test_completion import complete as bash_offers

BIN = Path(sys.executable).parent
EXE = BIN / "kubectl_complete-moe"


def _answer(args: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert kubectl_complete_moe(args) == 0
    return capsys.readouterr().out.splitlines()


def _fake_kubectl(tmp_path: Path) -> dict[str, str]:
    """A stand-in kubectl first on PATH that logs its argv and lists two ModelDeployments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "kubectl.log"}\necho "tiny-moe ds-v3"\n')
    kubectl.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_the_console_script_is_declared() -> None:
    (entry,) = [e for e in metadata.entry_points(group="console_scripts") if e.name == "kubectl_complete-moe"]
    assert entry.value == "kubemoe_operator.cli.completion:kubectl_complete_moe"


@pytest.mark.parametrize(
    ("args", "lines"),
    [
        ([""], ["list", "status", "logs", "experts", "plan", "completion", ":4"]),
        (["l"], ["list", "logs", ":4"]),
        (["__complete", "l"], ["list", "logs", ":4"]),  # cobra's request name, as cobra plugins pass it
        (["status", "x", "-o", ""], ["table", "json", "yaml", ":4"]),
        (["status", "x", "--output=y"], ["--output=yaml", ":4"]),
        (["logs", "x", "--role", "d"], ["decode", ":4"]),
        (["list", "--all"], ["--all-namespaces", ":4"]),
        (["plan", ""], [":0"]),  # a file: the shell completes file names
        (["list", "--kubeconfig", ""], [":0"]),
        (["logs", "x", "--tail", ""], [":4"]),  # a free value: nothing, and no file names
        (["no-such-command", ""], [":4"]),
    ],
)
def test_the_protocol_answer(args: list[str], lines: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _answer(args, capsys) == lines


@pytest.mark.parametrize(
    "line",
    [
        "kubectl-moe ",
        "kubectl-moe l",
        "kubectl-moe list -",
        "kubectl-moe status x -o ",
        "kubectl-moe logs ds --role ",
        "kubectl-moe logs ds -",
        "kubectl-moe experts x --",
        "kubectl-moe completion ",
    ],
)
def test_the_same_candidates_as_the_bash_script(line: str, tmp_path: Path) -> None:
    words = line.split()[1:] + ([""] if line.endswith(" ") else [])
    found, directive = complete(
        kubectl_moe.parser(), words, command="kubectl-moe", hooks=kubectl_moe.COMPLETION_HOOKS
    )
    assert directive == DIRECTIVE_NO_FILE_COMP
    assert found, line
    assert sorted(found) == bash_offers(tmp_path, "kubectl-moe", line)


def test_deployment_names_from_the_cluster_in_the_namespace_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", _fake_kubectl(tmp_path)["PATH"])
    assert _answer(["logs", "-n", "prod", "t"], capsys) == ["tiny-moe", ":4"]
    assert "get modeldeployments.kubemoe.io --namespace prod" in (tmp_path / "kubectl.log").read_text()


def test_a_failure_offers_nothing_and_prints_no_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise RuntimeError("broken parser")

    monkeypatch.setattr(kubectl_moe, "parser", broken)
    monkeypatch.delenv("KUBEMOE_DEBUG", raising=False)
    assert kubectl_complete_moe(["l"]) == 0
    out = capsys.readouterr()
    assert (out.out, out.err) == (f":{DIRECTIVE_ERROR}\n", "")


def test_the_installed_executable_answers(tmp_path: Path) -> None:
    if not EXE.is_file():
        pytest.skip("kubectl_complete-moe is not installed next to this interpreter")
    done = subprocess.run([EXE, "status", "x", "-o", "j"], capture_output=True, text=True, check=True)
    assert (done.stdout, done.stderr) == ("json\n:4\n", "")


def test_real_kubectl_completes_the_plugin(tmp_path: Path) -> None:
    """kubectl finds kubectl-moe and kubectl_complete-moe on PATH and relays the candidates."""
    kubectl = shutil.which("kubectl")
    if kubectl is None or not EXE.is_file() or not (BIN / "kubectl-moe").is_file():
        pytest.skip("needs kubectl on PATH and kubectl-moe, kubectl_complete-moe installed")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path)}
    done = subprocess.run(
        [kubectl, "__complete", "moe", "status", "x", "-o", ""], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["table", "json", "yaml", f":{DIRECTIVE_NO_FILE_COMP}"]
    done = subprocess.run([kubectl, "__complete", "moe", "plan", ""], capture_output=True, text=True, env=env)
    assert done.stdout.splitlines()[-1] == f":{DIRECTIVE_DEFAULT}"
