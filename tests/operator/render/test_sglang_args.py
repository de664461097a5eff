"""Every rendered SGLang command, as the kubelet starts it, parsed by SGLang 0.5.23's own parser
(sglang.srt.server_args.prepare_server_args, what `python3 -m sglang.launch_server` calls first), and
every sglang-router command by sglang-router 0.3.2's (RouterArgs, then Router.from_args, its Rust
config). Cases: the SGLang examples and every example of examples/ as SGLang, the tiny one too.

SGLang lives in its own interpreter ($KUBEMOE_SGLANG_PYTHON, `make setup-sglang`), so its parsers run
in a subprocess.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubemoe_operator.api.labels import LABEL_DEPLOYMENT, LABEL_LEADER, LABEL_ROLE
from kubemoe_operator.plan.command import (
    PORT,
    SGLANG_BOOTSTRAP_PORT,
    SGLANG_DIST_INIT_PORT,
    SGLANG_SERVER,
)
from kubemoe_operator.render.engines import SGLANG_ROUTER
from tests.engine_python import SGLANG
from tests.operator.render.engine_cases import (
    LEADER_ADDRESS,
    NAMESPACE,
    pod_argvs,
    rendered,
    router_argv,
    sglang_cases,
)

SERVER_FIELDS = (
    "model_path",
    "served_model_name",
    "host",
    "port",
    "context_length",
    "mem_fraction_static",
    "dtype",
    "device",
    "tp_size",
    "dp_size",
    "attn_dp_size",
    "ep_size",
    "moe_a2a_backend",
    "dist_init_addr",
    "nnodes",
    "node_rank",
    "disaggregation_mode",
    "disaggregation_transfer_backend",
    "disaggregation_bootstrap_port",
    "trust_remote_code",
)
PARSE_SERVERS = f"""
import json, sys
from sglang.srt.server_args import prepare_server_args
out = []
for argv in json.load(sys.stdin):
    try:
        args = prepare_server_args(argv)
    except SystemExit as err:
        out.append({{"error": f"exit {{err.code}}"}})
        continue
    out.append({{f: getattr(args, f) for f in {SERVER_FIELDS!r}}})
print(json.dumps(out, default=str))
"""
PARSE_ROUTERS = """
import argparse, json, sys
from sglang_router.router_args import RouterArgs
from sglang_router.router import Router
out = []
for argv in json.load(sys.stdin):
    parser = argparse.ArgumentParser()
    RouterArgs.add_cli_args(parser, use_router_prefix=False)
    try:
        args = RouterArgs.from_cli_args(parser.parse_args(argv), use_router_prefix=False)
    except SystemExit as err:
        out.append({"error": f"exit {err.code}"})
        continue
    args._validate_router_args()
    Router.from_args(args)
    out.append({f: getattr(args, f) for f in (
        "host", "port", "pd_disaggregation", "policy", "service_discovery", "service_discovery_namespace",
        "service_discovery_port", "prefill_selector", "decode_selector", "bootstrap_port_annotation",
        "worker_startup_timeout_secs")})
print(json.dumps(out, default=str))
"""


def parse_servers(argvs: list[list[str]]) -> list[dict[str, Any]]:
    parsed: list[dict[str, Any]] = json.loads(SGLANG.run(PARSE_SERVERS, stdin=json.dumps(argvs)))
    return parsed


def parse_routers(argvs: list[list[str]]) -> list[dict[str, Any]]:
    parsed: list[dict[str, Any]] = json.loads(SGLANG.run(PARSE_ROUTERS, stdin=json.dumps(argvs)))
    return parsed


def test_the_cases_cover_every_layout() -> None:
    """Tensor, data (DP attention), expert, multi-pod groups and P/D, each at least once."""
    seen = set()
    for _, md in sglang_cases():
        plan, _ = rendered(md)
        for role in plan.roles:
            seen |= {
                *(["tensor"] if role.tensor > 1 else []),
                *(["data"] if role.data > 1 else []),
                *(["expert"] if role.expert_parallel else []),
                *(["multi-pod"] if role.pods_per_group > 1 else []),
                *(["cpu"] if plan.resource is None else []),
            }
        seen |= {plan.mode}
    assert seen == {"tensor", "data", "expert", "multi-pod", "cpu", "disaggregated", "colocated"}


def test_every_rendered_sglang_server_is_accepted_by_sglangs_parser() -> None:
    cases = []
    for name, md in sglang_cases():
        plan, objs = rendered(md)
        for role_name, index, argv in pod_argvs(objs):
            assert argv[: len(SGLANG_SERVER)] == list(SGLANG_SERVER), name
            cases.append((f"{name}/{role_name}/{index}", plan, plan.role(role_name), index, argv))
    parsed = parse_servers([argv[len(SGLANG_SERVER) :] for *_, argv in cases])
    assert len(parsed) == len(cases)
    for (name, plan, role, index, _), got in zip(cases, parsed, strict=True):
        assert "error" not in got, (name, got)
        assert got["served_model_name"] == plan.model, name
        assert (got["host"], got["port"]) == ("0.0.0.0", PORT), name
        assert got["context_length"] == role.memory.max_model_len, name
        assert got["mem_fraction_static"] == role.memory.utilization, name
        assert got["tp_size"] == role.ranks, name  # one SGLang server is the whole group
        assert got["dp_size"] == 1, name
        assert got["attn_dp_size"] == role.data, name  # data parallelism is DP attention
        assert got["ep_size"] == (role.expert if role.expert_parallel else 1), name
        wanted_a2a = "none" if not role.expert_parallel or plan.resource is None else "deepep"
        assert got["moe_a2a_backend"] == wanted_a2a, name
        assert got["device"] == ("cpu" if plan.resource is None else None), name
        assert got["nnodes"] == role.pods_per_group, name
        assert got["node_rank"] == index, name
        multi = role.pods_per_group > 1
        assert got["dist_init_addr"] == (f"{LEADER_ADDRESS}:{SGLANG_DIST_INIT_PORT}" if multi else None), name
        if plan.mode == "disaggregated":
            assert got["disaggregation_mode"] == role.role, name
            assert got["disaggregation_transfer_backend"] == plan.connector, name
            assert got["disaggregation_bootstrap_port"] == SGLANG_BOOTSTRAP_PORT, name
        else:
            assert got["disaggregation_mode"] == "null", name
    by_name = {name: got for (name, *_), got in zip(cases, parsed, strict=True)}
    assert by_name["sglang-deepseek-v3/prefill/1"]["trust_remote_code"] is True  # extraArgs reach it
    assert by_name["sglang-deepseek-v3/prefill/1"]["dtype"] == "bfloat16"


def test_the_parser_refuses_what_sglang_does_not_know() -> None:
    """The check can fail: a flag SGLang lacks, or a backend it does not have, exits the parser."""
    good = ["--model-path", "/m", "--tp-size", "2"]
    got = parse_servers([good, [*good, "--data-parallel-size-local", "2"], [*good, "--moe-a2a-backend", "x"]])
    assert "error" not in got[0]
    assert got[1] == {"error": "exit 2"}
    assert got[2] == {"error": "exit 2"}


def test_every_sglang_pd_router_is_accepted_by_sglang_routers_parser() -> None:
    cases = []
    for name, md in sglang_cases():
        plan, objs = rendered(md)
        argv = router_argv(objs)
        if plan.mode != "disaggregated" or argv is None:
            continue
        assert argv[: len(SGLANG_ROUTER)] == list(SGLANG_ROUTER), name
        cases.append((name, md.metadata.name, argv[len(SGLANG_ROUTER) :]))
    assert len(cases) >= 3
    parsed = parse_routers([argv for *_, argv in cases])
    for (name, owner, _), got in zip(cases, parsed, strict=True):
        assert "error" not in got, (name, got)
        assert (got["host"], got["port"]) == ("0.0.0.0", PORT), name
        assert got["pd_disaggregation"] is True, name
        assert got["service_discovery"] is True, name
        assert got["service_discovery_namespace"] == NAMESPACE, name
        assert got["service_discovery_port"] == PORT, name
        for role, selector in (("prefill", got["prefill_selector"]), ("decode", got["decode_selector"])):
            assert selector == {LABEL_DEPLOYMENT: owner, LABEL_ROLE: role, LABEL_LEADER: "true"}, name
        assert got["bootstrap_port_annotation"] == "sglang.ai/bootstrap-port", name
        assert got["worker_startup_timeout_secs"] >= 3600, name


@pytest.mark.parametrize("policy", ["round-robin", "least-load", "prefix-hash"])
def test_each_router_policy_is_one_sglang_router_has(policy: str) -> None:
    name, md = next((n, m) for n, m in sglang_cases() if n == "sglang-deepseek-v3")
    md = md.model_copy(
        update={
            "spec": md.spec.model_copy(
                update={"router": md.spec.router.model_copy(update={"policy": policy})}
            )
        }
    )
    _, objs = rendered(md)
    argv = router_argv(objs)
    assert argv is not None, name
    [got] = parse_routers([argv[len(SGLANG_ROUTER) :]])
    # sglang-router turns the name into its Rust PolicyType
    assert got["policy"] == {"round-robin": "PolicyType.RoundRobin"}.get(policy, "PolicyType.CacheAware")
