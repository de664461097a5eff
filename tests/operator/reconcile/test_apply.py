"""Hash stamping, apply selection and prune selection, pure."""

from __future__ import annotations

from typing import Any

from kubemoe_operator.api.labels import ANNOTATION_HASH
from kubemoe_operator.reconcile.apply import content_hash, drift, needs_apply, select_prunable, stamped

UID = "u-1"


def obj(kind: str, name: str, *, owner: str = "m", uid: str = UID, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": {"kubemoe.io/deployment": owner},
        "ownerReferences": [{"uid": uid}],
    }
    meta.update(extra)
    return {"apiVersion": "v1", "kind": kind, "metadata": meta, "spec": {"x": 1}}


def test_hash_ignores_its_own_annotation_and_tracks_content() -> None:
    a = obj("Service", "s")
    s = stamped(a)
    assert s["metadata"]["annotations"][ANNOTATION_HASH] == content_hash(a) == content_hash(s)
    assert "annotations" not in a["metadata"], "stamping copies"
    b = obj("Service", "s")
    b["spec"]["x"] = 2
    assert content_hash(b) != content_hash(a)


def test_needs_apply() -> None:
    want = stamped(obj("Service", "s"))
    assert needs_apply(want, None)
    assert not needs_apply(want, want)
    edited = stamped(obj("Service", "s"))
    edited["metadata"]["annotations"][ANNOTATION_HASH] = "other"
    assert needs_apply(want, edited)
    assert needs_apply(want, {**want, "metadata": {**want["metadata"], "deletionTimestamp": "now"}})


def test_prune_selects_only_owned_labelled_undesired_children() -> None:
    observed = [
        obj("Service", "keep"),
        obj("Deployment", "m-router"),  # no longer desired -> pruned
        obj("PodDisruptionBudget", "m-router"),  # no longer desired -> pruned
        obj("Service", "other-owner", uid="u-2"),  # owned by another object
        obj("Service", "other-label", owner="n"),  # labelled for another deployment
        obj("ConfigMap", "going", deletionTimestamp="now"),  # already being deleted
    ]
    desired = [obj("Service", "keep"), obj("Deployment", "m-worker")]
    assert select_prunable(observed=observed, desired=desired, owner="m", uid=UID) == [
        ("Deployment", "m-router"),
        ("PodDisruptionBudget", "m-router"),
    ]


def test_same_name_other_kind_is_pruned() -> None:
    """A role moving from a LeaderWorkerSet to a Deployment keeps its name but changes kind."""
    observed = [obj("LeaderWorkerSet", "m-decode")]
    desired = [obj("Deployment", "m-decode")]
    assert select_prunable(observed=observed, desired=desired, owner="m", uid=UID) == [
        ("LeaderWorkerSet", "m-decode")
    ]


def test_child_kind_plurals_match_lightkube() -> None:
    from kubemoe_operator.kube.kinds import CHILD_KINDS, POD

    for kind in (*CHILD_KINDS, POD):
        assert kind.resource._api_info.plural == kind.plural
        assert kind.resource._api_info.resource.kind == kind.kind


def _deployment(replicas: int, cpu: Any = "500m", **container: Any) -> dict[str, Any]:
    c = {"name": "engine", "resources": {"requests": {"cpu": cpu}}, "env": [], **container}
    return {
        "metadata": {"name": "m-worker", "labels": {"a": "1"}, "ownerReferences": [{"uid": UID}]},
        "spec": {"replicas": replicas, "template": {"spec": {"containers": [c], "hostNetwork": False}}},
    }


def test_drift_names_what_someone_changed() -> None:
    want = _deployment(2)
    assert drift(want, _deployment(3)) == "spec.replicas: 3, rendered 2"  # kubectl scale
    edited = _deployment(2, image="evil")
    want_image = _deployment(2, image="ours")
    assert drift(want_image, edited) == "spec.template.spec.containers[0].image: 'evil', rendered 'ours'"
    more = _deployment(2)
    more["spec"]["template"]["spec"]["containers"].append({"name": "sidecar"})
    assert str(drift(want, more)).startswith("spec.template.spec.containers:")
    relabelled = _deployment(2)
    relabelled["metadata"]["labels"]["a"] = "2"
    assert drift(want, relabelled) == "metadata.labels.a: '2', rendered '1'"


def test_drift_ignores_what_the_api_server_adds_or_normalises() -> None:
    want = _deployment(2, cpu=0.5)
    live = _deployment(2, cpu="500m", terminationMessagePath="/dev/termination-log")
    del live["spec"]["template"]["spec"]["containers"][0]["env"]  # empty: omitted by the server
    del live["spec"]["template"]["spec"]["hostNetwork"]  # false: omitted too
    live["metadata"]["labels"]["added-by-someone"] = "x"
    live["metadata"]["ownerReferences"].append({"uid": "another-owner"})
    live["spec"]["progressDeadlineSeconds"] = 600
    assert drift(want, live) is None
    assert drift(_deployment(2, cpu=1), _deployment(2, cpu="1")) is None
    assert drift(_deployment(2, cpu="1Gi"), _deployment(2, cpu="1G")) is not None


def test_drift_compares_quantities_exactly() -> None:
    # the API server stores 0.7 as 700m; as floats those differ (0.7 against 0.7000000000000001),
    # which re-applied the object on every reconcile with a false "changed outside the spec"
    for milli in range(50, 10_000, 50):
        decimal = f"{milli / 1000:g}"
        assert drift(_deployment(2, cpu=decimal), _deployment(2, cpu=f"{milli}m")) is None, decimal
        assert drift(_deployment(2, cpu=milli / 1000), _deployment(2, cpu=f"{milli}m")) is None, milli
    assert drift(_deployment(2, cpu="0.7"), _deployment(2, cpu="701m")) is not None
    assert drift(_deployment(2, cpu="0.0001"), _deployment(2, cpu="1m")) is None  # rounded up to 1m
    assert drift(_deployment(2, cpu="1.5Gi"), _deployment(2, cpu="1536Mi")) is None
