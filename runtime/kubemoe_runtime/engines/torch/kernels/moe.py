"""The routed experts of a MoE layer in one call of the `moe_bf16.c` kernel (bf16, x86 with AVX512-BF16).

Why: at decode's few rows per expert, two oneDNN GEMM calls per picked expert stream the weights at about
half the memory bandwidth, each call paying its own parallel fork/join and ramp-up; the kernel runs the
whole layer — gate/up, SiLU, down, the routing-weighted sum — in one OpenMP region at close to bandwidth
(bench/bench_moe_kernel.py: 1.8x at 16 rows). From about 64 rows an expert (long prefills) oneDNN's
blocked GEMM is as fast or faster, and LocalExperts uses that instead, on the same weights: the kernel
reads the engine's own row-major expert stacks, so the experts need no second, packed copy.

`load()` is None, and the engine keeps its torch path, off x86 Linux, on a CPU without AVX512-BF16, with
`KUBEMOE_KERNELS=0`, or where the kernel cannot be built or loaded (a warning says why). Only a library
from a cache no other user can write is loaded (build.py); an unusable cache never stops the engine.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from kubemoe_runtime.engines.torch.kernels.build import KernelBuildError, build

log = logging.getLogger(__name__)

CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})

_P, _I = ctypes.c_void_p, ctypes.c_int
_ARGTYPES = (_P, _P, _P, _P, _P, _P, _I, _P, _I, _I, _I, _I, _P, _P, _P, _I)


def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


@functools.cache
def load() -> Callable[..., int] | None:
    """The kernel's entry point, built on first use; None where it cannot run here (logged once)."""
    if os.environ.get("KUBEMOE_KERNELS") == "0":
        return None
    if platform.machine() != "x86_64" or not cpu_flags() >= CPU_FLAGS:
        log.info("MoE kernel off: needs an x86-64 CPU with %s", ", ".join(sorted(CPU_FLAGS)))
        return None
    try:
        path = build("moe_bf16")
    except (KernelBuildError, OSError) as err:  # build() wraps OSError; this is the last line of defence
        log.warning("MoE kernel off, the torch path runs instead (slower at decode): %s", err)
        return None
    try:
        fn = ctypes.CDLL(str(path)).kubemoe_moe_bf16
    except (OSError, AttributeError) as err:  # e.g. no libgomp.so.1 where it runs, or a stale file
        log.warning("MoE kernel off, the torch path runs instead (slower at decode): %s: %s", path, err)
        return None
    fn.restype, fn.argtypes = ctypes.c_int, _ARGTYPES
    kernel: Callable[..., int] = fn
    return kernel


def fits(dim: int, hidden: int) -> bool:
    """The kernel's shape limits: hidden size and expert size multiples of 32."""
    return dim % 32 == 0 and hidden % 32 == 0


def routed_experts(
    x_MD: torch.Tensor,
    w_gate_up_E2FD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    w_MK: torch.Tensor,
    *,
    slots: list[int],
    experts: list[int],
    starts: list[int],
) -> torch.Tensor:
    """Each token's routing-weighted sum over its slots `slots` (token * K + choice), grouped by expert:
    local expert `experts[p]` owns `slots[starts[p]:starts[p + 1]]`. Returns [M, D] bf16."""
    fn = load()
    assert fn is not None, "routed_experts needs the kernel (check load() first)"
    (M, K), D, F = w_MK.shape, x_MD.shape[1], w_down_EDF.shape[2]
    for name, t in (("x", x_MD), ("w_gate_up", w_gate_up_E2FD), ("w_down", w_down_EDF)):
        if t.dtype != torch.bfloat16 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"routed_experts: {name} must be a contiguous bf16 CPU tensor")
    # The C code indexes raw memory with these: check every index once here (microseconds at decode).
    E = w_down_EDF.shape[0]
    if x_MD.shape[0] != M or w_gate_up_E2FD.shape != (E, 2 * F, D) or w_down_EDF.shape != (E, D, F):
        raise ValueError(
            f"routed_experts: shapes do not agree: x {tuple(x_MD.shape)}, weights {tuple(w_MK.shape)}, "
            f"w_gate_up {tuple(w_gate_up_E2FD.shape)}, w_down {tuple(w_down_EDF.shape)}"
        )
    if (
        len(starts) != len(experts) + 1
        or starts[0] != 0
        or starts[-1] != len(slots)
        or any(a > b for a, b in itertools.pairwise(starts))
        or not all(0 <= e < E for e in experts)
        or not all(0 <= s < M * K for s in slots)
    ):
        raise ValueError(
            f"routed_experts: slots/experts/starts out of range for {M} tokens x {K}, {E} experts"
        )
    index = torch.tensor([*slots, *experts, *starts], dtype=torch.int64)
    weights = w_MK.float().contiguous()
    h_SF = x_MD.new_empty(len(slots), F)
    acc_MD = torch.empty(M, D, dtype=torch.float32)
    y_MD = x_MD.new_empty(M, D)
    base, S, P = index.data_ptr(), len(slots), len(experts)
    rc = fn(
        x_MD.data_ptr(), w_gate_up_E2FD.data_ptr(), w_down_EDF.data_ptr(),
        base, base + 8 * S, base + 8 * (S + P), P,
        weights.data_ptr(), M, K, D, F,
        h_SF.data_ptr(), acc_MD.data_ptr(), y_MD.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise ValueError(f"routed_experts: shapes D={D} F={F} do not fit the kernel (multiples of 32)")
    return y_MD
