"""The operator's rendered pod commands are what `kubemoe-runtime serve` parses.

The runtime never imports the operator; this test (outside both packages) is where the two meet.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.plan.command import S3_LOAD_FORMAT
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_runtime.pod.settings import parse_args
from tests.operator.helpers import EXAMPLES


def pod_commands() -> list[tuple[str, list[str], list[str]]]:
    """(name, argv, the flags serve hands to vLLM unread: --load-format for s3://, then extraArgs)."""
    commands = []
    for path in EXAMPLES:
        plan = plan_manifest(load_manifest(path))
        for_vllm = ["--load-format", S3_LOAD_FORMAT] if plan.source.startswith("s3://") else []
        commands += [
            (f"{path.stem}/{role.role}/{pod.index}", pod.command, [*for_vllm, *plan.extra_args])
            for role in plan.roles
            for pod in role.pods
        ]
    return commands


@pytest.mark.parametrize(("name", "argv", "for_vllm"), pod_commands(), ids=[n for n, _, _ in pod_commands()])
def test_every_rendered_pod_command_parses(name: str, argv: list[str], for_vllm: list[str]) -> None:
    assert argv[:2] == ["kubemoe-runtime", "serve"]
    settings, unknown = parse_args(argv[2:])
    assert unknown == for_vllm
    flag = dict(zip(argv, [*argv[1:], ""], strict=True))
    assert settings.engine == flag["--engine"]
    assert settings.role == flag["--role"]
    assert settings.headless == ("--headless" in argv)
    assert settings.data_parallel_start_rank == int(flag.get("--data-parallel-start-rank", 0))
    assert settings.data_parallel_size == int(flag.get("--data-parallel-size", 1))
    assert (settings.kv_transfer_config is not None) == ("--kv-transfer-config" in argv)
    if settings.engine == "torch":
        assert settings.torch_problems() == []


def test_the_tiny_example_runs_on_the_torch_engine() -> None:
    torch_pods = [(n, argv) for n, argv, _ in pod_commands() if "torch" in argv]
    assert torch_pods, "examples/tiny-moe.yaml should use the torch engine"
    settings = [parse_args(argv[2:])[0] for _, argv in torch_pods]
    headless = [s for s in settings if s.headless]
    assert all(s.data_parallel_start_rank > 0 for s in headless)
    assert {s.kv_transfer_config.kv_role for s in settings if s.kv_transfer_config} <= {
        "kv_producer",
        "kv_consumer",
        "kv_both",
    }


def test_inconsistent_ranks_are_refused() -> None:
    base = ["--model", "m", "--data-parallel-size", "2", "--enable-expert-parallel"]
    with pytest.raises(ValidationError, match="headless"):
        parse_args(
            [
                *base,
                "--data-parallel-size-local",
                "1",
                "--data-parallel-start-rank",
                "1",
                "--data-parallel-rpc-port",
                "1234",
            ]
        )
    with pytest.raises(ValidationError, match="do not fit"):
        parse_args([*base, "--data-parallel-start-rank", "1", "--headless"])
    with pytest.raises(ValidationError, match="rpc-port"):
        parse_args([*base, "--data-parallel-size-local", "1"])
    with pytest.raises(ValidationError, match="kv_role"):
        parse_args([*base, "--kv-transfer-config", '{"kv_connector": "x", "kv_role": "sideways"}'])
    settings, _ = parse_args(["--model", "m", "--tensor-parallel-size", "2"])
    assert settings.torch_problems() == [
        "the torch engine has no tensor parallelism; use --tensor-parallel-size 1"
    ]
