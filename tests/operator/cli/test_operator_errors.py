"""`kubemoe-operator` (#20): what stops it from starting is one line on stderr and a non-zero exit, never
a traceback (KUBEMOE_DEBUG=1 adds it); a failure once it runs is logged with its traceback. Run as the
process it is (`python -m kubemoe_operator`), with no cluster behind it."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubemoe_operator import __main__ as operator_main
from kubemoe_operator.run.settings import OperatorSettings
from tests.operator.helpers import REPO


def _operator(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubemoe_operator", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )


@pytest.fixture
def no_cluster(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBEMOE_DEBUG"}
    return {**env, "KUBECONFIG": str(tmp_path / "missing-kubeconfig"), "HOME": str(tmp_path)}


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ["--metrics-port", "99999"],
            "argument --metrics-port: '99999' is not a port number: give one in 1-65535 (0: off)",
        ),
        (
            ["--health-port", "http"],
            "argument --health-port: 'http' is not a port number: give one in 1-65535 (0: off)",
        ),
        (["--lease-seconds", "0"], "argument --lease-seconds: 0 seconds: give at least 1"),
        (["--resync-seconds", "-1"], "argument --resync-seconds: -1 seconds: give a number > 0"),
        (
            ["--autoscale-interval-seconds", "inf"],
            "argument --autoscale-interval-seconds: inf seconds: give a number >= 0",
        ),
        (
            ["--prometheus-url", "prometheus:9090"],
            "argument --prometheus-url: 'prometheus:9090': give an http:// or https:// URL",
        ),
        (["--pod-label", "novalue"], "--pod-label 'novalue': write KEY=VALUE"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_a_bad_flag_is_a_usage_error(args: list[str], error: str, no_cluster: dict[str, str]) -> None:
    done = _operator(*args, env=no_cluster)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == f"kubemoe-operator: error: {error}"
    assert done.stderr.startswith("usage: kubemoe-operator")
    assert "Traceback" not in done.stderr


def test_no_kubeconfig_is_one_line(no_cluster: dict[str, str]) -> None:
    done = _operator("--no-leader-election", env=no_cluster)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"kubemoe-operator: error: no usable Kubernetes configuration: Configuration file "
        f"{no_cluster['KUBECONFIG']} not found (set KUBECONFIG, or run in a pod with a ServiceAccount)"
    ]


def test_a_kubeconfig_that_is_not_one_is_one_line(no_cluster: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("clusters: [unclosed\n")
    done = _operator(env={**no_cluster, "KUBECONFIG": str(bad)})
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("kubemoe-operator: error: no usable Kubernetes configuration: ")


@pytest.mark.parametrize("flag", ["--metrics-port", "--health-port"])
def test_a_port_already_taken_is_one_line(flag: str, taken_port: int, no_cluster: dict[str, str]) -> None:
    done = _operator(flag, str(taken_port), env=no_cluster)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"kubemoe-operator: error: {flag} {taken_port}: Address already in use"
    ]


def test_kubemoe_debug_adds_the_traceback(no_cluster: dict[str, str]) -> None:
    done = _operator(env={**no_cluster, "KUBEMOE_DEBUG": "1"})
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "lightkube.core.exceptions.ConfigError" in done.stderr
    assert done.stderr.splitlines()[-1].startswith(
        "kubemoe-operator: error: no usable Kubernetes configuration"
    )


def test_a_failure_while_running_is_logged_with_its_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a start-up error: the log (kopf's format, the pod's log) keeps the traceback."""

    async def fails(settings: OperatorSettings) -> int:
        raise RuntimeError("the watch broke")

    monkeypatch.setattr(operator_main, "run", fails)
    with caplog.at_level(logging.CRITICAL, logger="kubemoe.operator"):
        assert operator_main.main(["--no-leader-election"]) == 1
    [record] = [r for r in caplog.records if r.name == "kubemoe.operator"]
    assert record.levelno == logging.CRITICAL
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "the watch broke"
