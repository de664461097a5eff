"""`serve --engine vllm`'s argument list, checked by vLLM's own parser; `auto` start ranks.

vLLM lives in its own interpreter ($KUBEMOE_VLLM_PYTHON), so its parser runs in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from kubemoe_operator.api.manifest import load_manifest
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_runtime.engines.vllm.command import (
    API_SERVER_MODULE,
    HEADLESS_LAUNCHER,
    flags_given,
    vllm_args,
    vllm_command,
)
from kubemoe_runtime.pod.settings import parse_args
from kubemoe_runtime.pod.start_rank import StartRankError, resolve_start_rank
from kubemoe_runtime.serve import main as serve_main
from tests.engine_python import VLLM
from tests.operator.helpers import EXAMPLES

# vLLM's own parsing: make_arg_parser + validate_parsed_serve_args, as its api_server's main() does.
PARSE_WITH_VLLM = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser
FIELDS = json.loads(sys.argv[1])
out = []
for argv in json.load(sys.stdin):
    args = make_arg_parser(FlexibleArgumentParser(prog="vllm serve")).parse_args(argv)
    validate_parsed_serve_args(args)
    out.append({f: getattr(args, f) for f in FIELDS})
print(json.dumps(out, default=str))
"""
FIELDS = (
    "model",
    "served_model_name",
    "host",
    "port",
    "dtype",
    "max_model_len",
    "gpu_memory_utilization",
    "tensor_parallel_size",
    "data_parallel_size",
    "data_parallel_size_local",
    "data_parallel_start_rank",
    "data_parallel_address",
    "data_parallel_rpc_port",
    "enable_expert_parallel",
    "headless",
    "kv_transfer_config",
    "load_format",
    "max_num_seqs",
    "enforce_eager",
)
# The tail of HEADLESS_LAUNCHER that would start engines; everything before it must import and parse.
LAUNCHER_IMPORTS = HEADLESS_LAUNCHER.split("cli_env_setup()\n")[0]


def parse_with_vllm(argvs: list[list[str]]) -> list[dict[str, Any]]:
    code = LAUNCHER_IMPORTS + PARSE_WITH_VLLM.replace(
        "FIELDS = json.loads(sys.argv[1])", f"FIELDS = {FIELDS!r}"
    )
    parsed: list[dict[str, Any]] = json.loads(VLLM.run(code, stdin=json.dumps(argvs)))
    return parsed


def vllm_pod_argvs() -> list[tuple[str, list[str]]]:
    """Each example's rendered pod commands, run as --engine vllm."""
    out = []
    for path in EXAMPLES:
        plan = plan_manifest(load_manifest(path))
        for role in plan.roles:
            for pod in role.pods:
                argv = list(pod.command[2:])
                argv[argv.index("--engine") + 1] = "vllm"
                out.append((f"{path.stem}/{role.role}/{pod.index}", argv))
    return out


def as_vllm(argv: list[str]) -> list[str]:
    """serve's argv -> vLLM's flags (without interpreter and entry point)."""
    settings, unknown = parse_args(argv)
    return vllm_args(settings, port=18000, given=flags_given(argv), extra=unknown)


SYNTHETIC = {
    "single": ["--model", "/m", "--dtype", "float32", "--max-model-len", "256", "--enforce-eager"],
    "leader-of-4-pods": [
        *("--model", "/m", "--role", "decode", "--data-parallel-size", "16", "--data-parallel-size-local"),
        *("4", "--data-parallel-start-rank", "0", "--data-parallel-address", "10.0.0.1"),
        *("--data-parallel-rpc-port", "29550", "--enable-expert-parallel"),
        *("--kv-transfer-config", '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'),
        *("--max-num-seqs", "64"),
    ],
    "headless-pod-2": [
        *("--model", "/m", "--data-parallel-size", "16", "--data-parallel-size-local", "4"),
        *("--data-parallel-start-rank", "8", "--data-parallel-address", "10.0.0.1"),
        *("--data-parallel-rpc-port", "29550", "--enable-expert-parallel", "--headless"),
    ],
    "s3-extra-args": ["--model", "s3://b/p", "--load-format", "runai_streamer", "--max-num-seqs", "8"],
}


def test_every_vllm_argv_is_accepted_by_vllms_parser() -> None:
    cases = [*vllm_pod_argvs(), *SYNTHETIC.items()]
    parsed = parse_with_vllm([as_vllm(list(argv)) for _, argv in cases])
    assert len(parsed) == len(cases)
    for (name, argv), got in zip(cases, parsed, strict=True):
        settings, _ = parse_args(argv)
        assert got["model"] == str(settings.model), name
        assert got["served_model_name"] == list(settings.served_model_names), name
        assert (got["host"], got["port"]) == ("127.0.0.1", 18000), name
        assert got["dtype"] == settings.dtype, name
        assert got["max_model_len"] == settings.max_model_len, name
        assert got["tensor_parallel_size"] == settings.tensor_parallel_size, name
        assert got["data_parallel_size"] == settings.data_parallel_size, name
        assert got["enable_expert_parallel"] == settings.enable_expert_parallel, name
        assert got["headless"] == settings.headless, name
        if settings.data_parallel_size > 1:
            assert got["data_parallel_size_local"] == settings.data_parallel_size_local, name
        # An API pod must not pass a start rank: vLLM would read it as hybrid load balancing.
        assert got["data_parallel_start_rank"] == (
            settings.data_parallel_start_rank if settings.headless else None
        )
        if settings.data_parallel_size_local < settings.data_parallel_size:
            assert got["data_parallel_address"] == settings.data_parallel_address, name
            assert got["data_parallel_rpc_port"] == settings.data_parallel_rpc_port, name
        kv = settings.kv_transfer_config
        assert (got["kv_transfer_config"] is None) == (kv is None), name
        if kv is not None:
            assert kv.kv_connector in got["kv_transfer_config"], name
    by_name = dict(zip([n for n, _ in cases], parsed, strict=True))
    assert by_name["single"]["enforce_eager"] is True  # an unknown flag goes to vLLM unchanged
    assert by_name["leader-of-4-pods"]["max_num_seqs"] == 64  # named in the argv: passed
    assert by_name["headless-pod-2"]["max_num_seqs"] is None  # serve's torch default: not passed
    assert by_name["s3-extra-args"]["load_format"] == "runai_streamer"
    assert by_name["s3-extra-args"]["max_num_seqs"] == 8


def test_entry_points() -> None:
    api, _ = parse_args(SYNTHETIC["leader-of-4-pods"])
    assert vllm_command(api, python="/py", port=1)[:3] == ["/py", "-m", API_SERVER_MODULE]
    headless, _ = parse_args(SYNTHETIC["headless-pod-2"])
    assert vllm_command(headless, python="/py", port=1)[:3] == ["/py", "-c", HEADLESS_LAUNCHER]
    torch_only, _ = parse_args([*SYNTHETIC["single"], "--max-waiting-requests", "9"])
    assert "--max-waiting-requests" not in vllm_args(torch_only, port=1, given={"--max-waiting-requests"})


def test_start_rank_numbers_and_auto() -> None:
    assert resolve_start_rank("0", local=4, env={}) == 0
    assert resolve_start_rank("12", local=4, env={"LWS_WORKER_INDEX": "1"}) == 12  # a number wins
    assert [resolve_start_rank("auto", local=4, env={"LWS_WORKER_INDEX": str(i)}) for i in range(4)] == [
        0,
        4,
        8,
        12,
    ]
    assert resolve_start_rank("auto", local=1, env={"LWS_WORKER_INDEX": "3"}) == 3
    with pytest.raises(StartRankError, match="LWS_WORKER_INDEX"):
        resolve_start_rank("auto", local=4, env={})
    with pytest.raises(StartRankError, match="non-negative"):
        resolve_start_rank("auto", local=4, env={"LWS_WORKER_INDEX": "-1"})
    with pytest.raises(StartRankError, match="number or 'auto'"):
        resolve_start_rank("first", local=4, env={})
    with pytest.raises(StartRankError, match="negative"):
        resolve_start_rank("-2", local=4, env={})


def test_one_worker_template_gives_each_pod_its_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same argv in every pod of a 4-pod group of 16 ranks: LWS_WORKER_INDEX tells them apart."""
    common = ["--model", "m", "--data-parallel-size", "16", "--data-parallel-size-local", "4"]
    common += ["--data-parallel-start-rank", "auto", "--data-parallel-rpc-port", "29550"]
    common += ["--enable-expert-parallel"]
    starts = []
    for index in range(4):
        monkeypatch.setenv("LWS_WORKER_INDEX", str(index))
        settings, _ = parse_args([*common, *([] if index == 0 else ["--headless"])])
        starts.append(settings.data_parallel_start_rank)
        assert vllm_args(settings, port=1).count("--data-parallel-start-rank") == (index > 0)
    assert starts == [0, 4, 8, 12]
    monkeypatch.delenv("LWS_WORKER_INDEX")
    with pytest.raises(StartRankError):
        parse_args(common)


def test_serve_reports_an_unresolvable_start_rank() -> None:
    argv = ["--model", "m", "--data-parallel-size", "2", "--data-parallel-start-rank", "auto"]
    done = subprocess.run(
        [sys.executable, "-m", "kubemoe_runtime.cli", "serve", *argv],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 2
    assert "needs $LWS_WORKER_INDEX" in done.stderr
    assert serve_main(["--model", "m", "--data-parallel-start-rank", "x"]) == 2
