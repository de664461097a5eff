"""The KV hand-off key: a disaggregated deployment's router, prefill and decode pods read one Secret
(the runtime signs and verifies kv_transfer_params with it); colocated pods need none; the operator may
create Secrets, never read them."""

from __future__ import annotations

from typing import Any

from kubemoe_operator.gen.rbac import CLUSTER_RULES
from kubemoe_operator.render import Owner
from kubemoe_operator.render.kv_key import KV_KEY_ENV, kv_key_secret
from kubemoe_runtime.pod.kv_auth import KV_KEY_ENV as RUNTIME_KV_KEY_ENV
from kubemoe_runtime.pod.kv_auth import KVSigner
from tests.operator.helpers import pod_templates
from tests.operator.render.test_render_pods import render_spec, with_roles


def _key_env(objs: list[dict[str, Any]]) -> list[Any]:
    """The key's env entry of every pod template (None where there is none)."""
    envs = [t["spec"]["containers"][0].get("env", []) for t in pod_templates(objs)]
    return [next((e for e in env if e["name"] == KV_KEY_ENV), None) for env in envs]


def test_every_disaggregated_pod_reads_the_deployments_key_secret() -> None:
    objs = render_spec()
    envs = _key_env(objs)
    assert {o["metadata"]["name"] for o in objs if o["kind"] in ("Deployment", "LeaderWorkerSet")} == {
        "t-prefill",
        "t-decode",
        "t-router",
    }
    ref = {"secretKeyRef": {"name": "t-kv-key", "key": "key"}}
    assert envs
    assert all(e == {"name": KV_KEY_ENV, "valueFrom": ref} for e in envs), envs
    assert KV_KEY_ENV == RUNTIME_KV_KEY_ENV


def test_colocated_pods_get_no_key() -> None:
    roles = {"worker": with_roles()["decode"]}
    envs = _key_env(render_spec(serving={"mode": "colocated"}, roles=roles))
    assert envs
    assert all(e is None for e in envs), envs


def test_the_secret_is_random_owned_and_a_key_the_runtime_accepts() -> None:
    owner = Owner(name="t", namespace="ns", uid="u")
    first, second = kv_key_secret(owner), kv_key_secret(owner)
    assert first["metadata"]["ownerReferences"][0]["uid"] == "u"
    assert first["stringData"]["key"] != second["stringData"]["key"]
    signer = KVSigner(first["stringData"]["key"].encode())
    assert signer.verify(signer.sign({"remote_handle": "h"})) == {"remote_handle": "h"}


def test_the_operator_may_create_secrets_and_nothing_more() -> None:
    rules = [r for r in CLUSTER_RULES if "secrets" in r["resources"]]
    assert rules == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]}]
