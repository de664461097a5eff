"""Rendered children for every example, against golden files (UPDATE_GOLDEN=1 rewrites them),
and the rules every rendering keeps: args lists, owner refs, labels, secrets only by reference."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemoe_operator.api.labels import ANNOTATION_HASH, LABEL_DEPLOYMENT, LABEL_ROLE
from kubemoe_operator.api.manifest import load_manifest, parse_manifest
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render import Owner, render
from kubemoe_operator.render.workloads import initial_replicas
from tests.operator.helpers import BASE, EXAMPLES, GOLDEN, REPO

IMAGE = "kubemoe/kubemoe-runtime:test"
UID = "00000000-0000-4000-8000-000000000000"
CASES = [*EXAMPLES, REPO / "e2e" / "manifests" / "mixtral-h200.yaml"]


def _render(path: Path) -> list[dict[str, Any]]:
    md = load_manifest(path)
    plan = plan_manifest(md)
    owner = Owner(name=md.metadata.name, namespace="ns", uid=UID)
    return render(spec=md.spec, plan=plan, owner=owner, image=IMAGE)


def _render_data(**model: Any) -> list[dict[str, Any]]:
    data = json.loads(json.dumps(BASE))
    data["spec"]["model"].update(model)
    md = parse_manifest(data)
    return render(
        spec=md.spec, plan=plan_manifest(md), owner=Owner(name="t", namespace="ns", uid=UID), image=IMAGE
    )


def _containers(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for obj in objs:
        spec = obj.get("spec", {})
        templates = []
        if obj["kind"] == "Deployment":
            templates.append(spec["template"])
        if obj["kind"] == "LeaderWorkerSet":
            lwt = spec["leaderWorkerTemplate"]
            templates += [lwt["leaderTemplate"], lwt["workerTemplate"]]
        for t in templates:
            out += t["spec"]["containers"]
    return out


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_render_matches_golden(path: Path) -> None:
    objs = _render(path)
    golden = GOLDEN / "render" / f"{path.stem}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(json.dumps(objs, indent=2) + "\n")
    assert objs == json.loads(golden.read_text())


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_every_child_is_owned_and_labelled(path: Path) -> None:
    objs = _render(path)
    name = load_manifest(path).metadata.name
    for obj in objs:
        meta = obj["metadata"]
        assert meta["namespace"] == "ns"
        assert meta["labels"][LABEL_DEPLOYMENT] == name
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubemoe-operator"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "kubemoe.io/v1alpha1",
                "kind": "ModelDeployment",
                "name": name,
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert ANNOTATION_HASH not in meta.get("annotations", {})
    for container in _containers(objs):
        assert isinstance(container["args"], list)
        assert all(isinstance(a, str) for a in container["args"])
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_deepseek_roles_are_leader_worker_sets_filling_32_gpus() -> None:
    objs = _render(next(p for p in EXAMPLES if p.stem == "deepseek-v3"))
    lws = {o["metadata"]["name"]: o for o in objs if o["kind"] == "LeaderWorkerSet"}
    assert set(lws) == {"deepseek-v3-prefill", "deepseek-v3-decode"}
    gpus = 0
    for obj in lws.values():
        spec = obj["spec"]
        tmpl = spec["leaderWorkerTemplate"]
        assert (spec["replicas"], tmpl["size"], tmpl["restartPolicy"]) == (1, 2, "RecreateGroupOnPodRestart")
        for t in (tmpl["leaderTemplate"], tmpl["workerTemplate"]):
            gpus += (
                int(t["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * spec["replicas"]
            )
        worker_args = tmpl["workerTemplate"]["spec"]["containers"][0]["args"]
        assert "$(LWS_LEADER_ADDRESS)" in worker_args
        worker = tmpl["workerTemplate"]["spec"]["containers"][0]
        assert {"startupProbe", "livenessProbe", "readinessProbe"} <= worker.keys(), "workers are probed too"
    assert gpus == 32
    kinds = [o["kind"] for o in objs]
    assert kinds.index("Service") < kinds.index("LeaderWorkerSet"), "the LWS subdomain Service comes first"


def test_tiny_cpu_example_requests_cpu_and_no_gpu() -> None:
    objs = _render(next(p for p in EXAMPLES if p.stem == "tiny-moe"))
    for container in _containers(objs):
        assert not any("nvidia.com" in k for k in container["resources"].get("requests", {}))


def test_colocated_without_router_points_the_front_service_at_workers() -> None:
    data = json.loads(json.dumps(BASE))
    data["spec"]["serving"] = {"mode": "colocated"}
    data["spec"]["roles"] = {"worker": {"parallelism": {"data": 4}}}
    data["spec"]["router"] = {"replicas": 0}
    md = parse_manifest(data)
    objs = render(
        spec=md.spec, plan=plan_manifest(md), owner=Owner(name="t", namespace="ns", uid=UID), image=IMAGE
    )
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert ("Deployment", "t-router") not in names
    front = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "t")
    assert front["spec"]["selector"][LABEL_ROLE] == "worker"


def test_hf_token_and_cache_come_by_reference() -> None:
    objs = _render_data(credentialsSecret="hf-token", cacheClaim="hf-cache")
    for container in _containers(objs):
        if container["name"] != "engine":
            continue
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
        assert env["HF_HOME"]["value"] == "/cache/huggingface"
        assert {"name": "hf-cache", "mountPath": "/cache"} in container["volumeMounts"]


def test_s3_credentials_never_land_in_args_or_configmaps() -> None:
    objs = _render_data(source="s3://bucket/qwen3", credentialsSecret="s3-creds")
    text = json.dumps([o for o in objs if o["kind"] == "ConfigMap"])
    for container in _containers(objs):
        args = container["args"]
        if container["name"] == "engine":
            assert args[args.index("--load-format") + 1] == "runai_streamer"
            aws = [e for e in container["env"] if e["name"].startswith("AWS_")]
            env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in aws}
            assert env["AWS_ACCESS_KEY_ID"] == {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}
            assert env["AWS_SESSION_TOKEN"]["optional"] is True
            assert all("value" not in e for e in aws)
        text += json.dumps(args)
    assert "s3-creds" not in text
    assert "AWS_" not in text


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_engine_pods_give_the_runtime_its_metric_labels(path: Path) -> None:
    """deployment and group from the environment, role and rank from the flags: what the
    autoscaler's queries select on (autoscale/signals.py)."""
    objs = _render(path)
    name = load_manifest(path).metadata.name
    for obj in objs:
        if obj["kind"] == "LeaderWorkerSet":
            lwt = obj["spec"]["leaderWorkerTemplate"]
            templates = [lwt["leaderTemplate"], lwt["workerTemplate"]]
            group = "metadata.labels['leaderworkerset.sigs.k8s.io/group-index']"
        elif obj["kind"] == "Deployment" and obj["metadata"]["labels"][LABEL_ROLE] != "router":
            templates = [obj["spec"]["template"]]
            group = "metadata.name"
        else:
            continue
        for template in templates:
            (container,) = template["spec"]["containers"]
            env = {e["name"]: e for e in container["env"]}
            assert env["KUBEMOE_DEPLOYMENT"]["value"] == name
            assert env["KUBEMOE_GROUP"]["valueFrom"]["fieldRef"]["fieldPath"] == group
            args = container["args"]
            assert args[args.index("--role") + 1] == obj["metadata"]["labels"][LABEL_ROLE]


@pytest.mark.parametrize(
    ("example", "role", "kind"),
    [("deepseek-v3", "decode", "LeaderWorkerSet"), ("mixtral-8x7b", "worker", "Deployment")],
)
def test_a_role_an_external_scaler_owns_renders_without_replicas(example: str, role: str, kind: str) -> None:
    """autoscaling.mode external: the workload carries no spec.replicas (the operator's apply never
    names it); the count to create it with is the spec's, in initial_replicas."""
    data = yaml.safe_load((REPO / "examples" / f"{example}.yaml").read_text())
    data["spec"]["roles"][role].update(replicas=3, autoscaling={"mode": "external"})
    md = parse_manifest(data)
    plan = plan_manifest(md)
    owner = Owner(name="t", namespace="ns", uid=UID)
    workloads = {
        o["metadata"]["labels"][LABEL_ROLE]: o
        for o in render(spec=md.spec, plan=plan, owner=owner, image=IMAGE)
        if o["kind"] in ("LeaderWorkerSet", "Deployment")
    }
    assert workloads[role]["kind"] == kind
    assert "replicas" not in workloads[role]["spec"]
    assert all("replicas" in w["spec"] for r, w in workloads.items() if r != role), "the others keep theirs"
    assert initial_replicas(spec=md.spec, plan=plan, owner="t") == {(kind, f"t-{role}"): 3}


def test_the_external_scaling_examples_hpa_targets_the_workload_the_operator_renders() -> None:
    """examples/autoscaling-external: the HPA's scaleTargetRef names the decode workload (kind,
    apiVersion and name) that the ModelDeployment renders, without spec.replicas."""
    folder = REPO / "examples" / "autoscaling-external"
    md = load_manifest(folder / "modeldeployment.yaml")
    hpa = yaml.safe_load((folder / "hpa.yaml").read_text())
    owner = Owner(name=md.metadata.name, namespace="ns", uid=UID)
    objs = render(spec=md.spec, plan=plan_manifest(md), owner=owner, image=IMAGE)
    target = hpa["spec"]["scaleTargetRef"]
    (workload,) = [o for o in objs if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
    assert workload["apiVersion"] == target["apiVersion"]
    assert workload["metadata"]["labels"][LABEL_ROLE] == "decode"
    assert "replicas" not in workload["spec"]
    assert hpa["apiVersion"] == "autoscaling/v2"


def test_the_router_rolls_out_new_before_old_and_serving_roles_never_surge() -> None:
    """A one-replica router stopped before its replacement is ready empties the front Service: it surges
    (CPU only); serving roles never do (accelerators are rarely spare)."""
    children = _render(REPO / "examples" / "tiny-moe.yaml")
    rolling = {
        c["metadata"]["name"]: c["spec"]["strategy"]["rollingUpdate"]
        for c in children
        if c["kind"] == "Deployment"
    }
    assert rolling.pop("tiny-moe-router") == {"maxSurge": 1, "maxUnavailable": 0}
    assert rolling  # the serving roles' own Deployments
    assert all(r == {"maxSurge": 0, "maxUnavailable": 1} for r in rolling.values()), rolling
