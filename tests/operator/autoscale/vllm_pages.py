"""vLLM's own /metrics text for a group of N data-parallel ranks, as a wide group's leader serves it:
vLLM's PrometheusStatLogger (the API server's, which reports every engine of the group) built in
vLLM's interpreter on a tiny checkpoint's config, with the NIXL connector's series, every engine
labelled. 32 ranks: about 1.5 MB (the reviewer's dump: 1.55 MB)."""

from __future__ import annotations

import functools
import json
import re
import tempfile
from pathlib import Path

import torch

from kubemoe_runtime.tools.checkpoints import write_tiny_checkpoint
from tests.engine_python import VLLM

DUMP = """
import json, sys
from prometheus_client import REGISTRY, generate_latest
from vllm.config import KVTransferConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.metrics.loggers import PrometheusStatLogger
job = json.load(sys.stdin)
args = EngineArgs(
    model=job["model"], served_model_name=["deepseek-ai/DeepSeek-V3"], enforce_eager=True,
    kv_transfer_config=KVTransferConfig(kv_connector="NixlConnector", kv_role="kv_both"),
)
PrometheusStatLogger(args.create_engine_config(), list(range(job["ranks"])))
with open(job["out"], "wb") as f:
    f.write(generate_latest(REGISTRY))
"""


@functools.cache
def vllm_page(ranks: int) -> str:
    """The page, every engine's gauges at 0 and histograms empty (built once per test session)."""
    root = Path(tempfile.mkdtemp(prefix="vllm-page-"))
    model = write_tiny_checkpoint(root / "model", arch="qwen3_moe", dtype=torch.float32)
    out = root / "metrics.txt"
    job = {"model": str(model), "ranks": ranks, "out": str(out)}
    VLLM.run(DUMP, stdin=json.dumps(job), env={"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"})
    return out.read_text()


def with_waiting(page: str) -> str:
    """`page` with each engine's vllm:num_requests_waiting set to its engine index."""
    return re.sub(
        r'^(vllm:num_requests_waiting\{engine="(\d+)"[^}]*\}) \S+$',
        lambda m: f"{m.group(1)} {float(m.group(2))}",
        page,
        flags=re.MULTILINE,
    )
