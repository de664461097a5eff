"""LMCache between prefill and decode (api/lmcache.py): a role that names no store, roles that name
different stores or hash seeds are refused naming the field; PYTHONHASHSEED defaults to the same value
in both roles' pods, and a role's own pod.env wins."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render import Owner, render
from tests.operator.helpers import BASE, pod_templates

STORE = {"name": "LMCACHE_REMOTE_URL", "value": "redis://kv:6379"}


def lmcache(
    prefill_env: list[dict[str, Any]], decode_env: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["spec"]["serving"] = {"mode": "disaggregated", "kvTransfer": {"connector": "lmcache"}}
    for role, env in (("prefill", prefill_env), ("decode", decode_env)):
        data["spec"]["roles"][role]["pod"] = {"env": env, **extra}
    return data


def fields(data: dict[str, Any]) -> dict[str, str]:
    md = parse_manifest(data)  # admitted: the rule is the planner's (env may come from a ConfigMap)
    with pytest.raises(ManifestError) as err:
        plan_manifest(md)
    return {p.field: str(p) for p in err.value.problems}


def seeds(data: dict[str, Any]) -> list[str | None]:
    md = parse_manifest(data)
    objs = render(
        spec=md.spec, plan=plan_manifest(md), owner=Owner(name="t", namespace="ns", uid="u"), image="i"
    )
    out = []
    for template in pod_templates(objs):
        for container in template["spec"]["containers"]:
            if container["name"] != "engine":
                continue
            env = [e for e in container["env"] if e["name"] == "PYTHONHASHSEED"]
            assert len(env) <= 1, env  # never twice: the API server's apply would refuse the pod
            out.append(env[0]["value"] if env else None)
    return out


def test_a_role_without_a_store_is_refused_naming_it() -> None:
    got = fields(lmcache([STORE], []))
    assert set(got) == {"spec.roles.decode.pod.env"}
    assert "LMCACHE_REMOTE_URL" in got["spec.roles.decode.pod.env"]
    assert "Fix:" in got["spec.roles.decode.pod.env"]


def test_a_config_file_or_env_from_may_name_the_store() -> None:
    config = {"name": "LMCACHE_CONFIG_FILE", "value": "/etc/lmcache/lmcache.yaml"}
    plan_manifest(parse_manifest(lmcache([config], [config])))
    plan_manifest(parse_manifest(lmcache([], [], envFrom=[{"configMapRef": {"name": "lmcache"}}])))


def test_two_stores_or_two_seeds_are_refused() -> None:
    other = {"name": "LMCACHE_REMOTE_URL", "value": "redis://elsewhere:6379"}
    got = fields(lmcache([STORE], [other]))
    assert set(got) == {"spec.roles.decode.pod.env[LMCACHE_REMOTE_URL]"}
    assert "redis://elsewhere:6379" in got["spec.roles.decode.pod.env[LMCACHE_REMOTE_URL]"]
    seed = {"name": "PYTHONHASHSEED", "value": "7"}
    got = fields(lmcache([STORE, seed], [STORE]))  # decode takes the operator's 0
    assert set(got) == {"spec.roles.decode.pod.env[PYTHONHASHSEED]"}
    plan_manifest(parse_manifest(lmcache([STORE, seed], [STORE, seed])))


def test_the_operator_seeds_both_roles_alike_unless_told() -> None:
    assert seeds(lmcache([STORE], [STORE])) == ["0", "0"]
    seed = {"name": "PYTHONHASHSEED", "value": "7"}
    assert seeds(lmcache([STORE, seed], [STORE, seed])) == ["7", "7"]
    nixl = copy.deepcopy(BASE)
    nixl["spec"]["serving"] = {"mode": "disaggregated", "kvTransfer": {"connector": "nixl"}}
    assert set(seeds(nixl)) == {None}
