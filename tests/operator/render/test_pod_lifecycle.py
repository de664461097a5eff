"""How serving pods end (render/lifecycle.py) and the router's API keys (spec.router.apiKeySecret):
every pod that serves the API (the router, either engine's Deployment pods and LeaderWorkerSet
leaders) sleeps in preStop, is told its drain timeout and has a grace period covering sleep + drain +
margin; headless workers keep Kubernetes' defaults; the keys come from the Secret as a mounted file."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubemoe_operator.api.labels import LABEL_LEADER, LABEL_ROLE, ROUTER
from kubemoe_operator.api.manifest import load_manifest, parse_manifest
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render import Owner, lifecycle, render
from kubemoe_runtime.pod import drain
from kubemoe_runtime.router.main import parse_args as router_args
from tests.operator.helpers import BASE, EXAMPLES, pod_templates

UID = "00000000-0000-4000-8000-000000000000"


def render_router(**router: Any) -> list[dict[str, Any]]:
    data = copy.deepcopy(BASE)
    data["spec"]["router"] = router
    md = parse_manifest(data)
    return render(
        spec=md.spec, plan=plan_manifest(md), owner=Owner(name="t", namespace="ns", uid=UID), image="i"
    )


def router_pod(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (pod,) = [t for t in pod_templates(objs) if t["metadata"]["labels"][LABEL_ROLE] == ROUTER]
    return dict(pod["spec"])


def test_the_operator_and_the_runtime_agree_on_the_drain() -> None:
    assert lifecycle.DRAIN_TIMEOUT_S == drain.DRAIN_TIMEOUT_S
    assert lifecycle.DRAIN_TIMEOUT_ENV == drain.DRAIN_TIMEOUT_ENV
    assert (
        lifecycle.GRACE_PERIOD_S >= lifecycle.PRESTOP_SLEEP_S + lifecycle.DRAIN_TIMEOUT_S + drain.SHUTDOWN_S
    )


def drains(template: dict[str, Any]) -> bool:
    """Whether a rendered pod template drains; asserts it has all of it or none of it."""
    spec = template["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    if "terminationGracePeriodSeconds" not in spec:  # Kubernetes' defaults: no preStop, no drain
        assert "lifecycle" not in container
        assert drain.DRAIN_TIMEOUT_ENV not in env
        return False
    assert spec["terminationGracePeriodSeconds"] == lifecycle.GRACE_PERIOD_S
    assert container["lifecycle"] == {"preStop": {"sleep": {"seconds": lifecycle.PRESTOP_SLEEP_S}}}
    assert float(env[drain.DRAIN_TIMEOUT_ENV]) == drain.DRAIN_TIMEOUT_S
    assert drain.drain_timeout_default({drain.DRAIN_TIMEOUT_ENV: env[drain.DRAIN_TIMEOUT_ENV]}) == 120
    return True


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_the_router_and_api_pods_drain_and_workers_keep_the_defaults(path: Any) -> None:
    md = load_manifest(path)
    plan = plan_manifest(md)
    objs = render(spec=md.spec, plan=plan, owner=Owner(name="m", namespace="ns", uid=UID), image="i")
    templates = pod_templates(objs)
    assert {t["metadata"]["labels"][LABEL_ROLE] for t in templates} == {
        *(r.role for r in plan.roles),
        *([ROUTER] if md.spec.router.replicas else []),
    }
    for template in templates:
        labels = template["metadata"]["labels"]
        if labels[LABEL_ROLE] == ROUTER:
            assert drains(template)
        else:  # the pod holding rank 0 serves the API; a LeaderWorkerSet's workers are headless
            api = labels[LABEL_LEADER] == "true"
            assert drains(template) == api, (labels, plan.engine)
            assert ("--headless" in template["spec"]["containers"][0]["args"]) == (not api)


def test_a_leader_worker_set_drains_its_leader_only() -> None:
    md = load_manifest(next(p for p in EXAMPLES if p.stem == "tiny-moe"))
    plan = plan_manifest(md)
    assert plan.engine == "torch"
    objs = render(spec=md.spec, plan=plan, owner=Owner(name="m", namespace="ns", uid=UID), image="i")
    (lws,) = [o for o in objs if o["kind"] == "LeaderWorkerSet"]
    template = lws["spec"]["leaderWorkerTemplate"]
    assert drains(template["leaderTemplate"])
    assert not drains(template["workerTemplate"])
    (single,) = [
        o["spec"]["template"]
        for o in objs
        if o["kind"] == "Deployment" and o["spec"]["template"]["metadata"]["labels"][LABEL_ROLE] != ROUTER
    ]
    assert drains(single)  # a single-pod group (the prefill) serves the API: it drains
    assert lifecycle.drains(leader=True)
    assert not lifecycle.drains(leader=False)


def test_the_drain_env_sets_the_runtime_default_and_a_flag_wins() -> None:
    assert drain.drain_timeout_default({}) == drain.DRAIN_TIMEOUT_S
    assert drain.drain_timeout_default({drain.DRAIN_TIMEOUT_ENV: "30"}) == 30
    for bad in ("soon", "-1", "nan", "inf"):
        assert drain.drain_timeout_default({drain.DRAIN_TIMEOUT_ENV: bad}) == drain.DRAIN_TIMEOUT_S
    base = ["--role", "router", "--worker-service", "w:8000", "--policy", "round-robin"]
    assert router_args(base)[0].drain_timeout == drain.drain_timeout_default()
    assert router_args([*base, "--drain-timeout", "7"])[0].drain_timeout == 7


def test_api_keys_come_from_the_secret_as_a_file() -> None:
    pod = router_pod(render_router(apiKeySecret="clients"))
    (container,) = pod["containers"]
    args = container["args"]
    path = args[args.index("--api-key-file") + 1]
    (volume,) = pod["volumes"]
    assert volume["secret"]["secretName"] == "clients"
    assert volume["secret"]["items"] == [{"key": "api-key", "path": "api-key"}]
    (mount,) = container["volumeMounts"]
    assert mount["readOnly"] is True
    assert path == f"{mount['mountPath']}/api-key"
    assert mount["name"] == volume["name"]
    assert args[0] == "serve"
    settings, unknown = router_args(args[1:])  # what the router makes of the rendered argv
    assert str(settings.api_key_file) == path
    assert not unknown


def test_no_api_keys_without_the_field() -> None:
    pod = router_pod(render_router())
    assert "--api-key-file" not in pod["containers"][0]["args"]
    assert "volumes" not in pod


def test_the_grace_period_covers_vllms_own_stop_after_the_drain() -> None:
    from kubemoe_runtime.engines.vllm.supervise import GRACE_S

    after_drain = lifecycle.GRACE_PERIOD_S - lifecycle.PRESTOP_SLEEP_S - lifecycle.DRAIN_TIMEOUT_S
    assert after_drain >= GRACE_S + 5, "vLLM is killed GRACE_S after its SIGTERM: before the kubelet's"
