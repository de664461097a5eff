"""spec.roles.<role>.pod and spec.router.pod (issue #20): each field merged into the pods it belongs
to (a LeaderWorkerSet's leader and worker templates, a Deployment's pods, the router's) and no other,
the operator's own parts protected, each refusal naming the field in Python and in the CRD's CEL."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemoe_operator.api.lmcache import HASH_SEED, STORE_VARIABLES
from kubemoe_operator.api.manifest import load_manifest, parse_manifest
from kubemoe_operator.api.pod_template import (
    RESERVED_ENV_NAMES,
    RESERVED_ENV_PREFIXES,
    RESERVED_MOUNT_PATHS,
    RESERVED_VOLUMES,
)
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.gen.crd import crd
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render import Owner, render
from tests.operator.helpers import BASE, EXAMPLES, REPO, pod_templates

OWNER = Owner(name="t", namespace="ns", uid="u")
ACCELERATOR_TERM = {
    "key": "nvidia.com/gpu.product",
    "operator": "In",
    "values": ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe"],
}
WIDE_DECODE = {"parallelism": {"data": 16}}  # 16 ranks on 8-GPU pods: a LeaderWorkerSet of 2 pods

DECODE_POD: dict[str, Any] = {
    "annotations": {"k8s.v1.cni.cncf.io/networks": "rdma-net", "mesh/inject": "role"},
    "labels": {"fabric": "ib"},
    "env": [
        {"name": "NCCL_IB_HCA", "value": "mlx5"},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ],
    "envFrom": [{"configMapRef": {"name": "nccl-tuning"}, "prefix": "NCCL_"}],
    "volumes": [
        {"name": "scratch", "emptyDir": {"sizeLimit": "10Gi"}},
        {"name": "ib", "hostPath": {"path": "/dev/infiniband"}},
    ],
    "volumeMounts": [
        {"name": "scratch", "mountPath": "/scratch"},
        {"name": "ib", "mountPath": "/dev/infiniband"},
    ],
    "nodeSelector": {"fabric.example.com/ib": "hdr"},
    "tolerations": [{"key": "rdma", "operator": "Exists", "effect": "NoSchedule"}],
    "priorityClassName": "serving-high",
    "serviceAccountName": "decode-sa",
}


def _data(**spec: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["spec"].update(copy.deepcopy(spec))
    return data


def _render(data: dict[str, Any]) -> list[dict[str, Any]]:
    md = parse_manifest(data)
    return render(spec=md.spec, plan=plan_manifest(md), owner=OWNER, image="img", pod_monitor=True)


def _templates_of(objs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return pod_templates([o for o in objs if o["metadata"]["name"] == name])


def _refused(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ManifestError) as err:
        parse_manifest(data)
    return [p.field for p in err.value.problems]


def _rules(path: str) -> list[str]:
    node = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in path.split("."):
        node = node["properties"][part]
    return [r["rule"] for r in node.get("x-kubernetes-validations", [])]


def test_a_roles_pod_template_reaches_its_leader_and_worker_templates_and_no_other_pod() -> None:
    objs = _render(
        _data(
            roles={"prefill": {"parallelism": {"data": 2}}, "decode": {**WIDE_DECODE, "pod": DECODE_POD}},
            pod={"annotations": {"mesh/inject": "all", "cost": "ml"}},
            scheduling={"tolerations": [{"key": "gpu", "operator": "Exists"}], "priorityClassName": "low"},
        )
    )
    (lws,) = [o for o in objs if o["kind"] == "LeaderWorkerSet"]
    decode = _templates_of(objs, "t-decode")
    assert lws["metadata"]["name"] == "t-decode"
    assert len(decode) == 2
    for template in decode:
        meta, spec = template["metadata"], template["spec"]
        (container,) = spec["containers"]
        assert meta["annotations"] == {
            "mesh/inject": "role",
            "cost": "ml",
            "k8s.v1.cni.cncf.io/networks": "rdma-net",
        }
        assert meta["labels"]["fabric"] == "ib"
        assert meta["labels"]["kubemoe.io/role"] == "decode"
        names = [e["name"] for e in container["env"]]
        assert names[-2:] == ["NCCL_IB_HCA", "POD_IP"]
        assert "KUBEMOE_DEPLOYMENT" in names[:-2]
        assert container["env"][-1] == DECODE_POD["env"][1]
        assert container["envFrom"] == DECODE_POD["envFrom"]
        assert container["volumeMounts"][-2:] == DECODE_POD["volumeMounts"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"][:-2]
        assert spec["volumes"][-2:] == DECODE_POD["volumes"]
        assert spec["nodeSelector"] == {"fabric.example.com/ib": "hdr"}
        assert spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == {
            "nodeSelectorTerms": [{"matchExpressions": [ACCELERATOR_TERM]}]
        }
        assert [t["key"] for t in spec["tolerations"]] == ["gpu", "rdma"]  # appended to scheduling's
        assert spec["priorityClassName"] == "serving-high"  # replaces scheduling's
        assert spec["serviceAccountName"] == "decode-sa"
    for other in [*_templates_of(objs, "t-prefill"), *_templates_of(objs, "t-router")]:
        meta, spec = other["metadata"], other["spec"]
        assert meta["annotations"] == {"mesh/inject": "all", "cost": "ml"}
        assert "fabric" not in meta["labels"]
        assert "envFrom" not in spec["containers"][0]
        assert "serviceAccountName" not in spec
        assert not {"scratch", "ib"} & {v["name"] for v in spec.get("volumes", [])}
        assert [t["key"] for t in spec["tolerations"]] == ["gpu"]
        assert spec["priorityClassName"] == "low"
        assert "fabric.example.com/ib" not in spec.get("nodeSelector", {})


def test_a_one_pod_role_gets_its_template_in_its_deployment() -> None:
    objs = _render(_data(roles={"prefill": {"parallelism": {"data": 2}, "pod": DECODE_POD}, "decode": {}}))
    (template,) = _templates_of(objs, "t-prefill")
    assert template["spec"]["serviceAccountName"] == "decode-sa"
    assert template["spec"]["containers"][0]["env"][-2]["name"] == "NCCL_IB_HCA"
    (decode,) = _templates_of(objs, "t-decode")
    assert "serviceAccountName" not in decode["spec"]


def test_the_routers_pod_template_reaches_the_router_only() -> None:
    router_pod = {
        "env": [{"name": "LOG_FORMAT", "value": "json"}],
        "volumes": [{"name": "ca", "configMap": {"name": "corp-ca"}}],
        "volumeMounts": [{"name": "ca", "mountPath": "/etc/ssl/corp", "readOnly": True}],
        "nodeSelector": {"pool": "cpu"},
        "labels": {"tier": "front"},
    }
    objs = _render(_data(router={"replicas": 1, "apiKeySecret": "keys", "pod": router_pod}))
    (router,) = _templates_of(objs, "t-router")
    (container,) = router["spec"]["containers"]
    assert container["env"][-1] == {"name": "LOG_FORMAT", "value": "json"}
    assert [m["name"] for m in container["volumeMounts"]] == ["api-keys", "ca"]
    assert [v["name"] for v in router["spec"]["volumes"]] == ["api-keys", "ca"]
    assert router["spec"]["nodeSelector"] == {"pool": "cpu"}  # and no accelerator affinity
    assert "affinity" not in router["spec"]
    for template in [*_templates_of(objs, "t-prefill"), *_templates_of(objs, "t-decode")]:
        assert "tier" not in template["metadata"]["labels"]
        assert "LOG_FORMAT" not in [e["name"] for e in template["spec"]["containers"][0]["env"]]


def test_node_affinity_is_anded_with_the_accelerators_never_replacing_it() -> None:
    affinity: dict[str, Any] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "rack", "operator": "In", "values": ["a"]}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]},
                ]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 10, "preference": {"matchExpressions": [{"key": "zone", "operator": "Exists"}]}}
            ],
        },
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {"matchLabels": {"kubemoe.io/role": "decode"}},
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        },
    }
    objs = _render(
        _data(roles={"prefill": {"parallelism": {"data": 2}}, "decode": {"pod": {"affinity": affinity}}})
    )
    (decode,) = _templates_of(objs, "t-decode")
    got = decode["spec"]["affinity"]
    terms = got["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [
        {"matchExpressions": [{"key": "rack", "operator": "In", "values": ["a"]}, ACCELERATOR_TERM]},
        {
            "matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}],
            "matchExpressions": [ACCELERATOR_TERM],
        },
    ]
    assert (
        got["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        == (affinity["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"])
    )
    assert got["podAntiAffinity"] == affinity["podAntiAffinity"]
    # pod affinity alone: the operator's node affinity is still required
    objs = _render(
        _data(
            roles={
                "prefill": {"parallelism": {"data": 2}},
                "decode": {"pod": {"affinity": {"podAntiAffinity": affinity["podAntiAffinity"]}}},
            }
        )
    )
    (decode,) = _templates_of(objs, "t-decode")
    required = decode["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required == {"nodeSelectorTerms": [{"matchExpressions": [ACCELERATOR_TERM]}]}


def test_a_role_node_selector_naming_the_accelerator_label_is_the_users_choice() -> None:
    pod = {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-PCIe"}}
    objs = _render(_data(roles={"prefill": {"parallelism": {"data": 2}}, "decode": {"pod": pod}}))
    (decode,) = _templates_of(objs, "t-decode")
    assert decode["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-PCIe"}
    assert "affinity" not in decode["spec"]


def test_an_extended_resource_requested_only_is_limited_alike() -> None:
    resources = {"requests": {"rdma/hca": 1}}
    objs = _render(_data(roles={"prefill": {"parallelism": {"data": 2}}, "decode": {"resources": resources}}))
    (decode,) = _templates_of(objs, "t-decode")
    got = decode["spec"]["containers"][0]["resources"]
    assert got["requests"]["rdma/hca"] == "1"
    assert got["limits"]["rdma/hca"] == "1"
    assert got["limits"]["nvidia.com/gpu"] == got["requests"]["nvidia.com/gpu"]


@pytest.mark.parametrize(
    ("pod", "field"),
    [
        ({"env": [{"name": "KUBEMOE_GROUP", "value": "x"}]}, "spec.roles.decode.pod.env[0].name"),
        ({"env": [{"name": "LWS_WORKER_INDEX", "value": "0"}]}, "spec.roles.decode.pod.env[0].name"),
        (
            {"env": [{"name": "A", "value": "1"}, {"name": "HOME", "value": "/"}]},
            "spec.roles.decode.pod.env[1].name",
        ),
        ({"env": [{"name": "HF_TOKEN", "value": "x"}]}, "spec.roles.decode.pod.env[0].name"),
        (
            {"envFrom": [{"prefix": "KUBEMOE_", "secretRef": {"name": "s"}}]},
            "spec.roles.decode.pod.envFrom[0].prefix",
        ),
        ({"volumes": [{"name": "dshm", "emptyDir": {}}]}, "spec.roles.decode.pod.volumes[0].name"),
        (
            {
                "volumes": [{"name": "x", "emptyDir": {}}],
                "volumeMounts": [{"name": "x", "mountPath": "/dev/shm/big"}],
            },
            "spec.roles.decode.pod.volumeMounts[0].mountPath",
        ),
        (
            {
                "volumes": [{"name": "x", "emptyDir": {}}],
                "volumeMounts": [{"name": "x", "mountPath": "/mnt/models"}],
            },
            "spec.roles.decode.pod.volumeMounts[0].mountPath",
        ),
        (
            {"volumeMounts": [{"name": "model", "mountPath": "/m"}]},
            "spec.roles.decode.pod.volumeMounts[0].name",
        ),
        ({"labels": {"kubemoe.io/role": "x"}}, "spec.roles.decode.pod.labels[kubemoe.io/role]"),
        ({"volumes": [{"name": "x"}]}, "spec.roles.decode.pod.volumes.0"),
        (
            {"volumes": [{"name": "x", "emptyDir": {}, "hostPath": {"path": "/"}}]},
            "spec.roles.decode.pod.volumes.0",
        ),
        (
            {"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "x"}}}]},
            "spec.roles.decode.pod.env.0",
        ),
    ],
)
def test_what_the_operator_owns_is_refused_naming_the_field(pod: dict[str, Any], field: str) -> None:
    fields = _refused(_data(roles={"prefill": {"parallelism": {"data": 2}}, "decode": {"pod": pod}}))
    assert any(f.replace("[0]", ".0").startswith(field.replace("[0]", ".0")) for f in fields), fields


def test_the_crd_carries_the_same_refusals() -> None:
    rules = " ".join(_rules("spec.roles.decode.pod"))
    for prefix in RESERVED_ENV_PREFIXES:
        assert f"startsWith('{prefix}')" in rules
    for name in (*RESERVED_ENV_NAMES, *RESERVED_VOLUMES):
        assert f"'{name}'" in rules, name
    for path in RESERVED_MOUNT_PATHS:
        assert f"m.mountPath != '{path}'" in rules, path
        assert f"startsWith('{path}/')" in rules, path
    assert "self.volumes.exists(v, v.name == m.name)" in rules


def test_an_accelerator_in_a_roles_or_the_routers_resources_is_refused() -> None:
    roles = {
        "prefill": {"parallelism": {"data": 2}},
        "decode": {"resources": {"limits": {"nvidia.com/gpu": 4}}},
    }
    assert _refused(_data(roles=roles)) == ["spec.roles.decode.resources.limits[nvidia.com/gpu]"]
    router = {"replicas": 1, "resources": {"requests": {"nvidia.com/mig-1g.10gb": 1}}}
    assert _refused(_data(router=router)) == ["spec.router.resources.requests[nvidia.com/mig-1g.10gb]"]
    assert any("'nvidia.com/gpu'" in r for r in _rules("spec.roles.decode.resources"))


def test_a_service_account_on_sglangs_pd_router_is_refused_and_on_kubemoes_router_kept() -> None:
    sglang = yaml_spec(REPO / "examples" / "engines" / "sglang-deepseek-v3.yaml")
    sglang["spec"]["router"]["pod"] = {"serviceAccountName": "mine"}
    assert "spec.router.pod.serviceAccountName" in _refused(sglang)
    objs = _render(_data(router={"replicas": 1, "pod": {"serviceAccountName": "mine"}}))
    (router,) = _templates_of(objs, "t-router")
    assert router["spec"]["serviceAccountName"] == "mine"


def test_a_node_selector_contradicting_schedulings_is_refused() -> None:
    data = _data(
        roles={"prefill": {"parallelism": {"data": 2}}, "decode": {"pod": {"nodeSelector": {"pool": "b"}}}},
        scheduling={"nodeSelector": {"pool": "a"}},
    )
    assert _refused(data) == ["spec.roles.decode.pod.nodeSelector[pool]"]


def yaml_spec(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


ENGINE_EXAMPLES = sorted((REPO / "examples" / "engines").glob("*.yaml"))


@pytest.mark.parametrize("path", [*EXAMPLES, *ENGINE_EXAMPLES], ids=lambda p: p.stem)
def test_every_name_and_path_the_operator_renders_is_reserved(path: Path) -> None:
    """What the reserved lists protect is exactly what render writes: a new operator variable,
    volume or mount point must join them (api/spec.py), or a template could collide with it."""
    data = load_manifest(path).model_dump(by_alias=True, exclude_none=True, mode="json")
    for holder in [*data["spec"]["roles"].values(), data["spec"]["router"]]:
        pod = holder.pop("pod", None)  # the operator's own parts only, and LMCache's store (a must)
        if store := [e for e in (pod or {}).get("env", []) if e["name"] in STORE_VARIABLES]:
            holder["pod"] = {"env": store}
    md = parse_manifest(data)
    objs = render(spec=md.spec, plan=plan_manifest(md), owner=OWNER, image="img")
    sglang_pd = md.spec.engine.kind == "sglang" and md.spec.serving.mode == "disaggregated"
    if md.spec.router.replicas > 0 and not sglang_pd:  # the router's API keys volume too
        data["spec"]["router"]["apiKeySecret"] = "keys"
        keyed = parse_manifest(data)
        objs += render(spec=keyed.spec, plan=plan_manifest(keyed), owner=OWNER, image="img")
    for template in pod_templates(objs):
        spec = template["spec"]
        for volume in spec.get("volumes", []):
            assert volume["name"] in RESERVED_VOLUMES, volume
        for container in spec["containers"]:
            for var in container.get("env", []):
                name = var["name"]
                if name in (*STORE_VARIABLES, HASH_SEED):  # the spec's; a default a pod.env may replace
                    continue
                assert name.startswith(RESERVED_ENV_PREFIXES) or name in RESERVED_ENV_NAMES, name
            for mount in container.get("volumeMounts", []):
                path_ = mount["mountPath"]
                assert any(path_ == p or path_.startswith(p + "/") for p in RESERVED_MOUNT_PATHS), path_
