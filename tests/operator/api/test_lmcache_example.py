"""Every example with connector lmcache really hands the KV cache over: LMCacheConnectorV1 has no channel of
its own between a prefill pod and a decode pod (kubemoe's router speaks vLLM's proxy protocol, not
LMCache's P/D proxy), so the prefill's LMCache must store the prompt's KV where the decode's LMCache looks
it up: one remote store (LMCACHE_REMOTE_URL) in both roles, with the same chunk keys (the same chunk size,
hash algorithm and PYTHONHASHSEED, and the same tensor parallelism: each rank keys its own slice). The
store the example points at is in the example file itself, reachable by both roles and no one else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render import Owner, render
from tests.operator.helpers import EXAMPLES

UID = "00000000-0000-4000-8000-000000000000"
SAME_IN_BOTH = (
    "LMCACHE_REMOTE_URL",
    "LMCACHE_CHUNK_SIZE",
    "LMCACHE_PRE_CACHING_HASH_ALGORITHM",
    "LMCACHE_REMOTE_SERDE",
    "PYTHONHASHSEED",
)
LMCACHE_EXAMPLES = [p for p in EXAMPLES if load_manifest(p).spec.serving.kv_transfer.connector == "lmcache"]


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def engine_pods(path: Path) -> dict[str, dict[str, Any]]:
    """role -> the rendered pod template of its serving pods."""
    md = load_manifest(path)
    objs = render(
        spec=md.spec,
        plan=plan_manifest(md),
        owner=Owner(name=md.metadata.name, namespace="ns", uid=UID),
        image="i",
    )
    return {
        o["metadata"]["labels"]["kubemoe.io/role"]: o["spec"]["template"]
        for o in objs
        if o["kind"] == "Deployment" and o["metadata"]["labels"]["kubemoe.io/role"] in ("prefill", "decode")
    }


def env(pod: dict[str, Any]) -> dict[str, str]:
    [container] = pod["spec"]["containers"]
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels and matchExpressions) selects `labels`."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        matched = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not matched:
            return False
    return True


def test_there_is_an_lmcache_example() -> None:
    assert [p.stem for p in LMCACHE_EXAMPLES] == ["mixtral-8x22b-lmcache"]


@pytest.mark.parametrize("path", LMCACHE_EXAMPLES, ids=lambda p: p.stem)
def test_both_roles_share_one_store_and_the_chunk_keys(path: Path) -> None:
    pods = engine_pods(path)
    prefill, decode = env(pods["prefill"]), env(pods["decode"])
    for name in SAME_IN_BOTH:
        assert name in prefill, f"prefill pods lack {name}"
        assert prefill[name] == decode.get(name), name
    assert prefill["LMCACHE_PRE_CACHING_HASH_ALGORITHM"] != "builtin"  # Python's hash(): per process
    plan = plan_manifest(load_manifest(path))
    assert plan.role("prefill").tensor == plan.role("decode").tensor
    roles = {}
    for role, pod in pods.items():
        [container] = pod["spec"]["containers"]
        args = container["args"]
        roles[role] = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert roles == {
        "prefill": {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_producer"},
        "decode": {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_consumer"},
    }


@pytest.mark.parametrize("path", LMCACHE_EXAMPLES, ids=lambda p: p.stem)
def test_the_store_is_in_the_file_and_admits_only_the_two_roles(path: Path) -> None:
    docs = documents(path)
    url = env(engine_pods(path)["prefill"])["LMCACHE_REMOTE_URL"]
    scheme, _, address = url.partition("://")
    host, _, port = address.partition(":")
    assert scheme == "redis"
    [service] = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == host]
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    [store] = [d for d in docs if d["kind"] == "Deployment"]
    store_labels = store["spec"]["template"]["metadata"]["labels"]
    assert selects({"matchLabels": service["spec"]["selector"]}, store_labels)
    assert selects(store["spec"]["selector"], store_labels)
    assert not any(k.startswith("kubemoe.io/") for k in store_labels)  # not counted as a serving pod

    [policy] = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert selects(policy["spec"]["podSelector"], store_labels)
    [rule] = policy["spec"]["ingress"]
    md = load_manifest(path)
    owner = Owner(name=md.metadata.name, namespace="ns", uid=UID)
    objs = render(spec=md.spec, plan=plan_manifest(md), owner=owner, image="i")
    pod_labels = {
        o["metadata"]["labels"]["kubemoe.io/role"]: o["spec"]["template"]["metadata"]["labels"]
        for o in objs
        if o["kind"] == "Deployment"
    }
    admitted = {
        role
        for role, labels in pod_labels.items()
        if any(selects(p["podSelector"], labels) for p in rule["from"])
    }
    assert admitted == {"prefill", "decode"}  # not the router, nor anything else
