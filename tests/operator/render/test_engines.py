"""SGLang and TGI deployments: golden plans and renderings of examples/engines/, their pods (the
engine's own server on /health, no runtime settings), SGLang's P/D router and its access, TGI's
launcher against TGI's documented options, and TGI's refusals (issue #18)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.plan.command import LWS_WORKER_INDEX, PORT, SGLANG_BOOTSTRAP_PORT, TGI_LAUNCHER
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render.engines import BOOTSTRAP_ANNOTATION
from tests.operator.helpers import GOLDEN, pod_templates
from tests.operator.render.engine_cases import (
    ENGINE_EXAMPLES,
    RUNTIME_IMAGE,
    load,
    pod_argvs,
    rendered,
)
from tests.operator.render.tgi_launcher import TGI_CHOICES, TGI_LAUNCHER_OPTIONS

RUNTIME_ENV = {
    "KUBEMOE_DEPLOYMENT",
    "KUBEMOE_GROUP",
    "KUBEMOE_DRAIN_TIMEOUT_S",
    "VLLM_NIXL_SIDE_CHANNEL_HOST",
}


def example(stem: str) -> dict[str, Any]:
    return load(next(p for p in ENGINE_EXAMPLES if p.stem == stem))


def test_there_are_engine_examples() -> None:
    assert {p.stem for p in ENGINE_EXAMPLES} >= {"sglang-deepseek-v3", "sglang-qwen3-30b", "tgi-mixtral-8x7b"}


@pytest.mark.parametrize("path", ENGINE_EXAMPLES, ids=lambda p: p.stem)
def test_engine_example_plan_and_render_match_golden(path: Path) -> None:
    plan, objs = rendered(parse_manifest(load(path)))
    data = {"plan": plan.model_dump(by_alias=True, mode="json"), "render": objs}
    golden = GOLDEN / "engines" / f"{path.stem}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(json.dumps(data, indent=2) + "\n")
    assert data == json.loads(golden.read_text())


@pytest.mark.parametrize("path", ENGINE_EXAMPLES, ids=lambda p: p.stem)
def test_own_server_pods_run_the_engine_and_are_probed_on_its_health(path: Path) -> None:
    md = parse_manifest(load(path))
    plan, objs = rendered(md)
    engine_templates = [
        t for t in pod_templates(objs) if t["metadata"]["labels"]["kubemoe.io/role"] != "router"
    ]
    assert engine_templates
    for template in engine_templates:
        [container] = template["spec"]["containers"]
        assert container["image"] == md.spec.engine.image
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
        assert not RUNTIME_ENV & {e["name"] for e in container["env"]}
        assert "kubemoe-runtime" not in container["command"]
        leader = template["metadata"]["labels"]["kubemoe.io/leader"] == "true"
        assert ("lifecycle" in container) == leader  # API-serving pods leave the endpoints first
    for _, _, argv in pod_argvs(objs):
        assert argv[0] == ("python3" if plan.engine == "sglang" else TGI_LAUNCHER)


def test_sglang_multi_pod_groups_give_each_pod_its_node_rank() -> None:
    _, objs = rendered(parse_manifest(example("sglang-deepseek-v3")))
    lws = [o for o in objs if o["kind"] == "LeaderWorkerSet"]
    assert len(lws) == 2
    for obj in lws:
        lwt = obj["spec"]["leaderWorkerTemplate"]
        leader = lwt["leaderTemplate"]["spec"]["containers"][0]["args"]
        worker = lwt["workerTemplate"]["spec"]["containers"][0]["args"]
        assert leader[leader.index("--node-rank") + 1] == "0"
        assert worker[worker.index("--node-rank") + 1] == LWS_WORKER_INDEX  # expanded by the kubelet
        assert worker[worker.index("--dist-init-addr") + 1] == "$(LWS_LEADER_ADDRESS):20000"
        assert leader[leader.index("--nnodes") + 1] == str(lwt["size"]) == "2"
    # the kubelet's expansion gives each pod of a group its rank
    ranks = [(role, argv[argv.index("--node-rank") + 1]) for role, _, argv in pod_argvs(objs)]
    assert ranks == [("prefill", "0"), ("prefill", "1"), ("decode", "0"), ("decode", "1")]


def test_sglang_pd_prefill_pods_announce_their_bootstrap_port_and_the_router_may_read_pods() -> None:
    _, objs = rendered(parse_manifest(example("sglang-deepseek-v3")))
    for template in pod_templates(objs):
        role = template["metadata"]["labels"]["kubemoe.io/role"]
        annotations = template["metadata"].get("annotations", {})
        if role == "prefill":
            assert annotations[BOOTSTRAP_ANNOTATION] == str(SGLANG_BOOTSTRAP_PORT)
            ports = template["spec"]["containers"][0]["ports"]
            assert {"name": "bootstrap", "containerPort": SGLANG_BOOTSTRAP_PORT, "protocol": "TCP"} in ports
        else:
            assert BOOTSTRAP_ANNOTATION not in annotations
    by_kind = {o["kind"]: o for o in objs if o["kind"] in ("ServiceAccount", "Role", "RoleBinding")}
    assert set(by_kind) == {"ServiceAccount", "Role", "RoleBinding"}
    name = by_kind["ServiceAccount"]["metadata"]["name"]
    assert by_kind["Role"]["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    assert by_kind["RoleBinding"]["roleRef"]["name"] == name
    assert by_kind["RoleBinding"]["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": "ns"}]
    [router] = [t for t in pod_templates(objs) if t["metadata"]["labels"]["kubemoe.io/role"] == "router"]
    assert router["spec"]["serviceAccountName"] == name
    assert router["spec"]["automountServiceAccountToken"] is True
    assert router["spec"]["containers"][0]["image"] == "lmsysorg/sglang:v0.5.23"  # sglang-router's


@pytest.mark.parametrize("stem", ["sglang-qwen3-30b", "tgi-mixtral-8x7b"])
def test_colocated_own_server_engines_get_kubemoes_router_on_the_runtime_image(stem: str) -> None:
    _, objs = rendered(parse_manifest(example(stem)))
    [router] = [t for t in pod_templates(objs) if t["metadata"]["labels"]["kubemoe.io/role"] == "router"]
    container = router["spec"]["containers"][0]
    assert container["image"] == RUNTIME_IMAGE
    assert container["command"] == ["kubemoe-runtime"]
    assert "serviceAccountName" not in router["spec"]
    assert not [o for o in objs if o["kind"] in ("ServiceAccount", "Role", "RoleBinding")]


def test_every_rendered_tgi_flag_is_a_documented_launcher_option() -> None:
    argvs = []
    for path in ENGINE_EXAMPLES:
        md = parse_manifest(load(path))
        if md.spec.engine.kind == "tgi":
            argvs += [argv for _, _, argv in pod_argvs(rendered(md)[1])]
    assert argvs
    for argv in argvs:
        assert argv[0] == TGI_LAUNCHER
        i = 1
        while i < len(argv):
            flag = argv[i]
            assert flag in TGI_LAUNCHER_OPTIONS, flag
            if TGI_LAUNCHER_OPTIONS[flag]:
                value = argv[i + 1]
                assert not value.startswith("--"), (flag, value)
                assert value in TGI_CHOICES.get(flag, (value,)), (flag, value)
                i += 2
            else:
                i += 1
        tokens = {argv[j]: argv[j + 1] for j in range(1, len(argv) - 1) if argv[j].startswith("--")}
        assert int(tokens["--max-input-tokens"]) < int(tokens["--max-total-tokens"])
        assert tokens["--port"] == str(PORT)


def tgi(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(example("tgi-mixtral-8x7b"))
    for key, value in changes.items():
        data["spec"][key] = value
    return data


def refused(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ManifestError) as err:
        plan_manifest(parse_manifest(data))
    return [(p.field, f"{p.message} {p.fix}") for p in err.value.problems]


def test_tgi_refuses_expert_and_data_parallelism_and_disaggregation_saying_what_to_use() -> None:
    ep = refused(tgi(roles={"worker": {"parallelism": {"tensor": 4, "expert": 4}}}))
    assert ep[0][0] == "spec.roles.worker.parallelism.expert"
    assert "no expert parallelism" in ep[0][1]
    assert "engine.kind vllm or sglang" in ep[0][1]
    dp = refused(tgi(roles={"worker": {"parallelism": {"tensor": 2, "data": 2}}}))
    assert dp[0][0] == "spec.roles.worker.parallelism.data"
    assert "no data parallelism" in dp[0][1]
    assert "engine.kind vllm or sglang" in dp[0][1]
    pd = tgi(serving={"mode": "disaggregated"}, roles={"prefill": {}, "decode": {}})
    fields = refused(pd)
    assert ("spec.serving.mode", fields[0][1]) == fields[0]
    assert "colocated" in fields[0][1]
    assert "engine.kind vllm or sglang" in fields[0][1]


def test_tgi_tensor_only_defaults_and_suggestions() -> None:
    # expert left out: TGI shards experts by tensor parallelism (EP 1), it is not refused
    plan = plan_manifest(parse_manifest(tgi(roles={"worker": {"parallelism": {"tensor": 4}}})))
    assert (plan.role("worker").expert, plan.role("worker").expert_parallel) == (1, False)
    # parallelism left out: the smallest tensor size within one pod that fits, never EP
    suggested = plan_manifest(parse_manifest(tgi(roles={"worker": {}}))).role("worker")
    assert suggested.suggested
    assert suggested.data == 1
    assert not suggested.expert_parallel
    assert suggested.tensor in (2, 4)
    assert suggested.pods_per_group == 1
    # nothing within one pod fits: refused naming parallelism, the fix says which engines span pods
    small = tgi(accelerator={"type": "L40S", "perPod": 1}, roles={"worker": {}})
    [(field, text)] = refused(small)
    assert field == "spec.roles.worker.parallelism"
    assert "one pod" in text
    assert "engine.kind vllm or sglang" in text
