"""`kubectl moe list`, `logs` and `status -o yaml` (#20): the pure parts on fixed objects shaped like the
operator's children, and the commands through a stand-in kubectl that applies label selectors and
namespaces as kubectl does (kubectl_stub.py), so a wrong selector shows up as the wrong pods' lines."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemoe_operator.cli.kubectl_moe import main
from kubemoe_operator.cli.moe_logs import LogsError, group_indexes, select_log_pods
from kubemoe_operator.cli.moe_status import age, pod_ranks, render_list
from tests.operator.cli.kubectl_stub import calls, install

LWS_GROUP = "leaderworkerset.sigs.k8s.io/group-index"
LWS_WORKER = "leaderworkerset.sigs.k8s.io/worker-index"


def _pod(name: str, *, role: str, args: list[str], lws: tuple[int, int] | None = None) -> dict[str, Any]:
    labels = {"kubemoe.io/deployment": "ds", "kubemoe.io/role": role, "kubemoe.io/group": f"ds-{role}"}
    if lws is not None:
        labels |= {LWS_GROUP: str(lws[0]), LWS_WORKER: str(lws[1])}
    container = "router" if role == "router" else "engine"
    return {
        "metadata": {"name": name, "namespace": "prod", "labels": labels},
        "spec": {"containers": [{"name": container, "command": ["kubemoe-runtime"], "args": args}]},
        "status": {"phase": "Running", "containerStatuses": [{"ready": True}]},
    }


def _rank_args(start: str) -> list[str]:
    return [
        "serve",
        "--data-parallel-size",
        "16",
        "--data-parallel-size-local",
        "8",
        "--data-parallel-start-rank",
        start,
    ]


# decode: two LeaderWorkerSet groups of two pods (8 ranks each; workers' start rank is `auto`);
# prefill: single-pod groups (a Deployment, hashed names); one router.
DECODE = [
    _pod("ds-decode-0", role="decode", args=_rank_args("0"), lws=(0, 0)),
    _pod("ds-decode-0-1", role="decode", args=_rank_args("auto"), lws=(0, 1)),
    _pod("ds-decode-1", role="decode", args=_rank_args("0"), lws=(1, 0)),
    _pod("ds-decode-1-1", role="decode", args=_rank_args("auto"), lws=(1, 1)),
]
PREFILL = [
    _pod("ds-prefill-7f9c-zk2lq", role="prefill", args=["serve", "--data-parallel-size-local", "1"]),
    _pod("ds-prefill-7f9c-abx9d", role="prefill", args=["serve", "--data-parallel-size-local", "1"]),
]
ROUTER = [_pod("ds-router-55d-q8k2c", role="router", args=["router"])]


def _md(name: str, namespace: str, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": "2026-11-29T06:00:00Z"},
        "spec": {"model": {"name": "deepseek-ai/DeepSeek-V3"}},
        "status": status,
    }


MDS = [
    _md(
        "ds",
        "prod",
        phase="Running",
        layout="P2x(EP1) D2x(EP16)",
        endpoint="http://ds.prod.svc:8000/v1",
        roles={"decode": {"replicas": 2, "ready": 1, "desired": 2}, "prefill": {"replicas": 2, "ready": 2}},
        conditions=[{"type": "Ready", "status": "False", "reason": "GroupsNotReady"}],
    ),
    _md("tiny", "default"),
]
LOGS = {  # each pod's log: two lines that start with its name
    f"prod/{name}/{'router' if 'router' in name else 'engine'}": f"{name} line 1\n{name} line 2"
    for name in (p["metadata"]["name"] for p in [*DECODE, *PREFILL, *ROUTER])
}


@pytest.fixture
def kubectl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = install(
        tmp_path,
        {"objects": {"pods": [*DECODE, *PREFILL, *ROUTER], "modeldeployments.kubemoe.io": MDS}, "logs": LOGS},
    )
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return log


def _names(pods: list[Any]) -> list[str]:
    return [p["metadata"]["name"] for p in pods]


# --- pure -----------------------------------------------------------------------------------------


def test_a_leaderworkerset_workers_ranks_come_from_its_worker_index() -> None:
    # The operator renders `--data-parallel-start-rank auto` into every worker (one template per group).
    assert pod_ranks(_rank_args("auto"), {LWS_WORKER: "1"}) == "8-15"
    assert pod_ranks(_rank_args("auto"), {LWS_WORKER: "3"}) == "24-31"
    assert pod_ranks(_rank_args("auto"), {}) == "?"  # no index: cannot tell, and says so
    assert pod_ranks(_rank_args("8"), {LWS_WORKER: "5"}) == "8-15"  # a number is taken as written


def test_groups_are_the_lws_index_or_single_pods_in_name_order() -> None:
    assert group_indexes(DECODE) == {
        "ds-decode-0": 0,
        "ds-decode-0-1": 0,
        "ds-decode-1": 1,
        "ds-decode-1-1": 1,
    }
    assert group_indexes(PREFILL) == {"ds-prefill-7f9c-abx9d": 0, "ds-prefill-7f9c-zk2lq": 1}


def test_select_by_group_and_rank() -> None:
    assert _names(select_log_pods(DECODE, role="decode", group=1, rank=None)) == [
        "ds-decode-1",
        "ds-decode-1-1",
    ]
    assert _names(select_log_pods(DECODE, role="decode", group=1, rank=9)) == ["ds-decode-1-1"]
    assert _names(select_log_pods(DECODE, role="decode", group=0, rank=7)) == ["ds-decode-0"]
    assert _names(select_log_pods(DECODE, role="decode", group=None, rank=9)) == [
        "ds-decode-0-1",
        "ds-decode-1-1",
    ]
    assert _names(select_log_pods(PREFILL, role="prefill", group=1, rank=None)) == ["ds-prefill-7f9c-zk2lq"]


@pytest.mark.parametrize(
    ("pods", "role", "group", "rank", "message"),
    [
        (DECODE, "decode", 2, None, "no decode group 2 (groups: 0, 1)"),
        (DECODE, "decode", 0, 16, "no decode pod runs rank 16 (ranks per pod: 0-7, 8-15)"),
        (ROUTER, "router", None, 0, "--rank applies to serving roles; the router has no ranks"),
    ],
)
def test_selection_errors_say_what_there_is(
    pods: list[Any], role: str, group: int | None, rank: int | None, message: str
) -> None:
    with pytest.raises(LogsError) as err:
        select_log_pods(pods, role=role, group=group, rank=rank)
    assert str(err.value) == message


def test_age_as_kubectl_prints_it() -> None:
    now = datetime(2026, 11, 29, 6, 0, 0, tzinfo=UTC)
    assert age("2026-11-29T05:59:15Z", now) == "45s"
    assert age("2026-11-29T05:48:00Z", now) == "12m"
    assert age("2026-11-29T01:00:00Z", now) == "5h"
    assert age("2026-11-26T06:00:00Z", now) == "3d"
    assert age(None, now) == "-"


def test_list_table() -> None:
    out = render_list(MDS, namespaces=True, now=datetime(2026, 11, 29, 6, 5, tzinfo=UTC))
    header, ds, tiny = out.splitlines()
    assert header.split()[:5] == ["NAMESPACE", "NAME", "MODEL", "READY", "PHASE"]
    assert ds.split()[:6] == ["prod", "ds", "deepseek-ai/DeepSeek-V3", "False", "Running", "P2x(EP1)"]
    assert "prefill 2/2, decode 1/2" in ds  # serving order, ready/total
    assert ds.split()[-2:] == ["http://ds.prod.svc:8000/v1", "5m"]
    assert tiny.split()[:5] == ["default", "tiny", "deepseek-ai/DeepSeek-V3", "Unknown", "Unknown"]


# --- through kubectl ------------------------------------------------------------------------------


def test_list_all_namespaces(kubectl: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "-A"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("NAMESPACE")
    assert [line.split()[:2] for line in lines[1:]] == [["default", "tiny"], ["prod", "ds"]]
    assert "--all-namespaces" in calls(kubectl)[0]


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_list_one_namespace_machine_readable(
    kubectl: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["list", "-n", "prod", "-o", fmt]) == 0
    data = yaml.safe_load(capsys.readouterr().out)  # JSON is YAML too
    assert [d["name"] for d in data] == ["ds"]
    assert data[0]["roles"]["decode"] == {"replicas": 2, "ready": 1, "desired": 2}
    assert data[0]["ready"] == "False"
    assert data[0]["endpoint"] == "http://ds.prod.svc:8000/v1"


def test_list_nothing_says_so(kubectl: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "-n", "empty"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "No ModelDeployments found in namespace empty.\n"


def test_status_yaml(kubectl: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "ds", "-n", "prod", "-o", "yaml"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["modelDeployment"]["metadata"]["name"] == "ds"
    ranks = {p["name"]: p["ranks"] for p in data["pods"]}
    assert ranks["ds-decode-1-1"] == "8-15"  # a worker with start rank auto
    assert ranks["ds-router-55d-q8k2c"] == "-"


def _logged(out: str) -> set[str]:
    """The pods whose lines came out (with or without kubectl's --prefix)."""
    return {line.split("] ", 1)[-1].split()[0] for line in out.splitlines()}


@pytest.mark.parametrize(
    ("argv", "pods"),
    [
        (["--role", "decode", "--group", "1", "--rank", "9"], {"ds-decode-1-1"}),
        (["--role", "decode", "--group", "1"], {"ds-decode-1", "ds-decode-1-1"}),
        (["--role", "decode", "--rank", "9"], {"ds-decode-0-1", "ds-decode-1-1"}),
        (["--role", "decode"], {"ds-decode-0", "ds-decode-0-1", "ds-decode-1", "ds-decode-1-1"}),
        (["--role", "prefill", "--group", "1"], {"ds-prefill-7f9c-zk2lq"}),
        (["--role", "router"], {"ds-router-55d-q8k2c"}),
    ],
)
def test_logs_of_a_group_or_rank(
    kubectl: Path, argv: list[str], pods: set[str], capfd: pytest.CaptureFixture[str]
) -> None:
    assert main(["logs", "ds", "-n", "prod", *argv]) == 0
    out = capfd.readouterr().out  # kubectl logs writes to the terminal itself
    assert _logged(out) == pods
    assert len(out.splitlines()) == 2 * len(pods)  # every line, not kubectl's default 10 per pod
    logs_call = calls(kubectl)[-1]
    assert "logs" in logs_call
    assert "--tail=-1" in logs_call
    assert ("--prefix" in logs_call) == (len(pods) > 1)


def test_logs_follow_and_previous_reach_kubectl(kubectl: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["logs", "ds", "-n", "prod", "--role", "decode", "--group", "0", "-f", "-p", "--tail", "5"]) == 0
    )
    logs_call = calls(kubectl)[-1]
    assert {"-f", "-p", "--tail=5", "--max-log-requests=2"} <= set(logs_call)
    assert f"kubemoe.io/deployment=ds,kubemoe.io/role=decode,{LWS_GROUP}=0" in logs_call


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ds", "--role", "worker"], "ModelDeployment ds has no worker pods (yet)"),
        (["nope", "--role", "decode"], "ModelDeployment nope not found in namespace prod"),
        (["ds", "--role", "decode", "--group", "4"], "no decode group 4 (groups: 0, 1)"),
        (["ds", "--role", "decode", "--group", "-1"], "--group and --rank must be 0 or more"),
    ],
)
def test_logs_errors_are_one_line(
    kubectl: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["logs", "-n", "prod", *argv]) == 1
    assert capsys.readouterr().err == f"kubectl moe logs: {message}\n"


def test_kubectl_failure_is_its_last_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    install(tmp_path, {"error": "The connection to the server localhost:8080 was refused"})
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert main(["list"]) == 1
    assert (
        capsys.readouterr().err
        == "kubectl moe list: The connection to the server localhost:8080 was refused\n"
    )
