"""`kubemoe-runtime serve`'s settings, with vLLM's flag names: what every serving pod reads from its argv.

The operator renders the same argv for either engine (operator/kubemoe_operator/plan/command.py):

    kubemoe-runtime serve --engine torch|vllm --role ROLE --model PATH [--served-model-name NAME]
        --host H --port P --dtype D --max-model-len N --tensor-parallel-size 1
        [--data-parallel-size N --data-parallel-size-local L --data-parallel-start-rank S|auto
         --data-parallel-address A --data-parallel-rpc-port R] [--enable-expert-parallel] [--headless]
        [--kv-transfer-config JSON] [--drain-timeout S]
        [--redundant-experts N --expert-placement PATH]   (torch engine, expert-parallel roles)

`auto` start ranks come from LeaderWorkerSet's worker index (start_rank.py). The torch engine runs them
(engines/torch/serve/pod.py); vLLM gets them, and every flag these settings do not know (engines/vllm/).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kubemoe_runtime.pod.drain import drain_timeout_default
from kubemoe_runtime.pod.start_rank import AUTO, resolve_start_rank

DTYPE_NAMES = ("bfloat16", "float16", "float32")
"""--dtype's choices besides `auto` (the checkpoint's own)."""


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """The flags `serve` takes: vLLM's names, plus --engine, --role and --headless."""
    parser.add_argument("--engine", choices=("torch", "vllm"), default="torch")
    parser.add_argument("--role", choices=("prefill", "decode", "worker", "router"), default=None)
    parser.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
    parser.add_argument("--served-model-name", nargs="+", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", choices=(*DTYPE_NAMES, "auto"), default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--data-parallel-size", type=int, default=1)
    parser.add_argument("--data-parallel-size-local", type=int, default=None)
    parser.add_argument(
        "--data-parallel-start-rank", default="0", help=f"a number, or {AUTO!r}: see start_rank.py"
    )
    parser.add_argument("--data-parallel-address", default="127.0.0.1")
    parser.add_argument("--data-parallel-rpc-port", type=int, default=0, help="0: pick a free port")
    parser.add_argument("--enable-expert-parallel", action="store_true")
    parser.add_argument("--headless", action="store_true", help="run ranks only; no API")
    parser.add_argument("--kv-transfer-config", default=None, help="JSON, as vLLM's")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="KV-cache slots per rank")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="prompt tokens per step")
    parser.add_argument("--max-waiting-requests", type=int, default=256, help="bound of the waiting queue")
    parser.add_argument(
        "--redundant-experts",
        type=int,
        default=0,
        help="extra expert slots per MoE layer over the group (a multiple of the expert-parallel size): "
        "each rank holds (experts + N) / ranks slots (torch engine; docs/expert-load.md)",
    )
    parser.add_argument(
        "--expert-placement",
        default=None,
        help="a placement document to start with (the group leader's is used; no file: the default "
        "placement) (torch engine; docs/expert-load.md)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=drain_timeout_default(),
        help="seconds in-flight requests may take to finish after SIGTERM (pod/drain.py); "
        "--headless pods do not drain",
    )


class KVTransferConfig(BaseModel):
    """vLLM's --kv-transfer-config; the P/D connector reads the rest of its fields."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kv_connector: str
    kv_role: Literal["kv_producer", "kv_consumer", "kv_both"]


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Literal["torch", "vllm"] = "torch"
    role: str = "worker"
    model: Path
    served_model_names: tuple[str, ...]
    host: str
    port: int = Field(ge=0, le=65535)
    dtype: str
    max_model_len: int | None = Field(default=None, ge=2)
    gpu_memory_utilization: float = Field(gt=0, le=1)
    tensor_parallel_size: int = Field(ge=1)
    data_parallel_size: int = Field(ge=1)
    data_parallel_size_local: int = Field(ge=1)
    data_parallel_start_rank: int = Field(ge=0)
    data_parallel_address: str
    data_parallel_rpc_port: int = Field(ge=0, le=65535)
    enable_expert_parallel: bool
    headless: bool
    kv_transfer_config: KVTransferConfig | None = None
    max_num_seqs: int = Field(ge=1)
    max_num_batched_tokens: int = Field(ge=1)
    max_waiting_requests: int = Field(ge=1)
    drain_timeout: float = Field(default_factory=drain_timeout_default, ge=0, allow_inf_nan=False)
    redundant_experts: int = Field(default=0, ge=0)
    expert_placement: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeSettings:
        kv = json.loads(args.kv_transfer_config) if args.kv_transfer_config else None
        return cls(
            engine=args.engine,
            role=args.role or "worker",
            model=Path(args.model),
            served_model_names=tuple(args.served_model_name or [args.model]),
            host=args.host,
            port=args.port,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization,
            tensor_parallel_size=args.tensor_parallel_size,
            data_parallel_size=args.data_parallel_size,
            data_parallel_size_local=args.data_parallel_size_local or args.data_parallel_size,
            data_parallel_start_rank=resolve_start_rank(
                args.data_parallel_start_rank,
                local=args.data_parallel_size_local or args.data_parallel_size,
            ),
            data_parallel_address=args.data_parallel_address,
            data_parallel_rpc_port=args.data_parallel_rpc_port,
            enable_expert_parallel=args.enable_expert_parallel,
            headless=args.headless,
            kv_transfer_config=kv,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_waiting_requests=args.max_waiting_requests,
            drain_timeout=args.drain_timeout,
            redundant_experts=args.redundant_experts,
            expert_placement=Path(args.expert_placement) if args.expert_placement else None,
        )

    @model_validator(mode="after")
    def _ranks_fit(self) -> ServeSettings:
        first, local, size = (
            self.data_parallel_start_rank,
            self.data_parallel_size_local,
            self.data_parallel_size,
        )
        if first + local > size:
            raise ValueError(f"ranks {first}..{first + local - 1} do not fit a data-parallel size of {size}")
        if self.headless == (first == 0):
            raise ValueError("the pod holding rank 0 serves the API; every other pod runs --headless")
        if local < size and self.data_parallel_rpc_port == 0:
            raise ValueError("a group over several pods needs --data-parallel-rpc-port (and an address)")
        return self

    def torch_problems(self) -> list[str]:
        """What the torch engine cannot do with these settings."""
        problems = []
        if self.tensor_parallel_size != 1:
            problems.append("the torch engine has no tensor parallelism; use --tensor-parallel-size 1")
        if self.data_parallel_size > 1 and not self.enable_expert_parallel:
            problems.append("the torch engine runs data-parallel ranks only with --enable-expert-parallel")
        return problems


def parse_args(argv: Sequence[str]) -> tuple[ServeSettings, list[str]]:
    """Settings from a pod's argv (after `serve`), and the flags the torch engine does not know."""
    parser = argparse.ArgumentParser(prog="kubemoe-runtime serve")
    add_serve_flags(parser)
    args, unknown = parser.parse_known_args(list(argv))
    return ServeSettings.from_args(args), unknown
