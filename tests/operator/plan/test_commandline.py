from __future__ import annotations

import json

import pytest

from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.plan.command import kv_transfer_config, model_path
from kubemoe_operator.plan.planner import plan_manifest
from tests.operator.helpers import EXAMPLES


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.mark.parametrize(
    ("source", "path"),
    [
        ("hf://deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-V3"),
        ("pvc://models/mixtral/v0.1", "/mnt/models/mixtral/v0.1"),
        ("s3://bucket/qwen3", "s3://bucket/qwen3"),
        ("file:///tmp/tiny", "/tmp/tiny"),
        ("file://.run/models/tiny", ".run/models/tiny"),
    ],
)
def test_model_path(source: str, path: str) -> None:
    assert model_path(source) == path


def test_kv_transfer_config() -> None:
    assert json.loads(kv_transfer_config("nixl", "decode")) == {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_both",
    }
    assert json.loads(kv_transfer_config("example", "prefill"))["kv_role"] == "kv_producer"
    assert json.loads(kv_transfer_config("example", "decode"))["kv_role"] == "kv_consumer"


def _example(stem: str) -> list[list[str]]:
    plan = plan_manifest(load_manifest(next(p for p in EXAMPLES if p.stem == stem)))
    return [pod.command for role in plan.roles for pod in role.pods]


def test_multi_pod_group_uses_vllm_multi_node_data_parallel() -> None:
    leader, worker, *_ = _example("deepseek-v3")
    for argv, start in ((leader, "0"), (worker, "8")):
        assert argv[:2] == ["kubemoe-runtime", "serve"]
        assert _flag(argv, "--data-parallel-size") == "16"
        assert _flag(argv, "--data-parallel-size-local") == "8"
        assert _flag(argv, "--data-parallel-start-rank") == start
        assert _flag(argv, "--data-parallel-address") == "$(LWS_LEADER_ADDRESS)"
        assert "--data-parallel-rpc-port" in argv
        assert "--enable-expert-parallel" in argv
        assert json.loads(_flag(argv, "--kv-transfer-config"))["kv_connector"] == "NixlConnector"
    assert "--headless" not in leader
    assert "--headless" in worker


def test_colocated_single_pod_tensor_parallel() -> None:
    (argv,) = _example("mixtral-8x7b")
    assert _flag(argv, "--tensor-parallel-size") == "4"
    assert _flag(argv, "--model") == "/mnt/models/mixtral-8x7b-instruct"
    for absent in (
        "--data-parallel-size",
        "--data-parallel-address",
        "--enable-expert-parallel",
        "--kv-transfer-config",
    ):
        assert absent not in argv


def test_tiny_example_runs_the_torch_engine_in_float32() -> None:
    prefill, decode0, decode1 = _example("tiny-moe")
    assert _flag(prefill, "--engine") == "torch"
    assert _flag(prefill, "--dtype") == "float32"
    assert _flag(prefill, "--role") == "prefill"
    assert "--enable-expert-parallel" not in prefill
    assert _flag(decode1, "--data-parallel-start-rank") == "1"
    assert "--enable-expert-parallel" in decode0


def test_the_router_skips_the_hand_off_for_short_prompts_unless_told_not_to() -> None:
    from kubemoe_operator.plan.command import router_command
    from tests.operator.helpers import manifest

    def flags(**router: object) -> list[str]:
        plan = plan_manifest(manifest(router={"replicas": 1, **router}))
        return router_command(plan=plan, namespace="ns")

    argv = flags()  # the measured default
    assert argv[argv.index("--pd-min-prompt-tokens") + 1] == "1024"
    assert "--pd-min-prompt-tokens" not in flags(localPrefillBelowTokens=0)  # every prompt hands off
    argv = flags(localPrefillBelowTokens=4096)
    assert argv[argv.index("--pd-min-prompt-tokens") + 1] == "4096"
    colocated = plan_manifest(
        manifest(
            router={"replicas": 1, "localPrefillBelowTokens": 1024},
            serving={"mode": "colocated"},
            roles={"worker": {"parallelism": {"data": 2}}},
        )
    )
    assert "--pd-min-prompt-tokens" not in router_command(plan=colocated, namespace="ns")
