"""spec.roles.<role>.pod.supplementalGroups (and spec.router.pod's): group ids on the pods' securityContext,
for device files a node gives a group (an AMD GPU's /dev/kfd and /dev/dri belong to its video and render
groups). Every pod kind of that role gets them, the rest of the security context stays as it is, and the
model cache's fill pod, which opens no device, gets none."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubemoe_operator.api.manifest import load_manifest, parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.gen.crd import crd
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render import Owner, render
from tests.operator.helpers import REPO, pod_templates

OWNER = Owner(name="m", namespace="ns", uid="u")
GROUPS = [44, 110]  # Ubuntu's video and (one of its) render groups


def _data(example: str, **pods: dict[str, Any]) -> dict[str, Any]:
    """An example's manifest with `pods` as its roles' (or, under the key router, the router's) pod."""
    data = load_manifest(REPO / "examples" / example).model_dump(by_alias=True, exclude_none=True)
    data = copy.deepcopy(data)
    for role, pod in pods.items():
        target = data["spec"]["router"] if role == "router" else data["spec"]["roles"][role]
        target["pod"] = pod
    return data


def _rendered(data: dict[str, Any]) -> list[dict[str, Any]]:
    md = parse_manifest(data)
    return render(spec=md.spec, plan=plan_manifest(md), owner=OWNER, image="engine:1", runtime_image="rt:1")


def _by_role(objs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for template in pod_templates(objs):
        out.setdefault(template["metadata"]["labels"]["kubemoe.io/role"], []).append(template)
    return out


@pytest.mark.parametrize(
    "example",
    ["deepseek-v3.yaml", "tiny-moe.yaml", "engines/sglang-deepseek-v3.yaml", "engines/tgi-mixtral-8x7b.yaml"],
)
def test_a_roles_groups_reach_each_of_its_pods_and_only_its(example: str) -> None:
    roles = load_manifest(REPO / "examples" / example).spec.roles.items()
    first = roles[0][0]
    by_role = _by_role(_rendered(_data(example, **{first: {"supplementalGroups": GROUPS}})))
    for role, templates in by_role.items():
        for template in templates:
            pod_sc = template["spec"]["securityContext"]
            assert pod_sc.get("supplementalGroups") == (GROUPS if role == first else None), role
            assert pod_sc["runAsUser"] == 65532
            assert pod_sc["runAsNonRoot"] is True
            (container,) = template["spec"]["containers"]
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            }


@pytest.mark.parametrize("example", ["deepseek-v3.yaml", "engines/sglang-deepseek-v3.yaml"])
def test_the_routers_groups_reach_the_router(example: str) -> None:
    by_role = _by_role(_rendered(_data(example, router={"supplementalGroups": [1000]})))
    (router,) = by_role["router"]
    assert router["spec"]["securityContext"]["supplementalGroups"] == [1000]
    engine_pods = [t for role, ts in by_role.items() if role != "router" for t in ts]
    assert engine_pods
    assert all("supplementalGroups" not in t["spec"]["securityContext"] for t in engine_pods)


def test_the_model_cache_fill_pod_gets_none() -> None:
    data = _data("qwen3-30b-a3b-model-cache.yaml", worker={"supplementalGroups": GROUPS})
    objs = _rendered(data)
    (job,) = [o for o in objs if o["kind"] == "Job"]
    assert "supplementalGroups" not in job["spec"]["template"]["spec"]["securityContext"]
    (worker,) = _by_role(objs)["worker"]
    assert worker["spec"]["securityContext"]["supplementalGroups"] == GROUPS


@pytest.mark.parametrize("gid", [0, -1, 2**31, "44"])
def test_a_group_id_kubernetes_or_the_api_server_refuses_is_refused(gid: Any) -> None:
    with pytest.raises(ManifestError) as err:
        parse_manifest(_data("deepseek-v3.yaml", decode={"supplementalGroups": [44, gid]}))
    assert [p.field for p in err.value.problems] == ["spec.roles.decode.pod.supplementalGroups[1]"]


def test_the_largest_group_id_is_taken() -> None:
    md = parse_manifest(_data("deepseek-v3.yaml", decode={"supplementalGroups": [2**31 - 1]}))
    assert md.spec.roles.decode is not None
    assert md.spec.roles.decode.pod is not None
    assert md.spec.roles.decode.pod.supplemental_groups == [2**31 - 1]


def test_the_crd_bounds_the_group_ids() -> None:
    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    for pod in (
        spec["roles"]["properties"]["decode"]["properties"]["pod"],
        spec["router"]["properties"]["pod"],
    ):
        groups = pod["properties"]["supplementalGroups"]
        assert groups["items"] == {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}
