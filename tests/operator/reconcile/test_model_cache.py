"""model.cache in reconcile() against the in-memory API (memory_kube.py): the serving workloads wait
for the fill Job (first start), status.cache and Ready carry its progress and its failure, and a new
source fills while the running groups are kept, not pruned. The fill pod's GET /progress is a stand-in
function here (no pod runs in this test); runtime/kubemoe_runtime's fill-cache command serves the real
one, and the real-node e2e reads it through the operator."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import yaml

from kubemoe_operator.api.status import ModelCacheStatus
from kubemoe_operator.catalog import load_catalog
from kubemoe_operator.kube.client import RejectedError
from kubemoe_operator.reconcile.model_cache import describe, progress_fields
from kubemoe_operator.reconcile.reconcile import ReconcileContext, reconcile
from kubemoe_operator.reconcile.status import REASON_CACHE_FAILED, REASON_CACHING
from tests.operator.helpers import REPO
from tests.operator.reconcile.memory_kube import MemoryKube

NS, UID, NAME = "team", "md-uid", "qwen3-30b-cached"
SPEC = yaml.safe_load((REPO / "examples" / "qwen3-30b-a3b-model-cache.yaml").read_text())["spec"]
MIXTRAL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
PROGRESS = {"phase": "downloading", "files": 3, "filesTotal": 9, "bytes": 3 << 30, "bytesTotal": 12 << 30}


async def read_pod(ip: str, port: int, path: str) -> Mapping[str, Any] | None:
    return PROGRESS if (ip, port, path) == ("10.0.0.7", 8080, "/progress") else None


CONTEXT = ReconcileContext(catalog=load_catalog(), image="runtime:test", read_pod=read_pod)


async def run(kube: MemoryKube, spec: dict[str, Any] | None = None) -> None:
    body = {
        "metadata": {"name": NAME, "namespace": NS, "uid": UID, "generation": 1},
        "spec": copy.deepcopy(spec or SPEC),
        "status": copy.deepcopy(kube.statuses.get((NS, NAME), {})),
    }
    await reconcile(kube=kube, body=body, context=CONTEXT)


def status(kube: MemoryKube) -> dict[str, Any]:
    return kube.statuses[(NS, NAME)]


def ready(kube: MemoryKube) -> dict[str, Any]:
    return next(c for c in status(kube)["conditions"] if c["type"] == "Ready")


def job(kube: MemoryKube) -> dict[str, Any]:
    (found,) = [o for (k, _, _), o in kube.objects.items() if k == "Job"]
    return found


def finish(kube: MemoryKube, *, succeeded: bool) -> None:
    done = copy.deepcopy(job(kube))
    kind = "Complete" if succeeded else "Failed"
    done["status"] = {"conditions": [{"type": kind, "status": "True"}], "succeeded": 1 if succeeded else 0}
    kube.put(done)


def fill_pod(kube: MemoryKube, *, running: bool = True, message: str | None = None) -> None:
    name = job(kube)["metadata"]["name"]
    state: dict[str, Any] = {"running": {}}
    if message is not None:
        state = {"terminated": {"exitCode": 1, "message": f"downloading...\n{message}\n"}}
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{name}-abcde",
                "namespace": NS,
                "labels": {"kubemoe.io/deployment": NAME, "kubemoe.io/role": "model-cache", "job-name": name},
            },
            "status": {
                "phase": "Running" if running else "Failed",
                "podIP": "10.0.0.7",
                "containerStatuses": [{"name": "fill", "state": state}],
            },
        }
    )


def workloads(kube: MemoryKube) -> set[str]:
    return {n for k, n in kube.kinds(NS) if k in ("Deployment", "LeaderWorkerSet")}


async def test_the_groups_wait_for_the_fill_and_status_shows_its_progress() -> None:
    kube = MemoryKube()
    await run(kube)
    assert workloads(kube) == {f"{NAME}-router"}  # the router may start; the workers wait
    assert job(kube)["metadata"]["name"].startswith(f"{NAME}-model-cache-")
    assert (ready(kube)["status"], ready(kube)["reason"]) == ("False", REASON_CACHING)
    assert status(kube)["cache"]["phase"] == "Filling"

    fill_pod(kube)
    await run(kube)
    cache = status(kube)["cache"]
    assert (cache["bytes"], cache["bytesTotal"], cache["files"], cache["filesTotal"]) == (
        3 << 30,
        12 << 30,
        3,
        9,
    )
    assert "3.0 GiB of 12.0 GiB (25%), 3/9 files" in ready(kube)["message"]

    finish(kube, succeeded=True)
    await run(kube)
    assert f"{NAME}-worker" in workloads(kube)
    assert status(kube)["cache"]["phase"] == "Filled"
    assert ready(kube)["reason"] != REASON_CACHING


async def test_a_failed_fill_says_why_and_starts_nothing() -> None:
    kube = MemoryKube()
    await run(kube)
    fill_pod(kube, running=False, message="hf://Qwen/Qwen3-30B-A3B: 401 Unauthorized. Fix: set HF_TOKEN")
    finish(kube, succeeded=False)
    await run(kube)
    assert (ready(kube)["status"], ready(kube)["reason"]) == ("False", REASON_CACHE_FAILED)
    assert "401 Unauthorized. Fix: set HF_TOKEN" in ready(kube)["message"]
    assert status(kube)["phase"] == "Failed"
    assert f"{NAME}-worker" not in workloads(kube)


async def filled() -> MemoryKube:
    """A deployment whose first fill succeeded and whose groups were then created."""
    kube = MemoryKube()
    await run(kube)
    finish(kube, succeeded=True)
    await run(kube)
    return kube


async def test_a_new_source_fills_while_the_running_groups_are_kept() -> None:
    kube = await filled()
    before = copy.deepcopy(kube.get("Deployment", NS, f"{NAME}-worker"))
    old_job = job(kube)["metadata"]["name"]

    spec = copy.deepcopy(SPEC)
    spec["model"]["source"] = "hf://Qwen/Qwen3-30B-A3B-Instruct-2507"
    await run(kube, spec)
    assert job(kube)["metadata"]["name"] != old_job  # the old Job pruned, a new one filling
    assert kube.get("Deployment", NS, f"{NAME}-worker") == before  # neither pruned nor rolled yet
    assert ready(kube)["reason"] == REASON_CACHING

    finish(kube, succeeded=True)
    await run(kube, spec)
    after = kube.get("Deployment", NS, f"{NAME}-worker")
    assert "kubemoe-cache/Qwen/Qwen3-30B-A3B-Instruct-2507" in str(after["spec"]["template"])


async def test_a_refill_keeps_the_router_and_a_workload_whose_kind_changes() -> None:
    # a new model name and data 2 on one-GPU pods (Deployment -> LeaderWorkerSet) while the new
    # source fills: the router kept serving the old name to the old worker, which was not pruned
    kube = await filled()
    router = copy.deepcopy(kube.get("Deployment", NS, f"{NAME}-router"))
    worker = copy.deepcopy(kube.get("Deployment", NS, f"{NAME}-worker"))

    spec = copy.deepcopy(SPEC)
    spec["model"] = {**spec["model"], "name": MIXTRAL, "source": f"hf://{MIXTRAL}"}
    spec["roles"]["worker"]["parallelism"] = {"data": 2, "tensor": 1, "expert": 2}
    await run(kube, spec)
    assert ready(kube)["reason"] == REASON_CACHING
    assert kube.get("Deployment", NS, f"{NAME}-router") == router
    assert kube.get("Deployment", NS, f"{NAME}-worker") == worker
    assert workloads(kube) == {f"{NAME}-router", f"{NAME}-worker"}

    finish(kube, succeeded=True)
    await run(kube, spec)
    assert MIXTRAL in str(kube.get("Deployment", NS, f"{NAME}-router")["spec"])
    assert f"{NAME}-worker" not in {n for k, n in kube.kinds(NS) if k == "Deployment"}
    assert f"{NAME}-worker" in {n for k, n in kube.kinds(NS) if k == "LeaderWorkerSet"}


class ImmutableClaims(MemoryKube):
    """A claim's size and class cannot change once it exists, as the API server answers for a bound
    claim (422). MemoryKube stores whatever it is given; the real refusal is the API server's, and
    this stands in for it, as a bound claim needs a provisioner the test cluster does not have."""

    async def apply(self, obj: dict[str, Any], **kw: Any) -> dict[str, Any]:
        key = (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"])
        claim = obj["kind"] == "PersistentVolumeClaim" and key in self.objects
        if claim and obj["spec"] != self.objects[key]["spec"]:
            raise RejectedError(f"PersistentVolumeClaim {key[2]}: 422 Invalid: spec: Forbidden: immutable")
        return await super().apply(obj, **kw)


async def test_a_refused_claim_change_does_not_stop_the_workloads() -> None:
    # shrinking model.cache.size (refused on a bound claim) with a new replica count in the same
    # edit: the claim's refusal stopped every apply after it, the autoscaler's replicas included
    kube = ImmutableClaims()
    spec = copy.deepcopy(SPEC)
    spec["model"]["cache"] = {"size": "200Gi"}
    await run(kube, spec)
    finish(kube, succeeded=True)
    await run(kube, spec)
    assert kube.get("Deployment", NS, f"{NAME}-worker")["spec"]["replicas"] == 4
    spec["model"]["cache"]["size"] = "100Gi"
    spec["roles"]["worker"]["replicas"] = 6
    await run(kube, spec)
    assert kube.get("Deployment", NS, f"{NAME}-worker")["spec"]["replicas"] == 6
    (claim,) = [o for (k, _, _), o in kube.objects.items() if k == "PersistentVolumeClaim"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"  # as it was
    assert ready(kube)["status"] == "False"
    assert "PersistentVolumeClaim" in ready(kube)["message"]
    assert "immutable" in ready(kube)["message"]


async def test_a_claim_change_the_api_refuses_is_not_reported_as_put_back() -> None:
    # an admin grew the bound claim (allowed); the render's smaller size cannot be applied (refused),
    # so no "Restored ... put back" event may say it was
    kube = ImmutableClaims()
    spec = copy.deepcopy(SPEC)
    spec["model"]["cache"] = {"size": "200Gi"}
    await run(kube, spec)
    (claim,) = [o for (k, _, _), o in kube.objects.items() if k == "PersistentVolumeClaim"]
    grown = copy.deepcopy(claim)
    grown["spec"]["resources"]["requests"]["storage"] = "300Gi"
    kube.put(grown)
    body = {
        "metadata": {"name": NAME, "namespace": NS, "uid": UID, "generation": 1},
        "spec": copy.deepcopy(spec),
        "status": copy.deepcopy(kube.statuses.get((NS, NAME), {})),
    }
    result = await reconcile(kube=kube, body=body, context=CONTEXT)
    assert not [d for d in result.decisions if getattr(d, "reason", None) == "Restored"]
    assert "PersistentVolumeClaim" in ready(kube)["message"]


def test_progress_from_the_pod_is_untrusted() -> None:
    hostile = {"bytes": -5, "bytesTotal": True, "files": 1e300, "filesTotal": "9", "extra": [1] * 3}
    assert progress_fields(hostile) == {}
    assert progress_fields(None) == {}
    assert progress_fields({"bytes": 7.0, "files": 2}) == {"bytes": 7, "files": 2}
    line = describe(ModelCacheStatus(phase="Filling", job="j", claim="c"))
    assert line == "filling the model cache in claim c (Job j): starting"
