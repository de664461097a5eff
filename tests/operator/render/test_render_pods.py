"""What every serving pod carries: the images' user with a writable HOME and cache, requests from the
plan, a sized /dev/shm, probes fitted to a long weight load, the accelerator's node label, and
NIXL's side-channel host."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render import Owner, render
from kubemoe_operator.render.image_user import CACHE_DIR, HF_HOME, IMAGE_UID, RUNTIME_HOME
from kubemoe_operator.render.probes import HANDLER_WAIT_S
from kubemoe_runtime.engines.vllm.front import PROBE_TIMEOUT_S
from tests.operator.helpers import BASE

UID = "00000000-0000-4000-8000-000000000000"
GPU_LABEL = "nvidia.com/gpu.product"


def render_spec(**spec: Any) -> list[dict[str, Any]]:
    data = copy.deepcopy(BASE)
    for key, value in spec.items():
        data["spec"][key] = value
    md = parse_manifest(data)
    owner = Owner(name="t", namespace="ns", uid=UID)
    return render(spec=md.spec, plan=plan_manifest(md), owner=owner, image="img")


def with_roles(**roles: Any) -> dict[str, Any]:
    out: dict[str, Any] = copy.deepcopy(BASE["spec"]["roles"])
    for name, extra in roles.items():
        out[name].update(extra)
    return out


def serving_pods(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(role, pod spec) of every serving pod template (LWS leaders and workers, Deployments)."""
    out = []
    for obj in objs:
        role = obj["metadata"]["labels"].get("kubemoe.io/role")
        if obj["kind"] == "LeaderWorkerSet":
            lwt = obj["spec"]["leaderWorkerTemplate"]
            out += [(role, lwt["leaderTemplate"]["spec"]), (role, lwt["workerTemplate"]["spec"])]
        elif obj["kind"] == "Deployment" and role != "router":
            out.append((role, obj["spec"]["template"]["spec"]))
    return out


def router_pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (router,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "t-router"]
    spec: dict[str, Any] = router["spec"]["template"]["spec"]
    return spec


def test_pods_run_as_the_images_user_with_a_writable_home_and_cache() -> None:
    objs = render_spec()
    for _, pod in [*serving_pods(objs), ("router", router_pod(objs))]:
        assert pod["securityContext"]["runAsUser"] == IMAGE_UID
        assert pod["securityContext"]["fsGroup"] == IMAGE_UID
    for _, pod in serving_pods(objs):
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HOME"] == RUNTIME_HOME
        assert env["HF_HOME"] == HF_HOME
        assert HF_HOME.startswith(CACHE_DIR + "/")
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts[RUNTIME_HOME]] == {"name": "home", "emptyDir": {}}
        assert volumes[mounts[CACHE_DIR]] == {"name": "cache", "emptyDir": {}}


def test_a_cache_claim_replaces_the_cache_volume() -> None:
    data = copy.deepcopy(BASE["spec"]["model"])
    data["cacheClaim"] = "hf-cache"
    for _, pod in serving_pods(render_spec(model=data)):
        (container,) = pod["containers"]
        at_cache = [m["name"] for m in container["volumeMounts"] if m["mountPath"] == CACHE_DIR]
        assert at_cache == ["hf-cache"]
        assert "cache" not in {v["name"] for v in pod["volumes"]}


def test_every_serving_pod_requests_cpu_and_memory_from_the_plan_and_sizes_shm() -> None:
    md = parse_manifest(BASE)
    plan = plan_manifest(md)
    pods = serving_pods(render_spec())
    assert pods
    for role, pod in pods:
        host = plan.role(role).host
        (container,) = pod["containers"]
        requests = container["resources"]["requests"]
        assert (requests["cpu"], requests["memory"]) == (host.cpu, host.memory)
        assert container["resources"]["limits"] == {"nvidia.com/gpu": requests["nvidia.com/gpu"]}
        (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": host.shm}
    devices = plan.role("decode").devices_per_pod
    assert plan.role("decode").host.cpu == str(4 * devices)
    assert plan.role("decode").host.memory == f"{17 * devices}Gi"


def test_the_specs_requests_override_the_plans_and_other_resources_pass_through() -> None:
    resources = {"requests": {"cpu": "12", "memory": "100Gi", "ephemeral-storage": "50Gi"}}
    objs = render_spec(roles=with_roles(decode={"resources": resources}))
    for role, pod in serving_pods(objs):
        requests = pod["containers"][0]["resources"]["requests"]
        if role == "decode":
            assert (requests["cpu"], requests["memory"], requests["ephemeral-storage"]) == (
                "12",
                "100Gi",
                "50Gi",
            )
        else:
            assert requests["cpu"] != "12"


def test_probes_fit_a_long_load_and_outwait_the_handlers() -> None:
    assert HANDLER_WAIT_S >= 2 * PROBE_TIMEOUT_S, "the vLLM front waits up to connect + read timeouts"
    objs = render_spec()
    for _, pod in serving_pods(objs):
        (container,) = pod["containers"]
        startup = container["startupProbe"]
        assert startup["httpGet"]["path"] == "/ready"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600, "an hour or more to load"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["timeoutSeconds"] > HANDLER_WAIT_S, probe
    (router,) = router_pod(objs)["containers"]
    assert "startupProbe" not in router
    assert router["readinessProbe"]["timeoutSeconds"] > HANDLER_WAIT_S


@pytest.mark.parametrize(
    ("accelerator", "selector", "affinity"),
    [
        ({"type": "H100", "perPod": 8}, None, ["NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe"]),
        ({"type": "NVIDIA-H100-PCIe", "perPod": 8}, "NVIDIA-H100-PCIe", None),
        ({"type": "L40S", "perPod": 8}, "NVIDIA-L40S", None),
    ],
)
def test_gpu_pods_require_the_catalogs_product_label(
    accelerator: dict[str, Any], selector: str | None, affinity: list[str] | None
) -> None:
    roles = {"prefill": {"parallelism": {"data": 2}}, "decode": {"parallelism": {"data": 2}}}
    objs = render_spec(accelerator=accelerator, roles=roles)
    for _, pod in serving_pods(objs):
        assert pod.get("nodeSelector", {}).get(GPU_LABEL) == selector
        if affinity is None:
            assert "affinity" not in pod
        else:
            terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert terms["nodeSelectorTerms"] == [
                {"matchExpressions": [{"key": GPU_LABEL, "operator": "In", "values": affinity}]}
            ]
    router = router_pod(objs)
    assert "nodeSelector" not in router
    assert "affinity" not in router


def test_the_specs_node_selector_on_the_product_label_wins() -> None:
    objs = render_spec(scheduling={"nodeSelector": {GPU_LABEL: "NVIDIA-H100-NVL", "zone": "a"}})
    for _, pod in serving_pods(objs):
        assert pod["nodeSelector"] == {GPU_LABEL: "NVIDIA-H100-NVL", "zone": "a"}
        assert "affinity" not in pod


def test_product_label_false_leaves_placement_to_the_resource_and_the_users_selector() -> None:
    """Nodes without GPU feature discovery's labels (a managed cluster's device plugin alone): no product
    label required, the user's own GPU label instead; the GPUs are still requested."""
    for accelerator in ({"type": "H100", "productLabel": False}, {"type": "L40S", "productLabel": False}):
        objs = render_spec(
            accelerator=accelerator,
            scheduling={"nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}},
        )
        for _, pod in serving_pods(objs):
            assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
            assert "affinity" not in pod
            limits = [
                c["resources"]["limits"]
                for c in pod["containers"]
                if "nvidia.com/gpu" in c["resources"].get("limits", {})
            ]
            assert limits, "the GPUs are still requested"


def test_cpu_and_uncatalogued_accelerators_get_no_product_label() -> None:
    memory = {"requests": {"memory": "128Gi"}}
    roles = {
        "prefill": {"parallelism": {"data": 1}, "resources": memory},
        "decode": {"parallelism": {"data": 1}, "resources": memory},
    }
    for accelerator in ({"type": "cpu", "perPod": 1}, {"type": "GH200", "perPod": 1, "memoryGiB": 96}):
        for _, pod in serving_pods(render_spec(accelerator=accelerator, roles=roles)):
            assert "nodeSelector" not in pod, accelerator
            assert "affinity" not in pod, accelerator


def test_nixl_advertises_the_pods_ip_as_its_side_channel_host() -> None:
    store = {"pod": {"env": [{"name": "LMCACHE_REMOTE_URL", "value": "redis://kv:6379"}]}}
    for connector, expected in (("nixl", True), ("lmcache", False)):
        serving = {"mode": "disaggregated", "kvTransfer": {"connector": connector}}
        roles = with_roles(prefill=store, decode=store) if connector == "lmcache" else with_roles()
        for _, pod in serving_pods(render_spec(serving=serving, roles=roles)):
            env = {e["name"]: e for e in pod["containers"][0]["env"]}
            if expected:
                ref = env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"]["fieldRef"]
                assert ref == {"fieldPath": "status.podIP"}
            else:
                assert "VLLM_NIXL_SIDE_CHANNEL_HOST" not in env


def test_an_uncatalogued_amd_gpu_requests_the_resource_the_spec_names() -> None:
    """An accelerator the catalog lacks (MI325X) requested nvidia.com/gpu, and the plan's resource could
    not be changed in resources.limits: its pods stayed Pending on AMD nodes."""
    accelerator = {"type": "MI325X", "perPod": 8, "memoryGiB": 256}
    for resource, expected in ((None, "nvidia.com/gpu"), ("amd.com/gpu", "amd.com/gpu")):
        given = accelerator if resource is None else {**accelerator, "resource": resource}
        for _, pod in serving_pods(render_spec(accelerator=given)):
            limits = pod["containers"][0]["resources"]["limits"]
            assert int(limits[expected]) >= 1, (resource, limits)
            assert not ({"nvidia.com/gpu", "amd.com/gpu"} - {expected}) & limits.keys(), limits


def test_an_accelerator_resource_is_a_resource_name_and_not_for_cpu() -> None:
    with pytest.raises(ManifestError, match=r"spec\.accelerator\.resource"):
        render_spec(accelerator={"type": "MI325X", "memoryGiB": 256, "resource": "amd gpu"})
    memory = {"requests": {"memory": "128Gi"}}
    roles = {"prefill": {"resources": memory}, "decode": {"resources": memory}}
    with pytest.raises(ManifestError, match=r"spec\.accelerator\.resource.*remove") as err:
        render_spec(accelerator={"type": "cpu", "perPod": 1, "resource": "amd.com/gpu"}, roles=roles)
    assert "CPUs" in str(err.value)
