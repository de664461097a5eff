"""The operator on the real control plane with simulated H200 nodes (4 x 8 GPUs) and LWS.

One operator process watches one namespace for the whole module. DeepSeek-V3 (two
LeaderWorkerSets filling all 32 H200 GPUs) and Mixtral (a colocated single-pod layout, a
Deployment) cannot run side by side, so each has a class whose fixture deploys it and, after the
class, deletes it and waits for its pods to go. Every test starts from the manifest as written,
Ready: a test's patches never reach the next one, and any test runs alone or in any order.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from e2e.cluster.handle import Cluster
from e2e.identity import service_account_user
from e2e.operator_process import (
    OperatorProcess,
    eventually,
    get_json,
    get_or_none,
    leading,
    model_volume,
    scratch_namespace,
)
from e2e.reliability import Outcome, RecordProperty, record
from kubemoe_operator.kube.kinds import CHILD_KINDS

REPO = Path(__file__).resolve().parents[1]
DEEPSEEK = REPO / "examples" / "deepseek-v3.yaml"
MIXTRAL = REPO / "e2e" / "manifests" / "mixtral-h200.yaml"
RESYNC_S = 3
OPERATOR_FLAGS = {"resync_s": RESYNC_S}  # for the operator fixture (e2e/conftest.py)
pytestmark = pytest.mark.usefixtures("the_charts_rbac_is_enough")  # e2e/conftest.py
LABEL = "kubemoe.io/deployment"
OPERATOR_MANAGER = "kubemoe-operator"


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> Iterator[str]:
    with scratch_namespace(cluster, prefix="op") as ns:
        yield ns


def restart(proc: OperatorProcess) -> None:
    """Start `proc` again and wait until it leads."""
    led = proc.text().count("leading as")
    proc.start()
    leading(proc, times=led + 1)


def md(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = get_json(cluster, "md", name, "-n", ns)
    return obj


def condition(obj: dict[str, Any], type: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == type:
            return dict(c)
    return {}


def wait_ready(cluster: Cluster, ns: str, name: str, *, timeout: float = 60) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def ready() -> dict[str, Any] | None:
        obj = md(cluster, ns, name)
        status = obj.get("status") or {}
        last["status"] = status
        ok = (
            condition(obj, "Ready").get("status") == "True"
            and status.get("observedGeneration") == obj["metadata"]["generation"]
        )
        return obj if ok else None

    try:
        return eventually(ready, timeout=timeout, what=f"{name} Ready")
    except AssertionError as err:
        raise AssertionError(f"{err}\nlast status: {json.dumps(last.get('status'), indent=1)}") from None


def children(cluster: Cluster, ns: str, name: str) -> dict[str, dict[str, Any]]:
    """kind/name -> object for everything labelled for `name`."""
    items = get_json(
        cluster,
        "configmaps,services,poddisruptionbudgets,deployments,leaderworkersets",
        "-n",
        ns,
        "-l",
        f"{LABEL}={name}",
        "--show-managed-fields",
    )["items"]
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in items}


def running_pods(cluster: Cluster, ns: str, selector: str) -> list[dict[str, Any]]:
    pods = get_json(cluster, "pods", "-n", ns, "-l", selector)["items"]
    return [
        p
        for p in pods
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]


def patch_md(cluster: Cluster, ns: str, name: str, patch: dict[str, Any]) -> None:
    cluster.kubectl("patch", "md", name, "-n", ns, "--type=merge", "-p", json.dumps(patch))


def spec_as_written(cluster: Cluster, ns: str, name: str, manifest: Path) -> None:
    """The spec replaced whole by the manifest's: a test's patches undone, fields it added removed.
    (Not `kubectl apply` or `replace`: the first keeps added fields, the second drops kopf's
    annotations, and either way kopf would handle a change. An unchanged spec is a no-op here.)"""
    spec = yaml.safe_load(manifest.read_text())["spec"]
    body = [{"op": "replace", "path": "/spec", "value": spec}]
    cluster.kubectl("patch", "md", name, "-n", ns, "--type=json", "-p", json.dumps(body))


def delete_and_wait_gone(cluster: Cluster, ns: str, name: str) -> None:
    """Delete `name` and wait for its children and pods to go: the next deployment needs those GPUs."""
    cluster.kubectl("delete", "md", name, "-n", ns, "--ignore-not-found", "--wait=true", "--timeout=60s")
    eventually(
        lambda: (
            not children(cluster, ns, name)
            and not get_json(cluster, "pods", "-n", ns, "-l", f"{LABEL}={name}")["items"]
        ),
        timeout=120,
        what=f"{name}'s children and pods gone",
    )


def operator_fields(obj: dict[str, Any]) -> tuple[Any, ...]:
    """What only a spec edit or a write by the operator changes: the generation and the operator's
    managedFields (not resourceVersion, which every status update by a child's own controller bumps)."""
    meta = obj["metadata"]
    mine = [
        (m["operation"], m.get("subresource"), m.get("time"), json.dumps(m.get("fieldsV1"), sort_keys=True))
        for m in meta.get("managedFields") or []
        if m["manager"] == OPERATOR_MANAGER
    ]
    return meta.get("generation"), mine


def children_fields(cluster: Cluster, ns: str, name: str) -> dict[str, tuple[Any, ...]]:
    return {k: operator_fields(v) for k, v in children(cluster, ns, name).items()}


DEEPSEEK_CHILDREN = {
    "ConfigMap/deepseek-v3-plan",
    "Service/deepseek-v3",
    "Service/deepseek-v3-prefill",
    "Service/deepseek-v3-decode",
    "PodDisruptionBudget/deepseek-v3-prefill",
    "PodDisruptionBudget/deepseek-v3-decode",
    "PodDisruptionBudget/deepseek-v3-router",
    "LeaderWorkerSet/deepseek-v3-prefill",
    "LeaderWorkerSet/deepseek-v3-decode",
    "Deployment/deepseek-v3-router",
}


class TestDeepSeek:
    """DeepSeek-V3 as the example has it, filling every H200 GPU: deployed once for the class."""

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def deployed(cls, cluster: Cluster, namespace: str, operator: OperatorProcess) -> Iterator[None]:
        cluster.kubectl("apply", "-n", namespace, "-f", str(DEEPSEEK))
        yield
        delete_and_wait_gone(cluster, namespace, "deepseek-v3")

    @pytest.fixture(autouse=True)
    def as_written(self, cluster: Cluster, namespace: str, deployed: None) -> None:
        """Each test starts from the example as written (an earlier test's patches undone), Ready."""
        spec_as_written(cluster, namespace, "deepseek-v3", DEEPSEEK)
        wait_ready(cluster, namespace, "deepseek-v3", timeout=120)

    def test_deepseek_v3_becomes_two_leader_worker_sets_and_gets_ready(
        self, cluster: Cluster, namespace: str
    ) -> None:
        ns = namespace
        obj = wait_ready(cluster, ns, "deepseek-v3")
        status = obj["status"]
        assert status["phase"] == "Ready"
        assert status["layout"] == "P1x(EP16) D1x(EP16)"
        assert status["endpoint"] == f"http://deepseek-v3.{ns}.svc:8000/v1"
        assert status["roles"]["prefill"] == {"replicas": 1, "ready": 1}
        assert status["roles"]["decode"] == {"replicas": 1, "ready": 1}
        assert status["roles"]["router"] == {"replicas": 2, "ready": 2}
        assert {c["type"]: c["status"] for c in status["conditions"]} == {
            "Ready": "True",
            "Planned": "True",
            "Progressing": "False",
            "Degraded": "False",
        }

        kids = children(cluster, ns, "deepseek-v3")
        assert set(kids) == DEEPSEEK_CHILDREN
        uid = obj["metadata"]["uid"]
        for key, child in kids.items():
            refs = child["metadata"]["ownerReferences"]
            assert [(r["uid"], r["controller"]) for r in refs] == [(uid, True)], key
            managers = {m["manager"] for m in child["metadata"]["managedFields"] if m["operation"] == "Apply"}
            assert managers == {"kubemoe-operator"}, key
        for role in ("prefill", "decode"):
            lws = kids[f"LeaderWorkerSet/deepseek-v3-{role}"]["spec"]
            assert lws["replicas"] == 1
            tmpl = lws["leaderWorkerTemplate"]
            assert tmpl["size"] == 2
            assert tmpl["restartPolicy"] == "RecreateGroupOnPodRestart"
            leader = tmpl["leaderTemplate"]["spec"]["containers"][0]
            worker = tmpl["workerTemplate"]["spec"]["containers"][0]
            assert leader["command"] == ["kubemoe-runtime"]
            assert leader["args"][:4] == ["serve", "--engine", "vllm", "--role"]
            assert "--headless" in worker["args"]
            assert "--headless" not in leader["args"]
            assert leader["resources"]["limits"] == {"nvidia.com/gpu": "8"}
            assert leader["readinessProbe"]["httpGet"]["path"] == "/ready"
            assert leader["livenessProbe"]["httpGet"]["path"] == "/health"
            assert tmpl["leaderTemplate"]["spec"]["securityContext"]["runAsNonRoot"] is True
        assert kids["Service/deepseek-v3-decode"]["spec"]["clusterIP"] == "None"
        assert kids["Service/deepseek-v3"]["spec"]["ports"][0]["port"] == 8000
        plan = json.loads(kids["ConfigMap/deepseek-v3-plan"]["data"]["plan.json"])
        assert plan["layout"] == "P1x(EP16) D1x(EP16)"
        router_args = kids["Deployment/deepseek-v3-router"]["spec"]["template"]["spec"]["containers"][0][
            "args"
        ]
        assert f"deepseek-v3-prefill.{ns}.svc:8000" in router_args
        assert f"deepseek-v3-decode.{ns}.svc:8000" in router_args

        # Four 8-GPU worker pods, one per node, within every node's capacity.
        pods = running_pods(cluster, ns, f"{LABEL}=deepseek-v3,kubemoe.io/role in (prefill,decode)")
        assert len(pods) == 4
        per_node: Counter[str] = Counter()
        for p in pods:
            per_node[p["spec"]["nodeName"]] += int(
                p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
            )
        assert sorted(per_node.values()) == [8, 8, 8, 8]

        table = cluster.kubectl("get", "md", "-n", ns).stdout.splitlines()
        assert table[0].split()[:6] == ["NAME", "READY", "PHASE", "LAYOUT", "PREFILL", "DECODE"]
        assert table[1].split()[:7] == ["deepseek-v3", "True", "Ready", "P1x(EP16)", "D1x(EP16)", "1", "1"]

        events = get_json(cluster, "events", "-n", ns, "--field-selector", "involvedObject.name=deepseek-v3")
        reasons = {e["reason"] for e in events["items"] if e["involvedObject"]["kind"] == "ModelDeployment"}
        assert {"Planned", "Applied", "Ready"} <= reasons

    def test_resync_with_nothing_to_do_writes_nothing(
        self, cluster: Cluster, namespace: str, operator: OperatorProcess
    ) -> None:
        """Counted at the apiserver (its audit log of the operator's ServiceAccount): reads, no writes
        (besides renewing its leader-election Lease). Every resync starts by listing ModelDeployments
        and reconciles them all before the next one starts. Counting from the second list from now
        (the reconcile that made it Ready, with its Events and kopf's bookkeeping, long done), two
        whole resyncs have run once the fourth has started."""
        user = service_account_user(operator.cluster)
        start = len(operator.cluster.audit_events(user=user))

        def resyncs(at_least: int) -> list[int] | None:
            """Indices in the audit log of the resyncs' lists of ModelDeployments since `start`."""
            events = operator.cluster.audit_events(user=user)
            found = [
                i
                for i, e in enumerate(events[start:], start)
                if e["verb"] == "list" and e.get("objectRef", {}).get("resource") == "modeldeployments"
            ]
            return found if len(found) >= at_least else None

        first = eventually(lambda: resyncs(2), timeout=60, what="two resyncs")[1]
        before_writes = len(operator.writes())
        before = children_fields(cluster, namespace, "deepseek-v3")
        md_version = md(cluster, namespace, "deepseek-v3")["metadata"]["resourceVersion"]
        eventually(lambda: resyncs(4), timeout=60, what="two more resyncs")
        assert operator.writes()[before_writes:] == []
        during = [
            e
            for e in operator.cluster.audit_events(user=user)[first:]
            if e.get("objectRef", {}).get("resource") != "leases"
        ]
        verbs = Counter(e["verb"] for e in during)
        assert not {"create", "update", "patch", "delete"} & set(verbs), [
            (e["verb"], e["requestURI"]) for e in during if e["verb"] not in ("get", "list", "watch")
        ]
        assert children_fields(cluster, namespace, "deepseek-v3") == before
        assert md(cluster, namespace, "deepseek-v3")["metadata"]["resourceVersion"] == md_version

    def test_child_watches_are_filtered_by_the_api_server(self, operator: OperatorProcess) -> None:
        """kopf's LISTs and WATCHes of the child kinds carry the deployment label as their
        labelSelector (reconcile/handlers.py, watch_labelled_children), so a cluster's other
        ConfigMaps, Services, Jobs... never reach the operator; the operator's own lists of children
        select by that label too."""
        plurals = {kind.plural for kind in CHILD_KINDS}
        user = service_account_user(operator.cluster)
        requests = [
            e
            for e in operator.cluster.audit_events(user=user)
            if e["verb"] in ("list", "watch") and e.get("objectRef", {}).get("resource") in plurals
        ]
        # The audit log holds requests that completed: each kind's LIST (kopf lists, then watches from
        # its resourceVersion, with the same selector); a WATCH completes only when it ends.
        assert {e["objectRef"]["resource"] for e in requests if e["verb"] == "list"} >= plurals
        for e in requests:
            selectors = parse_qs(urlsplit(e["requestURI"]).query).get("labelSelector", [])
            assert any(LABEL in s for s in selectors), e["requestURI"]

    def test_deleted_child_comes_back(self, cluster: Cluster, namespace: str) -> None:
        old = get_json(cluster, "service", "deepseek-v3", "-n", namespace)["metadata"]["uid"]
        cluster.kubectl("delete", "service", "deepseek-v3", "-n", namespace)
        eventually(
            lambda: (
                (s := get_or_none(cluster, "service", "deepseek-v3", "-n", namespace))
                and s["metadata"]["uid"] != old
            ),
            timeout=60,
            what="the router Service to be recreated",
        )

    def test_scaling_past_capacity_is_progressing_with_pending_pods(
        self, cluster: Cluster, namespace: str
    ) -> None:
        ns = namespace
        patch_md(cluster, ns, "deepseek-v3", {"spec": {"roles": {"decode": {"replicas": 2}}}})
        eventually(
            lambda: get_json(cluster, "lws", "deepseek-v3-decode", "-n", ns)["spec"]["replicas"] == 2,
            timeout=60,
            what="decode LWS at 2 groups",
        )

        def pending() -> dict[str, Any] | None:
            obj = md(cluster, ns, "deepseek-v3")
            prog = condition(obj, "Progressing")
            return obj if prog.get("reason") == "PodsPending" else None

        obj = eventually(pending, timeout=60, what="Progressing=True reason PodsPending")
        prog = condition(obj, "Progressing")
        assert prog["status"] == "True"
        assert "nvidia.com/gpu" in prog["message"], prog
        assert condition(obj, "Ready")["status"] == "False"
        assert obj["status"]["phase"] == "Progressing"
        assert obj["status"]["roles"]["decode"]["ready"] == 1
        assert condition(obj, "Degraded")["status"] == "False"

        patch_md(cluster, ns, "deepseek-v3", {"spec": {"roles": {"decode": {"replicas": 1}}}})
        wait_ready(cluster, ns, "deepseek-v3")
        assert get_json(cluster, "lws", "deepseek-v3-decode", "-n", ns)["spec"]["replicas"] == 1

    def test_invalid_update_leaves_children_untouched(self, cluster: Cluster, namespace: str) -> None:
        ns = namespace
        before = children_fields(cluster, ns, "deepseek-v3")
        # EP2 cannot hold DeepSeek-V3's 671B parameters: the schema accepts it, the planner does not.
        patch_md(
            cluster,
            ns,
            "deepseek-v3",
            {"spec": {"roles": {"decode": {"parallelism": {"data": 2, "expert": 2}}}}},
        )

        def rejected() -> dict[str, Any] | None:
            obj = md(cluster, ns, "deepseek-v3")
            return obj if condition(obj, "Planned").get("status") == "False" else None

        obj = eventually(rejected, timeout=60, what="Planned=False")
        planned = condition(obj, "Planned")
        assert planned["reason"] == "PlanRejected"
        assert "spec.roles.decode.parallelism" in planned["message"]
        ready = condition(obj, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "PlanRejected")
        assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
        assert children_fields(cluster, ns, "deepseek-v3") == before
        events = get_json(cluster, "events", "-n", ns, "--field-selector", "involvedObject.name=deepseek-v3")
        assert "PlanRejected" in {e["reason"] for e in events["items"]}

        patch_md(
            cluster,
            ns,
            "deepseek-v3",
            {"spec": {"roles": {"decode": {"parallelism": {"data": 16, "expert": 16}}}}},
        )
        wait_ready(cluster, ns, "deepseek-v3")

    def test_image_change_rolls_out(self, cluster: Cluster, namespace: str) -> None:
        """engine.image rolls the serving pods; the router runs the operator's runtime image whatever
        engine.image is (an SGLang or TGI image has no kubemoe router), so it does not roll."""
        ns = namespace
        # A tag of its own: the same test run again is a change again.
        new_image = f"example.invalid/kubemoe-runtime:{uuid.uuid4().hex[:8]}"
        router = f"{LABEL}=deepseek-v3,kubemoe.io/role=router"
        old_routers = {
            p["metadata"]["uid"]: p["spec"]["containers"][0]["image"]
            for p in running_pods(cluster, ns, router)
        }
        patch_md(cluster, ns, "deepseek-v3", {"spec": {"engine": {"image": new_image}}})

        def rolled() -> bool:
            lws = get_json(cluster, "lws", "deepseek-v3-prefill", "-n", ns)
            image = lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["image"]
            pods = running_pods(cluster, ns, f"{LABEL}=deepseek-v3,kubemoe.io/role=prefill")
            return (
                image == new_image
                and bool(pods)
                and {p["spec"]["containers"][0]["image"] for p in pods} == {image}
            )

        eventually(rolled, timeout=90, what="the new image on the LWS and its pods")
        wait_ready(cluster, ns, "deepseek-v3", timeout=90)
        routers = {
            p["metadata"]["uid"]: p["spec"]["containers"][0]["image"]
            for p in running_pods(cluster, ns, router)
        }
        assert routers == old_routers, "the router kept its pods and the runtime image"
        assert new_image not in routers.values()


@pytest.fixture
def deepseek_to_delete(cluster: Cluster, namespace: str, operator: OperatorProcess) -> Iterator[str]:
    """DeepSeek-V3 deployed and Ready, for a test that deletes it (gone, pods and all, after)."""
    cluster.kubectl("apply", "-n", namespace, "-f", str(DEEPSEEK))
    wait_ready(cluster, namespace, "deepseek-v3", timeout=120)
    yield "deepseek-v3"
    delete_and_wait_gone(cluster, namespace, "deepseek-v3")


def test_delete_garbage_collects_every_child(
    cluster: Cluster, namespace: str, deepseek_to_delete: str
) -> None:
    name = deepseek_to_delete
    assert children(cluster, namespace, name)
    cluster.kubectl("delete", "md", name, "-n", namespace, "--wait=true", "--timeout=60s")
    eventually(lambda: not children(cluster, namespace, name), timeout=60, what="children collected")
    eventually(
        lambda: not get_json(cluster, "pods", "-n", namespace, "-l", f"{LABEL}={name}")["items"],
        timeout=60,
        what="pods gone",
    )


def test_pods_the_controller_cannot_create_are_degraded_with_its_words_until_fixed(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    """No pod exists to read when the API server refuses them (here: a PriorityClass that is not
    there; a ResourceQuota or a PodSecurity level refuses the same way): the ReplicaSet controller's
    FailedCreate Event is the only word on it, and Degraded quotes it. Once the class exists the
    pods are created and the deployment becomes Ready."""
    ns, name, klass = namespace, "refused", f"kubemoe-e2e-{uuid.uuid4().hex[:8]}"
    manifest = yaml.safe_load(MIXTRAL.read_text())
    manifest["metadata"]["name"] = name
    manifest["spec"]["scheduling"]["priorityClassName"] = klass
    cluster.kubectl("apply", "-f", "-", stdin=model_volume(ns))
    cluster.kubectl("apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump(manifest))
    try:

        def refused() -> dict[str, Any] | None:
            degraded = condition(md(cluster, ns, name), "Degraded")
            return degraded if degraded.get("reason") == "PodsNotCreated" else None

        degraded = eventually(refused, timeout=90, what="Degraded=True reason PodsNotCreated")
        assert degraded["status"] == "True"
        assert f"ReplicaSet {name}-worker-" in degraded["message"]
        assert f"no PriorityClass with name {klass} was found" in degraded["message"]
        assert md(cluster, ns, name)["status"]["phase"] == "Degraded"
        cluster.kubectl(
            "create", "priorityclass", klass, "--value=1000", "--description=kubemoe e2e", timeout=60
        )
        wait_ready(cluster, ns, name, timeout=240)
        assert condition(md(cluster, ns, name), "Degraded")["status"] == "False"
    finally:
        delete_and_wait_gone(cluster, ns, name)
        cluster.kubectl("delete", "priorityclass", klass, "--ignore-not-found", check=False)


MIXTRAL_CHILDREN = {
    "ConfigMap/mixtral-plan",
    "Service/mixtral",
    "Service/mixtral-worker",
    "PodDisruptionBudget/mixtral-worker",
    "PodDisruptionBudget/mixtral-router",
    "Deployment/mixtral-worker",
    "Deployment/mixtral-router",
}
WITHOUT_ROUTER = MIXTRAL_CHILDREN - {"Deployment/mixtral-router", "PodDisruptionBudget/mixtral-router"}


def patch_desired(cluster: Cluster, ns: str, name: str, role: str, desired: int | None) -> None:
    body = {"status": {"roles": {role: {"desired": desired}}}}
    cluster.kubectl(
        "patch", "md", name, "-n", ns, "--subresource=status", "--type=merge", "-p", json.dumps(body)
    )


class TestMixtral:
    """Mixtral colocated on H200 (2 workers x 4 GPUs, one router): deployed once for the class."""

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def deployed(cls, cluster: Cluster, namespace: str, operator: OperatorProcess) -> Iterator[None]:
        cluster.kubectl("apply", "-f", "-", stdin=model_volume(namespace))
        cluster.kubectl("apply", "-n", namespace, "-f", str(MIXTRAL))
        wait_ready(cluster, namespace, "mixtral", timeout=120)
        yield
        delete_and_wait_gone(cluster, namespace, "mixtral")

    @pytest.fixture(autouse=True)
    def as_written(self, cluster: Cluster, namespace: str, deployed: None) -> None:
        """Each test starts from the manifest as written, with no autoscaler decision, Ready."""
        spec_as_written(cluster, namespace, "mixtral", MIXTRAL)
        patch_desired(cluster, namespace, "mixtral", "worker", None)
        wait_ready(cluster, namespace, "mixtral", timeout=120)

    def test_colocated_single_pod_groups_are_a_deployment_and_the_router_prunes(
        self, cluster: Cluster, namespace: str
    ) -> None:
        ns = namespace
        obj = wait_ready(cluster, ns, "mixtral")
        assert obj["status"]["layout"] == "W2x(TP4)"
        kids = children(cluster, ns, "mixtral")
        assert set(kids) == MIXTRAL_CHILDREN
        worker = kids["Deployment/mixtral-worker"]["spec"]
        assert worker["replicas"] == 2
        pod = worker["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "4"}
        assert {"name": "model", "mountPath": "/mnt/models", "readOnly": True} in pod["containers"][0][
            "volumeMounts"
        ]
        claim = next(v for v in pod["volumes"] if v["name"] == "model")["persistentVolumeClaim"]
        assert claim == {"claimName": "models", "readOnly": True}
        assert kids["Service/mixtral"]["spec"]["selector"]["kubemoe.io/role"] == "router"

        # No router: its Deployment and budget are pruned and the front Service points at the workers.
        patch_md(cluster, ns, "mixtral", {"spec": {"router": {"replicas": 0}}})
        eventually(
            lambda: set(children(cluster, ns, "mixtral")) == WITHOUT_ROUTER, timeout=60, what="router pruned"
        )
        front = get_json(cluster, "service", "mixtral", "-n", ns)
        assert front["spec"]["selector"]["kubemoe.io/role"] == "worker"
        obj = wait_ready(cluster, ns, "mixtral")
        assert "router" not in obj["status"]["roles"]

    def test_autoscaler_decision_in_status_is_rendered_clamped(
        self, cluster: Cluster, namespace: str
    ) -> None:
        ns = namespace

        def worker_replicas() -> int:
            return int(get_json(cluster, "deployment", "mixtral-worker", "-n", ns)["spec"]["replicas"])

        patch_desired(cluster, ns, "mixtral", "worker", 9)  # above maxReplicas: 3
        eventually(lambda: worker_replicas() == 3, timeout=60, what="3 workers (clamped)")
        obj = wait_ready(cluster, ns, "mixtral")
        assert obj["spec"]["roles"]["worker"]["replicas"] == 2, "the spec is never edited"
        assert obj["status"]["roles"]["worker"] == {"replicas": 3, "ready": 3, "desired": 9}
        assert obj["status"]["layout"] == "W3x(TP4)"
        patch_desired(cluster, ns, "mixtral", "worker", None)  # no decision: back to the spec
        eventually(lambda: worker_replicas() == 2, timeout=60, what="2 workers")
        wait_ready(cluster, ns, "mixtral")

    def test_scale_or_edit_outside_the_spec_is_put_back_once(self, cluster: Cluster, namespace: str) -> None:
        ns = namespace

        def worker() -> dict[str, Any]:
            obj: dict[str, Any] = get_json(cluster, "deployment", "mixtral-worker", "-n", ns)
            return obj

        def restored() -> list[str]:
            events = get_json(cluster, "events", "-n", ns, "--field-selector", "involvedObject.name=mixtral")
            return [e["message"] for e in events["items"] if e["reason"] == "Restored"]

        before = len(restored())
        cluster.kubectl("scale", "deployment", "mixtral-worker", "-n", ns, "--replicas=1")
        eventually(lambda: worker()["spec"]["replicas"] == 2, timeout=30, what="2 workers again")
        image = worker()["spec"]["template"]["spec"]["containers"][0]["image"]
        cluster.kubectl(
            "set", "image", "deployment/mixtral-worker", "-n", ns, "engine=registry.invalid/not-ours:1"
        )
        eventually(
            lambda: worker()["spec"]["template"]["spec"]["containers"][0]["image"] == image,
            timeout=30,
            what="the rendered image again",
        )
        wait_ready(cluster, ns, "mixtral")
        time.sleep(2 * RESYNC_S)  # resyncs: each finds nothing to put back
        messages = restored()[before:]
        assert len(messages) == 2, messages
        assert any("spec.replicas: 1, rendered 2" in m for m in messages), messages
        assert any("not-ours" in m for m in messages), messages

    def test_a_name_another_object_holds_is_refused_not_adopted(
        self, cluster: Cluster, namespace: str
    ) -> None:
        # MD mixtral-worker's API Service would be named mixtral-worker: mixtral's worker Service.
        ns, other = namespace, "mixtral-worker"
        theirs = operator_fields(get_json(cluster, "service", "mixtral-worker", "-n", ns))
        spec = yaml.safe_load(MIXTRAL.read_text())
        spec["metadata"]["name"] = other
        cluster.kubectl("apply", "-n", ns, "-f", "-", stdin=json.dumps(spec))
        try:
            eventually(
                lambda: condition(md(cluster, ns, other), "Ready").get("reason") == "NameTaken",
                timeout=30,
                what="NameTaken",
            )
            message = condition(md(cluster, ns, other), "Ready")["message"]
            assert f"Service {ns}/mixtral-worker (owned by ModelDeployment mixtral)" in message
            time.sleep(2 * RESYNC_S)
            assert not children(cluster, ns, other), "nothing applied"
            assert operator_fields(get_json(cluster, "service", "mixtral-worker", "-n", ns)) == theirs
            wait_ready(cluster, ns, "mixtral")
        finally:
            delete_and_wait_gone(cluster, ns, other)

    def test_operator_killed_mid_reconcile_converges_without_duplicates(
        self, cluster: Cluster, namespace: str, operator: OperatorProcess, record_property: RecordProperty
    ) -> None:
        ns = namespace
        # Without a router first, so that the change below creates children as well as scaling one.
        patch_md(cluster, ns, "mixtral", {"spec": {"router": {"replicas": 0}}})
        eventually(
            lambda: set(children(cluster, ns, "mixtral")) == WITHOUT_ROUTER, timeout=60, what="router pruned"
        )
        wait_ready(cluster, ns, "mixtral")
        # Kill it as soon as it has started writing for this change.
        before = len(operator.writes())
        patch_md(
            cluster,
            ns,
            "mixtral",
            {"spec": {"roles": {"worker": {"replicas": 3}}, "router": {"replicas": 1}}},
        )
        eventually(lambda: len(operator.writes()) > before, timeout=60, what="a first write", interval=0.05)
        operator.kill()
        killed_at = time.monotonic()
        restart(operator)
        obj = wait_ready(cluster, ns, "mixtral", timeout=90)
        ready_s = time.monotonic() - killed_at
        assert obj["status"]["roles"]["worker"] == {"replicas": 3, "ready": 3}
        assert set(children(cluster, ns, "mixtral")) == MIXTRAL_CHILDREN
        pods = running_pods(cluster, ns, f"{LABEL}=mixtral,kubemoe.io/role=worker")
        assert len(pods) == 3
        record(
            record_property,
            Outcome(
                fault="the operator SIGKILLed mid-reconcile (after its first write of a change)",
                client_saw="`kubectl get md`: Ready again with the change once restarted",
                lost=f"no child lost or duplicated ({len(MIXTRAL_CHILDREN)} children, {len(pods)} workers)",
                recover_s=ready_s,
            ),
        )

    def test_only_the_lease_holder_reconciles(
        self,
        cluster: Cluster,
        namespace: str,
        operator: OperatorProcess,
        tmp_path: Path,
        record_property: RecordProperty,
    ) -> None:
        ns = namespace
        standby = OperatorProcess(operator.cluster, log=tmp_path / "standby.log", args=operator.args)
        standby.start()
        try:
            eventually(lambda: "waiting for lease" in standby.text(), timeout=60, what="the standby to wait")
            patch_md(cluster, ns, "mixtral", {"spec": {"roles": {"worker": {"replicas": 3}}}})
            wait_ready(cluster, ns, "mixtral")
            assert "leading as" not in standby.text()
            assert standby.writes() == []

            operator.stop()  # a clean stop hands the lease over at once
            eventually(lambda: "leading as" in standby.text(), timeout=60, what="the standby to lead")
            patch_md(cluster, ns, "mixtral", {"spec": {"roles": {"worker": {"replicas": 1}}}})
            obj = wait_ready(cluster, ns, "mixtral")
            assert obj["status"]["roles"]["worker"] == {"replicas": 1, "ready": 1}
            assert standby.writes()

            # Failover: the leader SIGKILLed; the other takes over once the lease (4 s here) expires.
            restart_waiting = operator.text().count("waiting for lease")
            operator.start()
            eventually(
                lambda: operator.text().count("waiting for lease") > restart_waiting,
                timeout=60,
                what="the old leader to wait as the standby",
            )
            led = operator.text().count("leading as")
            standby.kill()
            killed_at = time.monotonic()
            eventually(lambda: operator.text().count("leading as") > led, timeout=60, what="failover")
            failover_s = time.monotonic() - killed_at
            patch_md(cluster, ns, "mixtral", {"spec": {"roles": {"worker": {"replicas": 2}}}})
            obj = wait_ready(cluster, ns, "mixtral")
            assert obj["status"]["roles"]["worker"] == {"replicas": 2, "ready": 2}
            record(
                record_property,
                Outcome(
                    fault="the leading operator SIGKILLed beside a standby (leader failover)",
                    client_saw=(
                        f"the standby led {failover_s:.1f} s later (lease 4 s here, --lease-seconds) "
                        "and reconciled the next change; the standby had written nothing while it waited"
                    ),
                    lost="none: specs are reconciled from the API server, not held in memory",
                    recover_s=time.monotonic() - killed_at,
                ),
            )
        finally:
            standby.stop()
            if not operator.alive():
                restart(operator)
