"""Annotations, labels and image pull secrets on every rendered pod, from the operator's flags (the
chart's runtimePod* values) and spec.pod; router resources from spec.router.resources."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.api.rules import spec_problems
from kubemoe_operator.api.spec import PodOptions
from kubemoe_operator.gen.crd import crd
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render import Owner, render
from kubemoe_operator.run.settings import parse_settings
from tests.operator.helpers import BASE, manifest

OWNER = Owner(name="t", namespace="ns", uid="u")


def pod_templates(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for obj in objs:
        if obj["kind"] == "LeaderWorkerSet":
            lwt = obj["spec"]["leaderWorkerTemplate"]
            out += [lwt["leaderTemplate"], lwt["workerTemplate"]]
        elif obj["kind"] == "Deployment":
            out.append(obj["spec"]["template"])
    return out


def test_every_pod_carries_the_defaults_with_the_spec_on_top() -> None:
    md = manifest(
        pod={
            "annotations": {"mesh/inject": "false", "cost/center": "ml"},
            "labels": {"team": "inference"},
            "imagePullSecrets": ["ours", "shared"],
        }
    )
    defaults = PodOptions(
        annotations={"mesh/inject": "true", "log/collect": "yes"},
        labels={"team": "platform", "env": "prod"},
        image_pull_secrets=["shared", "registry"],
    )
    # a PodMonitor (not scrape annotations): only the options' annotations on the pods
    objs = render(
        spec=md.spec,
        plan=plan_manifest(md),
        owner=OWNER,
        image="img",
        pod_defaults=defaults,
        pod_monitor=True,
    )
    templates = pod_templates(objs)
    assert len(templates) == 3  # prefill, decode, router
    for template in templates:
        meta = template["metadata"]
        assert meta["annotations"] == {"mesh/inject": "false", "log/collect": "yes", "cost/center": "ml"}
        assert (meta["labels"]["team"], meta["labels"]["env"]) == ("inference", "prod")
        assert meta["labels"]["kubemoe.io/deployment"] == "t"
        secrets = template["spec"]["imagePullSecrets"]
        assert secrets == [{"name": "shared"}, {"name": "registry"}, {"name": "ours"}]


def test_without_options_pods_carry_no_annotations_or_pull_secrets() -> None:
    md = manifest()
    objs = render(spec=md.spec, plan=plan_manifest(md), owner=OWNER, image="img", pod_monitor=True)
    for template in pod_templates(objs):
        assert "annotations" not in template["metadata"]
        assert "imagePullSecrets" not in template["spec"]


@pytest.mark.parametrize(
    "key", ["kubemoe.io/role", "app.kubernetes.io/name", "leaderworkerset.sigs.k8s.io/name"]
)
def test_labels_the_operator_owns_are_refused_naming_the_field(key: str) -> None:
    data = copy.deepcopy(BASE)
    data["spec"]["pod"] = {"labels": {key: "x"}}
    with pytest.raises(ManifestError) as err:
        parse_manifest(data)
    (problem,) = err.value.problems
    assert problem.field == f"spec.pod.labels[{key}]"
    assert "example.com" in problem.fix
    pod = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["pod"]
    (rule,) = pod["x-kubernetes-validations"]
    assert f"!k.startsWith('{key.split('/', maxsplit=1)[0]}/')" in rule["rule"], (
        "the apiserver refuses it too"
    )


def test_a_label_of_ones_own_domain_is_accepted() -> None:
    assert spec_problems(manifest(pod={"labels": {"example.com/team": "a"}}).spec) == []


def test_flags_give_the_defaults() -> None:
    settings, _ = parse_settings(
        [
            "--pod-annotation=a/b=c=d",
            "--pod-label=team=x",
            "--image-pull-secret=reg",
            "--image-pull-secret=reg2",
        ]
    )
    assert settings.pod_defaults == PodOptions(
        annotations={"a/b": "c=d"}, labels={"team": "x"}, image_pull_secrets=["reg", "reg2"]
    )


@pytest.mark.parametrize(
    ("flag", "says"),
    [
        ("--pod-label=kubemoe.io/role=x", "--pod-label[kubemoe.io/role]"),
        ("--pod-annotation=novalue", "--pod-annotation 'novalue': write KEY=VALUE"),
        ("--image-pull-secret=Not_A_Name", "--image-pull-secret"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(
    flag: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_settings([flag])
    assert says in capsys.readouterr().err


def test_router_resources_override_the_defaults_key_by_key() -> None:
    md = manifest(
        router={"replicas": 1, "resources": {"requests": {"cpu": "2"}, "limits": {"memory": "1Gi"}}}
    )
    objs = render(spec=md.spec, plan=plan_manifest(md), owner=OWNER, image="img")
    (router,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "t-router"]
    (container,) = router["spec"]["template"]["spec"]["containers"]
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "512Mi"},
        "limits": {"memory": "1Gi"},
    }
