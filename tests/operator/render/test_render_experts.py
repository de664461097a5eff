"""spec.experts in the rendered pods: the torch engine's --redundant-experts and --expert-placement with
the role's placement ConfigMap mounted in every pod of the group; vLLM's --enable-eplb and --eplb-config,
read by vLLM's own parser the way a pod hands them over (through `kubemoe-runtime serve`)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemoe_operator.api.manifest import load_manifest, parse_manifest
from kubemoe_operator.api.problems import ManifestError
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render import Owner, render
from kubemoe_operator.render.experts import EXPERTS_DIR, PLACEMENT_PATH, placement_key, with_expert_args
from kubemoe_runtime.engines.vllm.command import flags_given, vllm_args
from kubemoe_runtime.pod.settings import parse_args
from tests.engine_python import VLLM
from tests.operator.helpers import BASE, REPO

UID = "00000000-0000-4000-8000-000000000000"
EXAMPLE = REPO / "examples" / "experts-redundant.yaml"


def rendered(data: dict[str, Any]) -> list[dict[str, Any]]:
    md = parse_manifest(data)
    owner = Owner(name=md.metadata.name, namespace="ns", uid=UID)
    return render(spec=md.spec, plan=plan_manifest(md), owner=owner, image="img")


def engine_pods(objs: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(role, template kind, pod spec) of every serving pod template."""
    out = []
    for obj in objs:
        role = obj["metadata"]["labels"].get("kubemoe.io/role")
        if obj["kind"] == "LeaderWorkerSet":
            lwt = obj["spec"]["leaderWorkerTemplate"]
            out += [
                (role, "leader", lwt["leaderTemplate"]["spec"]),
                (role, "worker", lwt["workerTemplate"]["spec"]),
            ]
        elif obj["kind"] == "Deployment" and role != "router":
            out.append((role, "deployment", obj["spec"]["template"]["spec"]))
    return out


def argv(pod: dict[str, Any]) -> list[str]:
    (container,) = pod["containers"]
    return [*container["command"], *container["args"]]


def after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def tiny_torch(**experts: Any) -> dict[str, Any]:
    """examples/tiny-moe: the torch engine on cpu, prefill EP1 (one pod), decode EP2 (two pods, an LWS)."""
    data: dict[str, Any] = yaml.safe_load((REPO / "examples" / "tiny-moe.yaml").read_text())
    data["spec"]["experts"] = experts
    return data


def with_spec(**spec: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data["spec"].update(copy.deepcopy(spec))
    return data


# -- the torch engine -----------------------------------------------------------------------------


def test_torch_expert_parallel_pods_load_the_roles_placement_from_its_configmap() -> None:
    pods = engine_pods(rendered(tiny_torch(redundant=2)))
    decode = [(kind, pod) for role, kind, pod in pods if role == "decode"]
    assert [kind for kind, _ in decode] == ["leader", "worker"]  # every pod of the group
    for _, pod in decode:
        args = argv(pod)
        assert after(args, "--redundant-experts") == "2"
        assert after(args, "--expert-placement") == PLACEMENT_PATH == "/etc/kubemoe/experts/placement.json"
        (volume,) = [v for v in pod["volumes"] if v["name"] == "experts"]
        assert volume["configMap"]["name"] == "tiny-moe-decode-experts"  # <deployment>-<role>-experts
        assert volume["configMap"]["optional"] is True  # the rebalance loop creates it, maybe later
        # the key of this layout (2 ranks x (8 + 2) / 2 slots) and model: after a change of either
        # the pods read a key not yet written (the default placement), not the old layout's
        md = tiny_torch(redundant=2)
        key = placement_key(ranks=2, slots_per_rank=5, source=md["spec"]["model"]["source"])
        assert volume["configMap"]["items"] == [{"key": key, "path": "placement.json"}]
        (container,) = pod["containers"]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "experts"]
        assert mount == {"name": "experts", "mountPath": EXPERTS_DIR, "readOnly": True}
        assert "subPath" not in mount  # a directory mount: the kubelet keeps the file current
        assert PLACEMENT_PATH.startswith(mount["mountPath"] + "/")
    ((_, _, prefill),) = [p for p in pods if p[0] == "prefill"]  # EP1: nothing to place
    assert not {"--redundant-experts", "--expert-placement", "--enable-eplb"} & set(argv(prefill))
    assert "experts" not in {v["name"] for v in prefill["volumes"]}


def test_torch_without_redundant_slots_still_loads_the_placement() -> None:
    """experts: {} rebalances the experts a group has: 0 extra slots, the placement file still read."""
    pods = engine_pods(rendered(tiny_torch()))
    for role, _, pod in pods:
        args = argv(pod)
        if role == "decode":
            assert after(args, "--redundant-experts") == "0"
            assert PLACEMENT_PATH in args


def test_without_spec_experts_nothing_is_added() -> None:
    data = tiny_torch()
    del data["spec"]["experts"]
    for data_ in (data, with_spec()):
        for _, _, pod in engine_pods(rendered(data_)):
            args = argv(pod)
            for flag in ("--redundant-experts", "--expert-placement", "--enable-eplb", "--eplb-config"):
                assert flag not in args
            assert "experts" not in {v["name"] for v in pod["volumes"]}


def test_the_runtime_reads_the_torch_expert_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LWS_WORKER_INDEX", "1")  # the worker template's `auto` start rank
    for role, _, pod in engine_pods(rendered(tiny_torch(redundant=2))):
        settings, unknown = parse_args(argv(pod)[2:])
        assert unknown == [], role
        if role == "decode":
            assert settings.redundant_experts == 2
            assert str(settings.expert_placement) == PLACEMENT_PATH


# -- vLLM ----------------------------------------------------------------------------------------


def test_vllm_expert_parallel_pods_turn_on_eplb_with_the_planned_slots() -> None:
    data = with_spec(experts={"redundant": 8, "rebalance": {"intervalSeconds": 120}})
    data["spec"]["engine"]["extraArgs"] = ["--max-num-seqs", "64"]
    pods = engine_pods(rendered(data))
    assert {role for role, _, _ in pods} == {"prefill", "decode"}
    for _, _, pod in pods:
        args = argv(pod)
        assert json.loads(after(args, "--eplb-config")) == {
            "num_redundant_experts": 8,
            "window_size": 1000,
            "step_interval": 600,  # 120 s at a nominal 5 steps/s
        }
        # the plan's flags first, the user's last
        assert args[-5:] == [
            "--enable-eplb",
            "--eplb-config",
            after(args, "--eplb-config"),
            "--max-num-seqs",
            "64",
        ]
        assert "experts" not in {v["name"] for v in pod["volumes"]}  # vLLM places its experts itself
        assert "--redundant-experts" not in args


def test_a_vllm_role_without_expert_parallelism_gets_no_eplb() -> None:
    roles = {"prefill": {"parallelism": {"data": 2, "expert": 1}}, "decode": {"parallelism": {"data": 4}}}
    for role, _, pod in engine_pods(rendered(with_spec(roles=roles, experts={"redundant": 4}))):
        assert ("--enable-eplb" in argv(pod)) == (role == "decode")


@pytest.mark.parametrize(
    "flag", ["--enable-eplb", "--no-enable-eplb", "--eplb-config={}", "--redundant-experts=2"]
)
def test_extra_args_may_not_set_what_spec_experts_owns(flag: str) -> None:
    data = with_spec()
    data["spec"]["engine"]["extraArgs"] = [flag]
    with pytest.raises(ManifestError) as err:
        parse_manifest(data)
    (problem,) = err.value.problems
    assert problem.field == "spec.engine.extraArgs[0]"
    assert "spec.experts" in problem.fix


def test_expert_flags_go_before_the_users_arguments_or_not_at_all() -> None:
    command = ["kubemoe-runtime", "serve", "--model", "m", "--x", "1"]
    assert with_expert_args(command, extra=["--x", "1"], args=["--a"]) == [*command[:4], "--a", "--x", "1"]
    assert with_expert_args(command, extra=[], args=["--a"]) == [*command, "--a"]
    with pytest.raises(ValueError, match="extraArgs"):
        with_expert_args(command, extra=["--y"], args=["--a"])


# vLLM's own parsing of what `kubemoe-runtime serve --engine vllm` hands it, as its api_server does.
PARSE_WITH_VLLM = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser
out = []
for argv in json.load(sys.stdin):
    args = make_arg_parser(FlexibleArgumentParser(prog="vllm serve")).parse_args(argv)
    validate_parsed_serve_args(args)
    c = args.eplb_config
    out.append({
        "enable_eplb": args.enable_eplb,
        "enable_expert_parallel": args.enable_expert_parallel,
        "ep": args.data_parallel_size * args.tensor_parallel_size,
        "eplb": {k: getattr(c, k) for k in ("num_redundant_experts", "window_size", "step_interval")},
    })
print(json.dumps(out))
"""


def test_vllms_parser_reads_the_rendered_eplb_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LWS_WORKER_INDEX", "1")  # the worker template's `auto` start rank
    cases: list[tuple[str, dict[str, Any], list[str]]] = []
    plain = with_spec(
        roles={"prefill": {"parallelism": {"data": 2, "expert": 1}}, "decode": {"parallelism": {"data": 4}}}
    )
    balanced = copy.deepcopy(plain)
    balanced["spec"]["experts"] = {"redundant": 4, "rebalance": {"intervalSeconds": 60}}
    example = yaml.safe_load(Path(EXAMPLE).read_text())
    for name, data in (("example", example), ("base", balanced), ("plain", plain)):
        for role, kind, pod in engine_pods(rendered(data)):
            full = argv(pod)
            settings, unknown = parse_args(full[2:])
            vllm = vllm_args(settings, port=18000, given=flags_given(full[2:]), extra=unknown)
            cases.append((f"{name}/{role}/{kind}", data, vllm))
    parsed = json.loads(VLLM.run(PARSE_WITH_VLLM, stdin=json.dumps([c[2] for c in cases])).splitlines()[-1])
    by_name = {name: got for (name, _, _), got in zip(cases, parsed, strict=True)}
    assert len(by_name) == 8  # the example's 2 x (leader, worker), base's and plain's 2 Deployments
    for name in (
        "example/prefill/leader",
        "example/prefill/worker",
        "example/decode/leader",
        "example/decode/worker",
    ):
        assert by_name[name]["enable_eplb"] is True, name
        assert by_name[name]["enable_expert_parallel"] is True, name
        assert by_name[name]["ep"] == 16
        assert by_name[name]["eplb"] == {
            "num_redundant_experts": 32,
            "window_size": 1000,
            "step_interval": 3000,
        }
    assert by_name["base/decode/deployment"]["enable_eplb"] is True
    assert by_name["base/decode/deployment"]["eplb"] == {
        "num_redundant_experts": 4,
        "window_size": 1000,
        "step_interval": 300,
    }
    assert by_name["base/prefill/deployment"]["enable_eplb"] is False  # EP1: vLLM would refuse EPLB
    assert by_name["base/prefill/deployment"]["enable_expert_parallel"] is False
    for role in ("prefill", "decode"):  # without spec.experts: vLLM's defaults, EPLB off
        assert by_name[f"plain/{role}/deployment"]["enable_eplb"] is False
        assert by_name[f"plain/{role}/deployment"]["eplb"]["num_redundant_experts"] == 0
    assert load_manifest(EXAMPLE).spec.experts is not None
