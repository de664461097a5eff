"""What the serving benches share: processes on 127.0.0.1, a tiny checkpoint with room for long prompts,
and latency statistics.

The runtime's own processes (`kubemoe-runtime serve` for the torch engine and for the router) are started
with the tests' helpers (tests/runtime/serving.py, routing.py), so a bench runs exactly what the tests
and `kubemoe up` run: float32, one OMP thread per engine process.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from kubemoe_runtime.pod.kv_auth import KV_KEY_ENV
from tests.runtime.routing import RouterProcess
from tests.runtime.serving import Server

# The KV hand-off key every engine and router process here inherits (as a deployment's pods get one
# from its Secret): a disaggregated router does not start without it, and engines verify with it.
os.environ.setdefault(KV_KEY_ENV, secrets.token_hex(32))

CACHE: Final = Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "kubemoe-bench"))
MODEL: Final = "tiny-qwen"


class Process(Protocol):
    def wait_ready(self, *, timeout: float = ...) -> None: ...

    def stop(self) -> object: ...


def completion_body(*, tokens: int, seed: int, max_tokens: int, **extra: Any) -> dict[str, Any]:
    """A greedy /v1/completions request for MODEL on `tokens` random token ids (seeded), plus `extra`."""
    rng = random.Random(seed)
    prompt = [rng.randrange(10, 500) for _ in range(tokens)]
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}


def tiny_checkpoint(*, positions: int) -> Path:
    """The tests' tiny Qwen3-MoE (seed 0), written once, with `positions` positions instead of 512: RoPE
    has no trained length, so a random model runs as well at 4096 as at 512, and long prompts fit."""
    out = CACHE / f"tiny-qwen3moe-P{positions}"
    if (out / "model.safetensors.index.json").exists():
        return out
    from kubemoe_runtime.tools.checkpoints import write_tiny_checkpoint

    CACHE.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{out.name}.", dir=CACHE))  # renamed once complete
    write_tiny_checkpoint(scratch, arch="qwen3_moe", seed=0)
    config_path = scratch / "config.json"
    config = json.loads(config_path.read_text())
    config["max_position_embeddings"] = positions
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    scratch.rename(out)
    return out


@contextlib.contextmanager
def log_dir() -> Iterator[Path]:
    """Where the processes' logs go; kept (and named) when BENCH_KEEP_LOGS=1."""
    if os.environ.get("BENCH_KEEP_LOGS") == "1":
        path = Path(tempfile.mkdtemp(prefix="kubemoe-bench-logs-"))
        print(f"# logs in {path}")
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix="kubemoe-bench-logs-") as scratch:
            yield Path(scratch)


def engine(
    model: Path, *, role: str, logs: Path, stack: contextlib.ExitStack, args: Sequence[str] = ()
) -> Server:
    """A torch-engine `serve` process, stopped when `stack` closes (on error too)."""
    server = Server(
        model, args=["--served-model-name", MODEL, "--role", role, *args], log_dir=logs, name=role
    )
    stack.callback(server.stop)
    return server


def router(*, services: dict[str, str], logs: Path, stack: contextlib.ExitStack) -> RouterProcess:
    """A `serve --role router` process over `services` (role -> HOST:PORT), stopped with `stack`."""
    args = ["--served-model-name", MODEL]
    for role, address in services.items():
        args += [f"--{role}-service", address]
    process = RouterProcess(args=args, log_dir=logs)
    stack.callback(process.stop)
    return process


def wait_ready(*processes: Process) -> None:
    for process in processes:
        process.wait_ready()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): the value at least q% of the samples do not exceed."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
