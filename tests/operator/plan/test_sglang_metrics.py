"""SGLang mounts /metrics only with --enable-metrics (SGLang 0.5.23: `if get_observability().enable_metrics:
add_prometheus_middleware(app)` in its http_server), yet its pods are labelled for scraping like every
serving pod: every pod of every SGLang group gets the flag. And every example, engines' and the
external-autoscaling one included, still plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.plan.command import SGLANG_METRICS_FLAG, SGLANG_SERVER
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.helpers import REPO

ENGINE_EXAMPLES = sorted((REPO / "examples" / "engines").glob("*.yaml"))
ALL_EXAMPLES = sorted(
    p for p in (REPO / "examples").rglob("*.yaml") if "invalid" not in p.parts and p.name != "hpa.yaml"
)


@pytest.mark.parametrize("stem", ["sglang-deepseek-v3", "sglang-qwen3-30b"])
def test_every_sglang_pod_serves_its_metrics(stem: str) -> None:
    plan = plan_manifest(load_manifest(REPO / "examples" / "engines" / f"{stem}.yaml"))
    argvs = [pod.command for role in plan.roles for pod in role.pods]
    assert argvs
    for argv in argvs:
        assert tuple(argv[: len(SGLANG_SERVER)]) == SGLANG_SERVER
        assert argv.count("--enable-metrics") == 1
    assert SGLANG_METRICS_FLAG == "--enable-metrics"


def test_tgi_and_vllm_pods_get_no_sglang_flag() -> None:
    for path in (
        REPO / "examples" / "engines" / "tgi-mixtral-8x7b.yaml",
        REPO / "examples" / "qwen3-235b.yaml",
    ):
        plan = plan_manifest(load_manifest(path))
        assert all("--enable-metrics" not in pod.command for role in plan.roles for pod in role.pods)


def test_the_examples_are_all_found() -> None:
    stems = {p.stem for p in ALL_EXAMPLES}
    assert {"sglang-deepseek-v3", "tgi-mixtral-8x7b", "modeldeployment", "tiny-moe"} <= stems


@pytest.mark.parametrize("path", ALL_EXAMPLES, ids=lambda p: str(p.relative_to(REPO / "examples")))
def test_every_example_plans(path: Path) -> None:
    plan = plan_manifest(load_manifest(path))
    assert plan.roles
