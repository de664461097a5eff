"""Prefill and decode tokens/s: the torch engine against transformers' `generate` and vLLM's CPU build.

All three run the same random bf16 checkpoint (bigmoe.py) with the same thread count, greedy, EOS
ignored, at batch 1 and 16 with 128-token prompts, in this one run:

    prefill tok/s = batch * 128 / (time of a 1-token generation)
    decode tok/s  = batch * N / (time of a (1 + N)-token generation - the prefill time)

The torch engine is timed through TorchEngine.generate (its batched prefill + decode loop, no HTTP);
transformers through model.generate; vLLM through its offline LLM.generate (vllm.LLM, --enforce-eager,
prefix caching off) in its own interpreter ($KUBEMOE_VLLM_PYTHON or .venv-vllm). Each is warmed up and
the best of REPEATS is kept. The memory-bandwidth bound of a decode step is the weight bytes it reads
(dense weights + the distinct experts its tokens pick) over the read bandwidth measured here.

The torch engine's lines say which path each hot part runs on this CPU: its flags, each MoE layer's
routed experts (a C kernel by instruction set, oneDNN packed GEMMs, or torch on row-major weights), and
how many dense projections (attention, dense MLPs, LM head) oneDNN packed.

Env: BENCH_LAYERS (default 8), BENCH_DECODE (new tokens, default 32), BENCH_SKIP_VLLM=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import torch
from bigmoe import Layout, checkpoint, layout_from_env, read_bandwidth_gbs, threads

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel
from kubemoe_runtime.engines.torch.model.moe import LocalExperts
from kubemoe_runtime.engines.torch.model.packing import PackedLinear

PROMPT_LEN: Final = 128
BATCHES: Final = (1, 16)
DECODE: Final = int(os.environ.get("BENCH_DECODE", "32"))
REPEATS: Final = 3
REPO: Final = Path(__file__).resolve().parents[1]

Rates = dict[str, float]  # "prefill@B" / "decode@B" -> tokens/s


def prompts(batch: int, *, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, 500, (batch, PROMPT_LEN), generator=gen).tolist()


def best_time(run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def measure(generate: Callable[[list[list[int]], int], object]) -> Rates:
    rates: Rates = {}
    generate(prompts(1, seed=99), 2)  # warm-up
    for batch in BATCHES:
        ids = prompts(batch, seed=batch)
        prefill = best_time(lambda ids=ids: generate(ids, 1))  # type: ignore[misc]
        total = best_time(lambda ids=ids: generate(ids, 1 + DECODE))  # type: ignore[misc]
        rates[f"prefill@{batch}"] = batch * PROMPT_LEN / prefill
        # A busy machine can make the difference meaningless; say so rather than print a huge rate.
        rates[f"decode@{batch}"] = batch * DECODE / (total - prefill) if total > prefill else float("nan")
    return rates


def print_paths(engine: TorchEngine) -> None:
    """Which path each MoE layer's routed experts and the dense projections take in this engine."""
    print(f"# torch engine: {moe_kernel.describe()}; torch ATen {torch.backends.cpu.get_cpu_capability()}")
    experts = [m for m in engine.model.modules() if isinstance(m, LocalExperts)]
    paths = [
        f"{moe_kernel.path()} kernel" if m.kernel else "oneDNN packed" if m.packed is not None else "torch"
        for m in experts
    ]
    runs = [f"{path} x{n}" for path, n in {p: paths.count(p) for p in dict.fromkeys(paths)}.items()]
    print(f"# torch engine, routed experts of its {len(experts)} MoE layers: {', '.join(runs) or 'none'}")
    print(f"#   per layer: {' | '.join(paths)}")
    packed = sum(isinstance(m, PackedLinear) for m in engine.model.modules())
    plain = sum(isinstance(m, torch.nn.Linear) for m in engine.model.modules())
    print(f"# torch engine, dense projections: {packed} oneDNN packed, {plain} torch linear (row-major)")


def torch_engine(model_dir: Path) -> Rates:
    engine = TorchEngine.load(model_dir, dtype=torch.bfloat16)
    print_paths(engine)
    return measure(lambda ids, n: engine.generate(ids, max_new_tokens=n))


def transformers_generate(model_dir: Path) -> Rates:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    model.eval()

    def generate(ids: list[list[int]], n: int) -> object:
        input_ids = torch.tensor(ids)
        with torch.inference_mode():
            return model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )

    return measure(generate)


VLLM_SCRIPT: Final = """
import json, sys, time
from vllm import LLM, SamplingParams
spec = json.loads(sys.argv[1])
llm = LLM(model=spec["model"], dtype="bfloat16", enforce_eager=True, max_model_len=512,
          enable_prefix_caching=False, max_num_seqs=32, seed=0)
def run(ids, n):
    params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
def best(ids, n):
    out = float("inf")
    for _ in range(spec["repeats"]):
        t = time.perf_counter(); run(ids, n); out = min(out, time.perf_counter() - t)
    return out
run(spec["warmup"], 2)
rates = {}
for batch, ids in spec["prompts"].items():
    prefill = best(ids, 1)
    total = best(ids, 1 + spec["decode"])
    rates[f"prefill@{batch}"] = int(batch) * len(ids[0]) / prefill
    decode = total - prefill
    rates[f"decode@{batch}"] = int(batch) * spec["decode"] / decode if decode > 0 else float("nan")
print("RATES " + json.dumps(rates), flush=True)
"""


def vllm_cpu(model_dir: Path, n_threads: int) -> Rates | None:
    python = os.environ.get("KUBEMOE_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    if not Path(python).exists():
        print(f"# vLLM skipped: no interpreter at {python} (make setup-vllm)")
        return None
    spec = {
        "model": str(model_dir),
        "prompts": {str(b): prompts(b, seed=b) for b in BATCHES},
        "warmup": prompts(1, seed=99),
        "decode": DECODE,
        "repeats": REPEATS,
    }
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(n_threads),
        "VLLM_CPU_OMP_THREADS_BIND": cpus,  # every CPU for the engine: no core kept back for an API server
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [python, "-c", VLLM_SCRIPT, json.dumps(spec)], capture_output=True, text=True, env=env, timeout=1800
    )
    for line in done.stdout.splitlines():
        if line.startswith("RATES "):
            rates: Rates = json.loads(line.removeprefix("RATES "))
            return rates
    print(f"# vLLM failed ({done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
    return None


def main() -> None:
    n_threads = threads()
    torch.set_num_threads(n_threads)
    layout: Layout = layout_from_env()
    model_dir = checkpoint(layout)
    n_params = sum(
        p.numel() for p in TorchEngine.load(model_dir, dtype=torch.bfloat16, pack=False).model.parameters()
    )
    bandwidth = read_bandwidth_gbs()
    print(f"# {layout.name}: {n_params / 1e6:.0f} M parameters, {n_threads} threads, prompts of {PROMPT_LEN}")
    print(f"# decode {DECODE} tokens; read bandwidth {bandwidth:.1f} GB/s (torch sum over 1 GiB)")

    results: dict[str, Rates] = {"torch engine": torch_engine(model_dir)}
    results["transformers"] = transformers_generate(model_dir)
    if os.environ.get("BENCH_SKIP_VLLM") != "1" and (rates := vllm_cpu(model_dir, n_threads)) is not None:
        results["vLLM CPU"] = rates
    bandwidth = max(bandwidth, read_bandwidth_gbs())  # again at the end: the better of two quiet moments
    print(f"# read bandwidth, best of start and end: {bandwidth:.1f} GB/s")

    keys = [f"{kind}@{b}" for b in BATCHES for kind in ("prefill", "decode")]
    print(f"{'tokens/s':<14}" + "".join(f"{k:>13}" for k in keys))
    for name, rates in results.items():
        print(f"{name:<14}" + "".join(f"{rates[k]:>13.1f}" for k in keys))
    ours = results["torch engine"]
    for ref in [r for r in results if r != "torch engine"]:
        print(f"{'ratio / ' + ref:<14}" + "".join(f"{ours[k] / results[ref][k]:>12.2f}x" for k in keys))
    for batch in BATCHES:
        step = layout.decode_step_bytes(batch)
        bound = batch * bandwidth * 1e9 / step
        key = f"decode@{batch}"
        shares = ", ".join(f"{name} {rates[key] / bound:.0%}" for name, rates in results.items())
        print(
            f"# decode@{batch}: a step reads {step / 1e6:.0f} MB of weights -> bound {bound:.0f} tok/s; "
            f"share of bound: {shares}"
        )


if __name__ == "__main__":
    main()
