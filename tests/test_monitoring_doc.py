"""docs/monitoring.md's examples fit what the operator renders and the code exports (#20): its
PodMonitor selects exactly the pods that serve /metrics (API pods and routers, never a torch
engine's headless worker) on a port they have, its NetworkPolicy admits Prometheus to every pod of a
deployment on that port, the dashboard's router selector matches the router's pod names, and its
dcgm-exporter join names kubemoe_gpu_info, which the code exports."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from kubemoe_operator.api.labels import LABEL_LEADER, LABEL_ROLE, ROUTER
from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render import Owner, render
from tests.operator.helpers import REPO, pod_templates
from tests.test_dashboard import DASHBOARD, exported, metric_names, queries

DOC = REPO / "docs" / "monitoring.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def _example(kind: str) -> dict[str, Any]:
    docs = [yaml.safe_load(block) for block in _blocks("yaml")]
    (found,) = [d for d in docs if d["kind"] == kind]
    assert isinstance(found, dict)
    return found


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
        }[op]
        if not ok:
            return False
    return True


def _rendered() -> list[dict[str, Any]]:
    """DeepSeek-V3: disaggregated LeaderWorkerSets (leaders and headless workers) and a router."""
    md = load_manifest(REPO / "examples" / "deepseek-v3.yaml")
    owner = Owner(name=md.metadata.name, namespace="prod", uid="00000000-0000-4000-8000-000000000000")
    return render(spec=md.spec, plan=plan_manifest(md), owner=owner, image="kubemoe/kubemoe-runtime:test")


def test_the_pod_monitor_scrapes_the_api_pods_and_routers_on_their_port() -> None:
    monitor = _example("PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    templates = pod_templates(_rendered())
    labels = [t["metadata"]["labels"] for t in templates]
    assert {lab[LABEL_LEADER] for lab in labels} == {"true", "false"}  # workers are there to leave out
    selected = [t for t in templates if _selects(monitor["spec"]["selector"], t["metadata"]["labels"])]
    assert {t["metadata"]["labels"][LABEL_ROLE] for t in selected} == {"prefill", "decode", ROUTER}
    for template in templates:
        chosen = template in selected
        assert chosen == (template["metadata"]["labels"][LABEL_LEADER] == "true")
        if chosen:
            ports = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
            assert endpoint["port"] in ports
    assert endpoint["path"] == "/metrics"


def test_the_network_policy_admits_prometheus_to_every_pod_on_the_metrics_port() -> None:
    policy = _example("NetworkPolicy")
    templates = pod_templates(_rendered())
    assert all(_selects(policy["spec"]["podSelector"], t["metadata"]["labels"]) for t in templates)
    (rule,) = policy["spec"]["ingress"]
    (port,) = rule["ports"]
    for template in templates:
        container_ports = {
            p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
        }
        assert port["port"] in container_ports


def test_the_dashboards_router_selector_matches_the_routers_pod_names() -> None:
    (router,) = [
        o for o in _rendered() if o["kind"] == "Deployment" and o["metadata"]["name"].endswith(ROUTER)
    ]
    name = router["metadata"]["name"]
    exprs = "\n".join(queries(json.loads(DASHBOARD.read_text())))
    pattern = re.search(r'pod=~"\$deployment(-router-[^"]+)"', exprs)
    assert pattern is not None
    pod = f"{name}-7d9c5b8f4-x2kq9"  # a ReplicaSet's pod: DEPLOYMENT-HASH-SUFFIX
    assert re.fullmatch("deepseek-v3" + pattern[1], pod)
    assert not re.fullmatch("deepseek-v3" + pattern[1], "deepseek-v3-decode-0")


def test_the_dcgm_join_uses_the_gpu_info_series_the_code_exports() -> None:
    (query,) = _blocks("promql")
    names = metric_names(query)
    assert names == {"DCGM_FI_DEV_GPU_UTIL", "kubemoe_gpu_info"}
    assert "kubemoe_gpu_info" in exported()
    assert "DCGM_FI_DEV_GPU_UTIL" not in exported()  # dcgm-exporter's, never ours: no doubled sums
