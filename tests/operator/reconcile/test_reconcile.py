"""reconcile() and sync_children against an in-memory API (memory_kube.py), on the renderer's real objects:
a first reconcile creates every child, a second writes nothing, drift is put back with an event, a
name another object holds is refused before anything is written, a smaller spec prunes, and ready
workloads make the deployment Ready. The e2e suite runs the same reconciler against a real API server."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from kubemoe_operator.catalog import load_catalog
from kubemoe_operator.reconcile.reconcile import ReconcileContext, Result, reconcile
from kubemoe_operator.reconcile.status import REASON_NAME_TAKEN
from tests.operator.helpers import REPO
from tests.operator.reconcile.memory_kube import MemoryKube

NS = "team"
UID = "md-uid"
CONTEXT = ReconcileContext(catalog=load_catalog(), image="runtime:test")
SPEC = yaml.safe_load((REPO / "examples" / "deepseek-v3.yaml").read_text())["spec"]  # two LWS roles, P/D


def body(kube: MemoryKube, spec: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    """The ModelDeployment as the handler would pass it, with the status the last reconcile wrote."""
    return {
        "metadata": {"name": "t", "namespace": NS, "uid": UID, "generation": generation},
        "spec": copy.deepcopy(spec or SPEC),
        "status": copy.deepcopy(kube.statuses.get((NS, "t"), {})),
    }


async def run(kube: MemoryKube, spec: dict[str, Any] | None = None, generation: int = 1) -> Result:
    return await reconcile(kube=kube, body=body(kube, spec, generation), context=CONTEXT)


def conditions(kube: MemoryKube) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in kube.statuses[(NS, "t")]["conditions"]}


def reasons(result: Result) -> list[str]:
    return [d.reason for d in result.decisions]


@pytest.fixture
async def settled() -> MemoryKube:
    kube = MemoryKube()
    await run(kube)
    kube.writes.clear()
    return kube


async def test_a_first_reconcile_creates_every_child_and_reports_progress() -> None:
    kube = MemoryKube()
    result = await run(kube)
    kinds = {k for k, _ in kube.kinds(NS)}
    assert {"LeaderWorkerSet", "Service", "Deployment", "ConfigMap", "NetworkPolicy", "Secret"} <= kinds
    workloads = {n for k, n in kube.kinds(NS) if k in ("LeaderWorkerSet", "Deployment")}
    assert workloads == {"t-prefill", "t-decode", "t-router"}
    assert {"t", "t-prefill", "t-decode"} <= {n for k, n in kube.kinds(NS) if k == "Service"}
    assert all(obj["metadata"]["ownerReferences"][0]["uid"] == UID for obj in kube.objects.values()), (
        "every child is owned"
    )
    assert reasons(result)[0] == "Applied"
    cond = conditions(kube)
    assert (cond["Planned"]["status"], cond["Ready"]["status"]) == ("True", "False")
    assert kube.statuses[(NS, "t")]["phase"] == "Progressing"


async def test_a_second_reconcile_writes_nothing(settled: MemoryKube) -> None:
    result = await run(settled)
    assert settled.writes == {}, settled.writes
    assert "Applied" not in reasons(result)


async def test_a_child_changed_outside_the_spec_is_put_back_once(settled: MemoryKube) -> None:
    lws = settled.get("LeaderWorkerSet", NS, "t-decode")
    rendered = lws["spec"]["replicas"]
    settled.put({**lws, "spec": {**lws["spec"], "replicas": rendered + 4}})  # kubectl scale
    result = await run(settled)
    restored = [d.message for d in result.decisions if d.reason == "Restored"]
    assert restored == [
        f"LeaderWorkerSet/t-decode was changed outside the spec (spec.replicas: {rendered + 4}, "
        f"rendered {rendered}); put back"
    ]
    assert settled.get("LeaderWorkerSet", NS, "t-decode")["spec"]["replicas"] == rendered
    assert "Scaled" not in reasons(result), "a put-back is not a scale"
    settled.writes.clear()
    await run(settled)
    assert settled.writes == {}, "put back once, then left alone"


async def test_fields_another_manager_adds_are_not_drift(settled: MemoryKube) -> None:
    svc = settled.get("Service", NS, "t")
    extra = copy.deepcopy(svc)
    extra["metadata"].setdefault("annotations", {})["someone.else/note"] = "kept"
    extra["spec"]["clusterIP"] = "10.0.0.7"  # a server default
    settled.put(extra)
    await run(settled)
    assert settled.writes == {}, settled.writes


async def test_a_name_another_object_holds_is_refused_and_nothing_is_written() -> None:
    kube = MemoryKube()
    theirs = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "t-decode", "namespace": NS, "labels": {"app": "theirs"}},
        "spec": {"ports": [{"port": 80}]},
    }
    kube.put(theirs)
    await run(kube)
    assert kube.kinds(NS) == [("Service", "t-decode")], "nothing applied, theirs untouched"
    assert kube.get("Service", NS, "t-decode")["spec"] == theirs["spec"]
    ready = conditions(kube)["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", REASON_NAME_TAKEN)
    assert f"Service {NS}/t-decode (created by someone else)" in ready["message"]


async def test_a_spec_the_planner_rejects_leaves_the_children_as_they_were(settled: MemoryKube) -> None:
    before = copy.deepcopy(settled.objects)
    spec = copy.deepcopy(SPEC)
    spec["router"] = {"replicas": 0}  # disaggregated serving needs a router
    result = await run(settled, spec, generation=2)
    assert settled.objects == before
    assert reasons(result) == ["PlanRejected"]
    planned = conditions(settled)["Planned"]
    assert (planned["status"], planned["observedGeneration"]) == ("False", 2)
    assert "spec.router.replicas" in planned["message"]


async def test_a_smaller_spec_prunes_what_it_no_longer_has() -> None:
    kube = MemoryKube()
    mixtral = yaml.safe_load((REPO / "examples" / "mixtral-8x7b.yaml").read_text())["spec"]  # colocated
    await run(kube, mixtral)
    assert ("Deployment", "t-router") in kube.kinds(NS)
    result = await run(kube, {**mixtral, "router": {"replicas": 0}}, generation=2)
    router = [("Deployment", "t-router"), ("NetworkPolicy", "t-router"), ("PodDisruptionBudget", "t-router")]
    assert not set(router) & set(kube.kinds(NS))
    pruned = next(d.message for d in result.decisions if d.reason == "Pruned")
    assert pruned == ", ".join(f"{k}/{n}" for k, n in router)
    assert {("Deployment", "t-worker"), ("Service", "t")} <= set(kube.kinds(NS)), "the rest stays"


async def test_ready_workloads_make_the_deployment_ready(settled: MemoryKube) -> None:
    for (kind, _, _), obj in list(settled.objects.items()):
        if kind in ("LeaderWorkerSet", "Deployment"):
            n = obj["spec"]["replicas"]
            status = {"replicas": n, "readyReplicas": n, "updatedReplicas": n, "observedGeneration": None}
            settled.put({**obj, "status": status})
    await run(settled)
    assert settled.statuses[(NS, "t")]["phase"] == "Ready"
    assert conditions(settled)["Ready"]["status"] == "True"


async def test_a_deleted_kv_key_secret_is_made_again_once_a_pod_needs_it(settled: MemoryKube) -> None:
    key = settled.get("Secret", NS, "t-kv-key")["stringData"]["key"]
    del settled.objects[("Secret", NS, "t-kv-key")]  # kubectl delete secret t-kv-key
    await run(settled)
    assert ("Secret", "t-kv-key") not in settled.kinds(NS), "not re-created on every resync"
    settled.put(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "t-decode-0", "namespace": NS, "labels": {"kubemoe.io/deployment": "t"}},
            "status": {
                "containerStatuses": [
                    {
                        "name": "runtime",
                        "state": {
                            "waiting": {
                                "reason": "CreateContainerConfigError",
                                "message": 'secret "t-kv-key" not found',
                            }
                        },
                    }
                ]
            },
        }
    )
    await run(settled)
    made = settled.get("Secret", NS, "t-kv-key")
    assert made["stringData"]["key"] != key, "a new random key"
    assert made["metadata"]["ownerReferences"][0]["uid"] == UID


async def test_kubemoes_router_runs_the_operators_image_whatever_the_engines_image() -> None:
    """SGLang colocated: the workers run engine.image (SGLang's own server), kubemoe's router the
    operator's runtime image (it is not in the engine's)."""
    spec = yaml.safe_load((REPO / "examples" / "engines" / "sglang-qwen3-30b.yaml").read_text())["spec"]
    kube = MemoryKube()
    await run(kube, spec)
    images = {
        name: [c["image"] for c in kube.get(kind, NS, name)["spec"]["template"]["spec"]["containers"]]
        for kind, name in kube.kinds(NS)
        if kind == "Deployment"
    }
    assert images["t-router"] == ["runtime:test"]
    assert images["t-worker"] == [spec["engine"]["image"]]


async def test_sglang_pd_creates_the_routers_identity() -> None:
    spec = yaml.safe_load((REPO / "examples" / "engines" / "sglang-deepseek-v3.yaml").read_text())["spec"]
    kube = MemoryKube()
    await run(kube, spec)
    kinds = {k for k, _ in kube.kinds(NS)}
    assert {"ServiceAccount", "Role", "RoleBinding"} <= kinds
    role = kube.get("Role", NS, "t-router")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
