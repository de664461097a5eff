"""The in-cluster operator refuses a file:// source (a path only `kubemoe up`'s machine has) with a
condition that says to use pvc://, and creates nothing; `kubemoe plan` still accepts it."""

from __future__ import annotations

from typing import Any, cast

from lightkube import AsyncClient

from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.catalog import load_catalog
from kubemoe_operator.kube.client import Kube, Observed
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.reconcile.cluster_rules import REASON_SOURCE_NOT_IN_CLUSTER
from kubemoe_operator.reconcile.reconcile import ReconcileContext, reconcile
from tests.operator.helpers import BASE, EXAMPLES, manifest

TINY = next(p for p in EXAMPLES if p.stem == "tiny-moe")


class RecordingKube(Kube):
    """A Kube that records what the reconciler asks of it and owns nothing in the cluster."""

    def __init__(self) -> None:
        super().__init__(cast(AsyncClient, None), field_manager="kubemoe-operator")
        self.calls: list[str] = []
        self.status: dict[str, Any] | None = None

    async def observe(self, *, name: str, namespace: str, uid: str) -> Observed:
        self.calls.append("observe")
        return Observed()

    async def get_child(self, *, kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        return None  # an empty namespace: no name is taken

    async def pod_creation_events(self, namespace: str) -> list[dict[str, Any]]:
        return []

    async def create_once(self, obj: dict[str, Any]) -> None:
        self.calls.append(f"create {obj['kind']}")

    async def apply(
        self, obj: dict[str, Any], *, field_manager: str | None = None, force: bool = True
    ) -> dict[str, Any]:
        self.calls.append(f"apply {obj['kind']}")
        return obj

    async def apply_status(
        self,
        *,
        name: str,
        namespace: str,
        status: dict[str, Any],
        field_manager: str,
        resource_version: str | None = None,
    ) -> bool:
        self.calls.append("apply_status")
        self.status = status
        return True


def body(source: str) -> dict[str, Any]:
    spec = manifest(model={**BASE["spec"]["model"], "source": source}).spec
    return {
        "metadata": {"name": "t", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": spec.model_dump(by_alias=True, mode="json", exclude_none=True),
    }


async def test_a_file_source_is_refused_in_a_cluster_and_nothing_is_created() -> None:
    kube = RecordingKube()
    context = ReconcileContext(catalog=load_catalog(), image="img")
    result = await reconcile(kube=kube, body=body("file:///srv/models/qwen3"), context=context)
    assert kube.calls == ["apply_status"], "nothing observed, applied or pruned"
    assert kube.status is not None
    conditions = {c["type"]: c for c in kube.status["conditions"]}
    for type in ("Planned", "Ready"):
        assert (conditions[type]["status"], conditions[type]["reason"]) == (
            "False",
            REASON_SOURCE_NOT_IN_CLUSTER,
        )
        assert "spec.model.source" in conditions[type]["message"]
        assert "pvc://CLAIM/PATH" in conditions[type]["message"]
    assert kube.status["phase"] == "Failed"
    assert [(d.reason, d.warning) for d in result.decisions] == [(REASON_SOURCE_NOT_IN_CLUSTER, True)]


async def test_the_same_spec_from_a_claim_is_applied() -> None:
    kube = RecordingKube()
    context = ReconcileContext(catalog=load_catalog(), image="img")
    await reconcile(kube=kube, body=body("pvc://models/qwen3"), context=context)
    assert "observe" in kube.calls
    assert "apply Deployment" in kube.calls
    assert kube.calls.index("create Secret") < kube.calls.index("apply Deployment")  # the KV key first


def test_kubemoe_plan_still_accepts_a_file_source() -> None:
    md = load_manifest(TINY)
    assert md.spec.model.source.startswith("file://")
    assert plan_manifest(md).layout
