"""`kubemoe up`'s process layout (pure): each pod's own command line from the plan, mapped to 127.0.0.1."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.local.layout import LocalProcess, local_processes
from kubemoe_operator.local.model import ModelSourceError, local_model_path
from kubemoe_operator.plan.model import Plan
from kubemoe_operator.plan.planner import plan_manifest

REPO = Path(__file__).resolve().parents[3]


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _tiny_layout(plan: Plan, tmp_path: Path, ports: Iterator[int]) -> list[LocalProcess]:
    return local_processes(
        plan,
        model=tmp_path / "model",
        runtime="/venv/bin/kubemoe-runtime",
        router_port=8000,
        kv_dir=tmp_path / "kv",
        port=lambda: next(ports),
    )


def test_tiny_example_becomes_four_local_processes(tmp_path: Path) -> None:
    plan = plan_manifest(load_manifest(REPO / "examples" / "tiny-moe.yaml"))
    processes = _tiny_layout(plan, tmp_path, itertools.count(9001))
    assert [(p.name, p.role, p.ranks, p.leader) for p in processes] == [
        ("prefill-g0-p0", "prefill", [0], True),
        ("decode-g0-p0", "decode", [0], True),
        ("decode-g0-p1", "decode", [1], False),
        ("router", "router", [], True),
    ]
    prefill, decode0, decode1, router = processes
    for p in (prefill, decode0, decode1):
        pod = next(
            pod for role in plan.roles if role.role == p.role for pod in role.pods if pod.index == p.pod
        )
        assert p.argv[0] == "/venv/bin/kubemoe-runtime"
        assert p.argv[1:3] == pod.command[1:3]  # serve --engine ...: the operator's own command line
        assert flag(p.argv, "--host") == "127.0.0.1"
        assert flag(p.argv, "--model") == str(tmp_path / "model")
        assert p.env["KUBEMOE_ROLE"] == p.role
    assert len({p.port for p in processes}) == 4
    assert flag(decode0.argv, "--data-parallel-address") == flag(decode1.argv, "--data-parallel-address")
    assert flag(decode0.argv, "--data-parallel-rpc-port") == flag(decode1.argv, "--data-parallel-rpc-port")
    assert "--headless" in decode1.argv
    assert "--headless" not in decode0.argv
    kv = json.loads(flag(prefill.argv, "--kv-transfer-config"))
    assert kv["kv_role"] == "kv_producer"
    assert kv["kv_connector_extra_config"]["shared_storage_path"] == str(tmp_path / "kv")
    assert flag(router.argv, "--port") == "8000"
    assert flag(router.argv, "--prefill-service") == f"127.0.0.1:{prefill.port}"
    assert flag(router.argv, "--decode-service") == f"127.0.0.1:{decode0.port}"  # group leaders only
    assert flag(router.argv, "--policy") == plan.router.policy


def test_model_sources(tmp_path: Path) -> None:
    assert local_model_path("file://.run/models/x", cwd=tmp_path) == tmp_path / ".run" / "models" / "x"
    assert local_model_path("file:///abs/model", cwd=tmp_path) == Path("/abs/model")
    assert local_model_path("models/y", cwd=tmp_path) == tmp_path / "models" / "y"
    with pytest.raises(ModelSourceError, match="file://PATH"):
        local_model_path("hf://org/model", cwd=tmp_path)


def test_every_port_of_a_run_is_distinct_even_when_free_port_repeats(tmp_path: Path) -> None:
    # free_port() closes its probe socket, so the kernel may hand the same port out twice in a row.
    plan = plan_manifest(load_manifest(REPO / "examples" / "tiny-moe.yaml"))
    repeating = iter([8000, 9001, 9001, 9002, 9002, 9001, 9003, 9004, 9005, 9006])
    processes = _tiny_layout(plan, tmp_path, repeating)
    rpc = {
        flag(p.argv, "--data-parallel-rpc-port") for p in processes if "--data-parallel-rpc-port" in p.argv
    }
    given = [p.port for p in processes] + [int(r) for r in rpc]  # a group's pods share its rpc port
    assert rpc
    assert len(given) == len(set(given)), given
