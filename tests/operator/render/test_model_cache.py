"""model.cache in the render: the claim the operator creates (or none with a claim the user brings),
the Job that fills it from the Hub with the runtime image, and serving pods that load the claim's
folder read-only, with no Hub token; a new source is a new Job (a Job's template cannot change)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubemoe_operator.api.manifest import load_manifest, parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.plan.command import MODEL_MOUNT
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render import Owner, render
from kubemoe_operator.render.model_cache import CACHE_MOUNT, FILL_PORT
from tests.operator.helpers import REPO

EXAMPLE = REPO / "examples" / "qwen3-30b-a3b-model-cache.yaml"
OWNER = Owner(name="cached", namespace="ns", uid="00000000-0000-4000-8000-000000000000")


def manifest(**cache: Any) -> dict[str, Any]:
    data = copy.deepcopy(load_manifest(EXAMPLE).model_dump(by_alias=True, exclude_none=True))
    data["spec"]["model"]["cache"] = cache or {"claim": "model-cache"}
    data["spec"]["model"]["credentialsSecret"] = "hf-token"
    return data


def rendered(data: dict[str, Any]) -> list[dict[str, Any]]:
    md = parse_manifest(data)
    return render(
        spec=md.spec, plan=plan_manifest(md), owner=OWNER, image="engine:1", runtime_image="runtime:1"
    )


def of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def test_the_job_fills_the_claim_from_the_hub_with_the_runtime_image() -> None:
    objs = rendered(manifest(claim="model-cache", hubEndpoint="http://mirror.internal:8080"))
    assert of_kind(objs, "PersistentVolumeClaim") == []  # the user's claim
    (job,) = of_kind(objs, "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "runtime:1"
    argv = container["command"] + container["args"]
    assert argv == [
        "kubemoe-runtime",
        "fill-cache",
        "--source",
        "hf://Qwen/Qwen3-30B-A3B",
        "--dir",
        f"{CACHE_MOUNT}/kubemoe-cache/Qwen/Qwen3-30B-A3B",
        "--port",
        str(FILL_PORT),
    ]
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_ENDPOINT"]["value"] == "http://mirror.internal:8080"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
    claim = next(v for v in pod["volumes"] if v["name"] == "cache")
    assert claim["persistentVolumeClaim"] == {"claimName": "model-cache"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert "nodeSelector" not in pod  # no accelerator: the fill runs on any node


def test_serving_pods_load_the_claim_folder_read_only_without_the_token() -> None:
    objs = rendered(manifest(claim="model-cache"))
    (workload,) = [o for o in of_kind(objs, "Deployment") if o["metadata"]["name"] == "cached-worker"]
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = container["command"] + container["args"]
    assert f"{MODEL_MOUNT}/kubemoe-cache/Qwen/Qwen3-30B-A3B" in argv
    assert "Qwen/Qwen3-30B-A3B" in argv  # still served under the model's name
    volume = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert volume["persistentVolumeClaim"] == {"claimName": "model-cache", "readOnly": True}
    assert "HF_TOKEN" not in {e["name"] for e in container["env"]}


def test_size_creates_an_owned_read_write_many_claim() -> None:
    objs = rendered(manifest(size="200Gi", storageClassName="nfs"))
    (claim,) = of_kind(objs, "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "cached-model-cache"
    assert claim["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "200Gi"}},
        "storageClassName": "nfs",
    }
    names = [o["kind"] for o in objs]
    assert names.index("PersistentVolumeClaim") < names.index("Job") < names.index("Deployment")


def test_a_new_source_is_a_new_job() -> None:
    first = of_kind(rendered(manifest()), "Job")[0]["metadata"]["name"]
    data = manifest()
    data["spec"]["model"]["source"] = "hf://Qwen/Qwen3-30B-A3B@main"
    second = of_kind(rendered(data), "Job")[0]["metadata"]["name"]
    assert first != second
    assert first.startswith("cached-model-cache-")
    assert of_kind(rendered(manifest()), "Job")[0]["metadata"]["name"] == first  # stable


def test_the_torch_engine_loads_hf_through_the_cache_only() -> None:
    tiny = load_manifest(REPO / "examples" / "tiny-moe.yaml").model_dump(by_alias=True, exclude_none=True)
    tiny["spec"]["model"]["source"] = "hf://kubemoe/tiny"
    with pytest.raises(ManifestError) as err:
        parse_manifest(tiny)
    assert "model.cache" in str(err.value)  # the fix names the way that works
    tiny["spec"]["model"]["cache"] = {"claim": "model-cache"}
    md = parse_manifest(tiny)
    assert plan_manifest(md).source == "pvc://model-cache/kubemoe-cache/kubemoe/tiny"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"source": "pvc://models/x", "cache": {"claim": "c"}}, "from hf:// only"),
        ({"cache": {"claim": "c", "size": "1Gi"}}, "exactly one"),
        ({"cache": {}}, "exactly one"),
        ({"cache": {"size": "0"}}, "positive"),
        ({"cache": {"claim": "c"}, "cacheClaim": "hf"}, "not both"),
        ({"cache": {"claim": "c", "hubEndpoint": "file:///etc"}}, "hubEndpoint"),
    ],
)
def test_bad_caches_are_refused_naming_the_field(model: dict[str, Any], message: str) -> None:
    data = manifest()
    data["spec"]["model"].pop("cache")
    data["spec"]["model"].update(model)
    with pytest.raises(ManifestError) as err:
        parse_manifest(data)
    assert message in str(err.value)
    assert "spec.model" in str(err.value)
