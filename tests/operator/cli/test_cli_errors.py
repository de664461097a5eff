"""Every entry point (#20): `--version`; errors as one line, never a traceback (KUBEMOE_DEBUG=1 shows it);
a missing file is one line naming it (exit 2); output piped into `head` ends quietly."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from kubemoe_operator.cli import kubectl_moe, kubemoe
from kubemoe_operator.cli.errors import EXIT_PIPE
from kubemoe_operator.run.settings import parser as operator_parser
from tests.operator.helpers import REPO

VERSION = metadata.version("kubemoe-operator")
DEEPSEEK = REPO / "examples" / "deepseek-v3.yaml"


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


@pytest.mark.parametrize(("main", "prog"), [(kubemoe.main, "kubemoe"), (kubectl_moe.main, "kubectl moe")])
def test_version(main: object, prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])  # type: ignore[operator]
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"{prog} {VERSION}\n"


def test_operator_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        operator_parser().parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"kubemoe-operator {VERSION}\n"


@pytest.mark.parametrize("command", ["plan", "up"])
def test_a_missing_manifest_is_one_line_naming_it(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.yaml"
    assert kubemoe.main([command, str(missing)]) == 2
    assert capsys.readouterr().err == f"kubemoe {command}: {missing}: no such file\n"


def _plan_into_a_read_only_stdout(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`kubemoe plan` with stdout open read-only: writing the plan fails with EBADF, an OSError no
    command expects (a manifest that cannot be read or decoded is a problem naming the file, exit 2)."""
    out = tmp_path / "out.txt"
    out.touch()
    with out.open("rb") as read_only:
        return subprocess.run(
            _python("kubemoe_operator.cli.kubemoe", "plan", str(DEEPSEEK)),
            stdout=read_only,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, **env},
        )


def test_an_unexpected_error_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = _plan_into_a_read_only_stdout(tmp_path)
    assert result.returncode == 1
    assert result.stderr == "kubemoe: error: [Errno 9] Bad file descriptor\n"


def test_kubemoe_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = _plan_into_a_read_only_stdout(tmp_path, KUBEMOE_DEBUG="1")
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == "kubemoe: error: [Errno 9] Bad file descriptor"


def test_kubectl_moe_error_from_an_unreadable_answer_is_one_line(tmp_path: Path) -> None:
    """kubectl answering something that is not JSON (a proxy's error page, say): one line, exit 1."""
    kubectl = tmp_path / "kubectl"
    kubectl.write_text("#!/bin/sh\necho '<html>502 Bad Gateway</html>'\n")
    kubectl.chmod(0o755)
    result = subprocess.run(
        _python("kubemoe_operator.cli.kubectl_moe", "list"),
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("kubectl moe: error: Expecting value: line 1 column 1")
    assert result.stderr.count("\n") == 1


def test_plan_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    """`kubemoe plan FILE -o json | head -1` through a real pipe, made small (4 KiB) so that the plan
    (15 KiB) cannot fit in it: head reads the first line and exits while kubemoe is still writing, every
    time (with the default 64 KiB pipe it fails only when head wins a race)."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    head = subprocess.Popen(["head", "-1"], stdin=read_end, stdout=subprocess.PIPE, text=True)
    plan = subprocess.Popen(
        _python("kubemoe_operator.cli.kubemoe", "plan", str(DEEPSEEK), "-o", "json"),
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    os.close(read_end)
    os.close(write_end)
    first, _ = head.communicate(timeout=60)
    _, err = plan.communicate(timeout=60)
    assert first == "{\n"
    assert err == ""  # no BrokenPipeError traceback, no "Exception ignored" at exit
    assert plan.returncode == EXIT_PIPE


@pytest.mark.parametrize("argv", [["crd"], ["plan", str(DEEPSEEK)], ["completion", "bash"]])
def test_a_closed_pipe_is_quiet_for_every_output(argv: list[str]) -> None:
    """stdout a pipe whose reader has already gone: the first write fails; still no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    result = subprocess.run(
        _python("kubemoe_operator.cli.kubemoe", *argv),
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == EXIT_PIPE


def test_kubectl_moe_plan_piped_is_quiet() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    result = subprocess.run(
        _python("kubemoe_operator.cli.kubectl_moe", "plan", str(DEEPSEEK)),
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == EXIT_PIPE
