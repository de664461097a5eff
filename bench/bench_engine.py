"""Prefill and decode tokens/s: the torch engine against transformers' `generate` and vLLM's CPU build.

All three run the same random bf16 checkpoint (bigmoe.py) with the same thread count, greedy, EOS
ignored, at batch 1 and 16 with 128-token prompts, in this one run:

    prefill tok/s = batch * 128 / (time of a 1-token generation)
    decode tok/s  = batch * N / (time of a (1 + N)-token generation - the prefill time)

each time the best of REPEATS, after a warm-up at that batch. Decode is a difference of two timings, so
prefill's jitter moves it: N (96) keeps decode the larger part at batch 16 (with N = 32, prefill's 10%
swings between repeats moved decode@16 by 20-25%).

The torch engine is timed through TorchEngine.generate (its batched prefill + decode loop, no HTTP);
transformers through model.generate; vLLM through its offline LLM.generate (vllm.LLM, --enforce-eager,
prefix caching off) in its own interpreter ($KUBEMOE_VLLM_PYTHON or .venv-vllm). Each is warmed up and
the best of REPEATS is kept. The memory-bandwidth bound of a decode step is the weight bytes it reads
(dense weights + the distinct experts its tokens pick) over the read bandwidth measured here.

Each measurement runs in a process of its own, per instruction-set profile:

    native   this CPU as it is: the torch engine once per MoE path it can run (each C kernel, and the
             torch path: KUBEMOE_MOE_KERNEL), transformers, vLLM
    avx2     as a CPU with AVX2 and FMA only runs it, on a machine with AVX-512: the engine's view capped
             (KUBEMOE_CPU_ISA=avx2) and torch's, oneDNN's and MKL's (ATEN_CPU_CAPABILITY=avx2,
             ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2) for every engine. vLLM also gets
             avx2_site/ on its PYTHONPATH, whose sitecustomize makes torch.cpu's AVX-512 and AMX
             queries answer False: vLLM then loads its AVX2 library (vllm/_C_AVX2) and non-AMX paths,
             as on an AVX2 CPU (without it, it loads its AVX512-BF16 one and dies under the oneDNN
             cap). Where torch itself reads cpuid the cap is not the real thing: transformers' (and
             vLLM's) bf16 GEMMs go to oneDNN at AVX2 here, and on a real AVX2 CPU to torch's own
             loop. So the profile's references are close, not exact; llama.cpp, built for AVX2
             alone, is a further anchor

The torch engine's lines say which path each hot part runs: the CPU flags it sees, each MoE layer's
routed experts (a C kernel by instruction set, or torch on row-major weights), and
the dense projections (attention, dense MLPs, LM head): oneDNN packed, the linear kernel (KernelLinear,
on CPUs whose torch bf16 GEMM is slow), or torch.

llama.cpp (llamacpp.py: its llama-batched-bench, built here from PyPI's llama-cpp-python sdist per
profile, on the checkpoint converted to a bf16 GGUF) is a further reference where it can be built.

Env: BENCH_LAYERS (default 8), BENCH_DECODE (new tokens, default 96), BENCH_SKIP_VLLM=1,
BENCH_SKIP_LLAMACPP=1, BENCH_ISA=native,avx2 (the profiles; default both where the CPU has AVX-512,
else native), BENCH_ROUNDS (default 1): every engine of a profile measured once a round, in turn, keeping
each rate's best over the rounds; on a shared machine a slow minute then falls on every engine alike, not
on whichever ran in it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import torch
from bigmoe import DECODE, Layout, checkpoint, layout_from_env, read_bandwidth_gbs, threads
from llamacpp import llamacpp_rates

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel
from kubemoe_runtime.engines.torch.kernels.linear import KernelLinear, form
from kubemoe_runtime.engines.torch.model.moe import LocalExperts
from kubemoe_runtime.engines.torch.model.packing import PackedLinear

PROMPT_LEN: Final = 128
BATCHES: Final = (1, 16)
REPEATS: Final = 3
ROUNDS: Final = int(os.environ.get("BENCH_ROUNDS", "1"))
REPO: Final = Path(__file__).resolve().parents[1]

Rates = dict[str, float]  # "prefill@B" / "decode@B" -> tokens/s


def prompts(batch: int, *, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, 500, (batch, PROMPT_LEN), generator=gen).tolist()


def measure(generate: Callable[[list[list[int]], int], object]) -> Rates:
    rates: Rates = {}
    for batch in BATCHES:
        ids = prompts(batch, seed=batch)
        generate(ids, 2)  # warm-up at this batch's shapes: its first prefill is otherwise the slowest
        prefill, total = math.inf, math.inf
        for _ in range(REPEATS):
            started = time.perf_counter()
            generate(ids, 1)
            prefilled = time.perf_counter()
            generate(ids, 1 + DECODE)
            prefill, total = min(prefill, prefilled - started), min(total, time.perf_counter() - prefilled)
        rates[f"prefill@{batch}"] = batch * PROMPT_LEN / prefill
        # A busy machine can make the difference meaningless; say so rather than print a huge rate.
        rates[f"decode@{batch}"] = batch * DECODE / (total - prefill) if total > prefill else math.nan
    return rates


def print_paths(engine: TorchEngine) -> None:
    """Which path each MoE layer's routed experts and the dense projections take in this engine."""
    print(f"# {moe_kernel.describe()}; torch ATen {torch.backends.cpu.get_cpu_capability()}")
    experts = [m for m in engine.model.modules() if isinstance(m, LocalExperts)]
    paths = [f"{moe_kernel.path()} kernel" if m.kernel else "torch" for m in experts]
    runs = [f"{path} x{n}" for path, n in {p: paths.count(p) for p in dict.fromkeys(paths)}.items()]
    print(f"# torch engine, routed experts of its {len(experts)} MoE layers: {', '.join(runs) or 'none'}")
    print(f"#   per layer: {' | '.join(paths)}")
    modules = list(engine.model.modules())
    packed = sum(isinstance(m, PackedLinear) for m in modules)
    kernel = sum(isinstance(m, KernelLinear) for m in modules)
    plain = sum(isinstance(m, torch.nn.Linear) for m in modules)
    forms = " / ".join(f"{rows} rows {form(rows, 1024, 1024)}" for rows in (1, 16, 128, 2048))
    print(
        f"# torch engine, dense projections: {packed} oneDNN packed, {kernel} linear kernel"
        f"{f' ({forms})' if kernel else ''}, {plain} torch linear (row-major)"
    )


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
rates = {}
for batch, ids in spec["prompts"].items():
    run(ids, 2)
    prefill = total = float("inf")
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter(); run(ids, 1); t1 = time.perf_counter(); run(ids, 1 + spec["decode"])
        prefill, total = min(prefill, t1 - t0), min(total, time.perf_counter() - t1)
    rates[f"prefill@{batch}"] = int(batch) * len(ids[0]) / prefill
    decode = total - prefill
    rates[f"decode@{batch}"] = int(batch) * spec["decode"] / decode if decode > 0 else float("nan")
print("RATES " + json.dumps(rates), flush=True)
"""


def vllm_cpu(model_dir: Path, n_threads: int, profile_env: dict[str, str]) -> Rates | None:
    python = os.environ.get("KUBEMOE_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    if not Path(python).exists():
        print(f"# vLLM skipped: no interpreter at {python} (make setup-vllm)")
        return None
    spec = {
        "model": str(model_dir),
        "prompts": {str(b): prompts(b, seed=b) for b in BATCHES},
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
        **profile_env,
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


PROFILES: Final[dict[str, dict[str, str]]] = {
    "native": {},
    "avx2": {
        moe_kernel.ISA_ENV: "avx2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    },
}


AVX2_SITE: Final = Path(__file__).resolve().parent / "avx2_site"


def vllm_env(profile: str) -> dict[str, str]:
    """`profile`'s environment for vLLM: under avx2, its CPU queries capped too (avx2_site/)."""
    env = dict(PROFILES[profile])
    if profile == "avx2":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(AVX2_SITE), os.environ.get("PYTHONPATH")]))
    return env


def profiles() -> list[str]:
    chosen = os.environ.get("BENCH_ISA")
    if chosen:
        names = [n.strip() for n in chosen.split(",") if n.strip()]
        if unknown := [n for n in names if n not in PROFILES]:
            sys.exit(f"BENCH_ISA: no profile {', '.join(unknown)} (profiles: {', '.join(PROFILES)})")
        return names
    return ["native", "avx2"] if "avx512f" in moe_kernel.cpu_flags() else ["native"]


def moe_paths(profile: str) -> list[str]:
    """The MoE paths the torch engine runs under `profile`: each kernel the (capped) CPU has, then torch."""
    flags = moe_kernel.cpu_flags()
    if profile == "avx2":
        flags = frozenset(f for f in flags if not f.startswith(("avx512", "amx")))
    return [p for p in moe_kernel.PATHS if moe_kernel.NEEDS[p] <= flags] + [moe_kernel.TORCH]


def child(engine: str, model_dir: Path) -> None:
    """One engine's rates in this process (its environment set by the parent), as a RATES line."""
    torch.set_num_threads(threads())
    if engine == "torch":
        rates = torch_engine(model_dir)
    elif engine == "transformers":
        rates = transformers_generate(model_dir)
    else:
        sys.exit(f"no engine {engine}")
    print("RATES " + json.dumps(rates), flush=True)


def run_child(engine: str, model_dir: Path, env: dict[str, str]) -> Rates | None:
    """`child(engine)` in a fresh interpreter with `env` added; its '#' lines are passed on."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", engine, str(model_dir)],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=3600,
    )  # fmt: skip
    rates: Rates | None = None
    for line in done.stdout.splitlines():
        if line.startswith("RATES "):
            rates = json.loads(line.removeprefix("RATES "))
        elif line.startswith("#"):
            print(line)
    if rates is None:
        print(f"# {engine} failed ({done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
    return rates


def report(results: dict[str, Rates], layout: Layout, bandwidth: float) -> None:
    keys = [f"{kind}@{b}" for b in BATCHES for kind in ("prefill", "decode")]
    width = max(14, *(len(n) + 1 for n in results))
    print(f"{'tokens/s':<{width}}" + "".join(f"{k:>13}" for k in keys))
    for name, rates in results.items():
        print(f"{name:<{width}}" + "".join(f"{rates[k]:>13.1f}" for k in keys))
    ours = [n for n in results if n.startswith("torch engine")]
    for ref in ("vLLM CPU", "llama.cpp", "transformers"):
        for name in [n for n in ours if ref in results]:
            label = f"{name.removeprefix('torch engine, ')} / {ref}"
            print(
                f"{label:<{width}}" + "".join(f"{results[name][k] / results[ref][k]:>12.2f}x" for k in keys)
            )
    for name in ours:
        rates = results[name]
        if rates["decode@16"] < rates["decode@1"]:
            print(f"# {name}: batch 16 decodes fewer tokens/s than batch 1")
    for batch in BATCHES:
        step = layout.decode_step_bytes(batch)
        bound = batch * bandwidth * 1e9 / step
        key = f"decode@{batch}"
        shares = ", ".join(f"{name} {rates[key] / bound:.0%}" for name, rates in results.items())
        print(
            f"# decode@{batch}: a step reads {step / 1e6:.0f} MB of weights -> bound {bound:.0f} tok/s; "
            f"share of bound: {shares}"
        )


def measure_profile(profile: str, model_dir: Path, n_threads: int) -> dict[str, Rates]:
    """Each engine's rates under `profile`, one after another."""
    env = PROFILES[profile]
    results: dict[str, Rates] = {}
    for path in moe_paths(profile):
        print(f"# torch engine, MoE path {path}:")
        if rates := run_child("torch", model_dir, {**env, moe_kernel.FORCE_ENV: path}):
            results[f"torch engine, {path}"] = rates
    if rates := run_child("transformers", model_dir, env):
        results["transformers"] = rates
    if os.environ.get("BENCH_SKIP_VLLM") != "1" and (
        rates := vllm_cpu(model_dir, n_threads, vllm_env(profile))
    ):
        results["vLLM CPU"] = rates
    if os.environ.get("BENCH_SKIP_LLAMACPP") != "1" and (
        rates := llamacpp_rates(model_dir, n_threads, profile)
    ):
        results["llama.cpp"] = rates
    return results


def best_rates(held: Rates | None, new: Rates) -> Rates:
    """The better of two measurements of one engine, rate by rate (NaN, a busy moment, loses)."""
    if held is None:
        return new
    return {k: max((r for r in (held[k], new[k]) if not math.isnan(r)), default=math.nan) for k in new}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]))
        return
    n_threads = threads()
    layout: Layout = layout_from_env()
    model_dir = checkpoint(layout)
    n_params = sum(
        p.numel() for p in TorchEngine.load(model_dir, dtype=torch.bfloat16, pack=False).model.parameters()
    )
    bandwidth = read_bandwidth_gbs()
    flags = moe_kernel.cpu_flags()
    print(f"# CPU {platform.machine()} flags: {' '.join(f for f in moe_kernel.SHOWN_FLAGS if f in flags)}")
    print(f"# {layout.name}: {n_params / 1e6:.0f} M parameters, {n_threads} threads, prompts of {PROMPT_LEN}")
    print(f"# decode {DECODE} tokens; read bandwidth {bandwidth:.1f} GB/s (torch sum over 1 GiB)")
    tables: dict[str, dict[str, Rates]] = {}
    for profile in profiles():
        env = PROFILES[profile]
        print(
            f"\n## profile {profile}" + (f": {' '.join(f'{k}={v}' for k, v in env.items())}" if env else "")
        )
        results: dict[str, Rates] = {}
        for round_ in range(ROUNDS):
            if ROUNDS > 1:
                print(f"# round {round_ + 1} of {ROUNDS}")
            for name, rates in measure_profile(profile, model_dir, n_threads).items():
                print(f"#   {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()))
                results[name] = best_rates(results.get(name), rates)
        tables[profile] = results
    bandwidth = max(bandwidth, read_bandwidth_gbs())  # again at the end: the better of two quiet moments
    print(f"\n# read bandwidth, best of start and end: {bandwidth:.1f} GB/s")
    for profile, results in tables.items():
        print(f"\n## {profile}")
        report(results, layout, bandwidth)


if __name__ == "__main__":
    main()
