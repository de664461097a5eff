"""The routed experts of a MoE layer in one call of a C kernel (moe_bf16.c, moe_amx.c; bf16, x86-64).

Why: at decode's few rows per expert, two oneDNN GEMM calls per picked expert stream the weights at about
half the memory bandwidth, each call paying its own parallel fork/join and ramp-up; the kernel runs the
whole layer — gate/up, SiLU, down, the routing-weighted sum — in one OpenMP region at close to bandwidth
(bench/bench_moe_kernel.py: 1.8x at 16 rows). The dot-product kernels are compute-bound at prefill: from
about 64 rows an expert oneDNN's blocked GEMM is as fast, and LocalExperts uses that instead, on the same
weights; the AMX kernel is faster than both at every prefill length (2.4-2.7x from 128 tokens). Every
kernel reads the engine's own row-major expert stacks, so the experts need no second, packed copy.

The kernel has one form per instruction set, chosen at run time, the fastest this CPU runs first:

    amx          AMX tiles (moe_amx.c, library moe_amx) from AMX_MIN_ROWS rows an expert on average (prefill:
                 GEMM-shaped work, where dot products are compute-bound); below that the AVX512-BF16 kernel
                 of the same library, which is as fast at decode's few rows. Needs Linux's leave to use the
                 tiles (arch_prctl, Linux 5.16+); without it the next kernel runs
    avx512bf16   AVX512-BF16's bf16 dot products (library moe_bf16)
    avx2         AVX2 + FMA: bf16 weights widened to float in registers, float FMAs (moe_bf16_avx2); it
                 also runs on every AVX-512 CPU (a subset), so CI on either kind of machine tests it
    torch        no kernel: LocalExperts' torch path

The same libraries hold `kubemoe_linear_bf16`, a dense projection for a few rows (linear.py).

`KUBEMOE_CPU_ISA=avx2` has the engine act as on a CPU with AVX2 and FMA only: its view of the CPU's flags
(`cpu_flags`) drops every AVX-512 and AMX flag, so it picks the AVX2 kernel, packs nothing for oneDNN and
treats torch's bf16 GEMM as slow (`fast_bf16_gemm`). With ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2
and MKL_ENABLE_INSTRUCTIONS=AVX2 for the libraries, an AVX-512 machine then runs what an AVX2 one runs
(bench/bench_engine.py, BENCH_ISA=avx2).

`KUBEMOE_MOE_KERNEL=amx|avx512bf16|avx2|torch` forces one (tests, benchmarks; a forced path this CPU cannot
run is refused with a warning, and the torch path runs, rather than another kernel in its place), and
`KUBEMOE_KERNELS=0` turns every kernel off. A kernel that cannot be built or loaded (a warning says why) is
skipped for the next one. `load()` is the chosen kernel's entry point (None: the torch path), `path()` its
name, `describe()` a line for logs and benchmarks. Only a library from a cache no other user can write is
loaded (build.py); an unusable cache never stops the engine.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch

from kubemoe_runtime.engines.torch.kernels.build import KernelBuildError, build

log = logging.getLogger(__name__)

PATHS: Final = ("amx", "avx512bf16", "avx2")  # the kernels, fastest first; "torch" is the engine's own path
TORCH: Final = "torch"
LIBRARIES: Final = {"amx": "moe_amx", "avx512bf16": "moe_bf16", "avx2": "moe_bf16_avx2"}
# FMA too: every library is built with -mfma (attention.c's float FMAs), which no flag above implies
_AVX512_BF16: Final = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "fma"})
NEEDS: Final = {  # /proc/cpuinfo flags each kernel needs
    "amx": _AVX512_BF16 | {"amx_tile", "amx_bf16"},
    "avx512bf16": _AVX512_BF16,
    "avx2": frozenset({"avx2", "fma"}),
}
CPU_FLAGS: Final = NEEDS["avx512bf16"]  # the fastest kernel without AMX
SHOWN_FLAGS: Final = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16")
FORCE_ENV: Final = "KUBEMOE_MOE_KERNEL"
ISA_ENV: Final = "KUBEMOE_CPU_ISA"
# torch's bf16 GEMM goes to oneDNN where oneDNN has bf16 (AVX-512 core, or AMX); elsewhere it is a slow
# scalar loop at more than one row (a [16, 1024] x [1024, 3072] product: 7.7 ms, against 1.1 ms in float32)
FAST_BF16_GEMM: Final = frozenset({"avx512bw", "avx512vl", "avx512dq"})

# Rows an expert on average from which the amx library uses its tiles (bench_moe_kernel.py, bench model, 2
# threads, ms a layer, tiles against its dot products): 1 row 0.69/0.63, 2 rows 4.8/4.5 (both at the read
# bound), 8 rows 6.0/10.6, 16 rows (a 128-token prompt) 7.3/17.6; so decode at batch 16 keeps the dot products
AMX_MIN_ROWS = 3

_P, _I = ctypes.c_void_p, ctypes.c_int
_ARGTYPES = (_P, _P, _P, _P, _P, _P, _I, _P, _I, _I, _I, _I, _P, _P, _P, _I)
_LINEAR_ARGTYPES = (_P, _P, _I, _I, _I, _P, _I)
_ATTENTION_ARGTYPES = (_P, _P, _P, ctypes.c_int64, _P, _I, _I, _I, _I, _I, ctypes.c_float, _P, _I)
_L = ctypes.c_int64
_NORM_ARGTYPES = (_P, _L, _L, _L, _P, _L, _I, ctypes.c_float, _P, _I)
_ADD_NORM_ARGTYPES = (_P, _P, _P, _L, _I, ctypes.c_float, _P, _P, _I)
_NORM_ROPE_ARGTYPES = (_P, _L, _L, _L, _P, _L, _I, ctypes.c_float, _P, _P, _P, _I)
_in_use: dict[str, str] = {}  # "path": the name of what load() returned (set by load())
_in_use_library: list[Library] = []  # the library load() chose (set by load())


@dataclass(frozen=True)
class Library:
    """One built kernel library's entry points."""

    moe: Callable[..., int]  # kubemoe_moe_bf16: a MoE layer's routed experts
    linear: Callable[..., int]  # kubemoe_linear_bf16: a dense projection for a few rows
    attention: Callable[..., int]  # kubemoe_decode_attention (attention.c): one new token a sequence
    rms_norm: Callable[..., int]  # kubemoe_rms_norm (norm.c): RMSNorm over bf16 rows
    add_rms_norm: Callable[..., int]  # kubemoe_add_rms_norm (norm.c): residual add, then RMSNorm
    norm_rope: Callable[..., int]  # kubemoe_norm_rope (norm.c): heads' RMSNorm (optional) and rotary
    tiles: Callable[..., int] | None = None  # kubemoe_moe_amx: moe's arguments, on AMX tiles (amx only)
    linear_tiles: Callable[..., int] | None = None  # kubemoe_linear_amx: linear's arguments, on tiles


@functools.cache
def _proc_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_flags() -> frozenset[str]:
    """The CPU's flags as the engine sees them: /proc/cpuinfo's, less AVX-512 and AMX under
    KUBEMOE_CPU_ISA=avx2 (module docstring)."""
    return _capped(_proc_flags(), os.environ.get(ISA_ENV, "").strip().lower())


@functools.cache
def _capped(flags: frozenset[str], cap: str) -> frozenset[str]:
    """`flags` under cap `cap` (once per pair: the engine asks on every attention and router call)."""
    if cap == "avx2":
        return frozenset(f for f in flags if not f.startswith(("avx512", "amx")))
    if cap:
        log.warning("%s=%s is not avx2 (the one cap there is); using every flag of this CPU", ISA_ENV, cap)
    return flags


def fast_bf16_gemm() -> bool:
    """Whether torch's own bf16 matmuls are fast here (oneDNN's bf16): AVX-512 core or better."""
    return platform.machine() != "x86_64" or cpu_flags() >= FAST_BF16_GEMM


def unsupported(path: str) -> str | None:
    """Why this CPU cannot run kernel `path`; None if it can (the build may still fail)."""
    if path not in NEEDS:
        return f"no kernel {path!r} (kernels: {', '.join(PATHS)})"
    if platform.machine() != "x86_64":
        return f"the {path} kernel needs an x86-64 CPU, this is {platform.machine()}"
    if missing := NEEDS[path] - cpu_flags():
        needs = ", ".join(sorted(NEEDS[path]))
        return f"the {path} kernel needs CPU flags {needs}; this CPU lacks {', '.join(sorted(missing))}"
    return None


def _open(path: str) -> tuple[Library | None, str | None]:
    """Kernel `path` built (once per version, build.py) and loaded; else None and why (not logged)."""
    if why := unsupported(path):
        return None, why
    try:
        library = build(LIBRARIES[path])
    except (KernelBuildError, OSError) as err:  # build() wraps OSError; this is the last line of defence
        return None, str(err)
    try:
        handle = ctypes.CDLL(str(library))
        moe_fn, linear_fn = handle.kubemoe_moe_bf16, handle.kubemoe_linear_bf16
        attention_fn, norm_fn = handle.kubemoe_decode_attention, handle.kubemoe_rms_norm
        add_norm_fn, norm_rope_fn = handle.kubemoe_add_rms_norm, handle.kubemoe_norm_rope
    except (OSError, AttributeError) as err:  # e.g. no libgomp.so.1 where it runs, or a stale file
        return None, f"{library}: {err}"
    moe_fn.restype, moe_fn.argtypes = ctypes.c_int, _ARGTYPES
    linear_fn.restype, linear_fn.argtypes = ctypes.c_int, _LINEAR_ARGTYPES
    attention_fn.restype, attention_fn.argtypes = ctypes.c_int, _ATTENTION_ARGTYPES
    norm_fn.restype, norm_fn.argtypes = ctypes.c_int, _NORM_ARGTYPES
    add_norm_fn.restype, add_norm_fn.argtypes = ctypes.c_int, _ADD_NORM_ARGTYPES
    norm_rope_fn.restype, norm_rope_fn.argtypes = ctypes.c_int, _NORM_ROPE_ARGTYPES
    common = {
        "moe": moe_fn,
        "linear": linear_fn,
        "attention": attention_fn,
        "rms_norm": norm_fn,
        "add_rms_norm": add_norm_fn,
        "norm_rope": norm_rope_fn,
    }
    if path != "amx":
        return Library(**common), None
    tiles_fn, linear_tiles_fn = handle.kubemoe_moe_amx, handle.kubemoe_linear_amx
    tiles_fn.restype, tiles_fn.argtypes = ctypes.c_int, _ARGTYPES
    linear_tiles_fn.restype, linear_tiles_fn.argtypes = ctypes.c_int, _LINEAR_ARGTYPES
    if handle.kubemoe_amx_init() != 0:  # arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA), once per process
        return None, "Linux refused this process the AMX tile state (arch_prctl; Linux 5.16+ grants it)"
    return Library(**common, tiles=tiles_fn, linear_tiles=linear_tiles_fn), None


@functools.cache
def library(path: str) -> Library | None:
    """Kernel library `path` ("avx512bf16", "avx2") whatever the environment says (tests, benchmarks); None
    where it cannot run here: `why_not(path)` says why."""
    return _open(path)[0]


def kernel(path: str) -> Callable[..., int] | None:
    """The MoE entry point of kernel `path` (library())."""
    lib = library(path)
    return None if lib is None else lib.moe


@functools.cache
def why_not(path: str) -> str | None:
    """Why kernel(path) is None on this machine; None when it runs."""
    return _open(path)[1]


def forced() -> str | None:
    """The path the environment asks for: "torch" with KUBEMOE_KERNELS=0, else KUBEMOE_MOE_KERNEL if set."""
    if os.environ.get("KUBEMOE_KERNELS") == "0":
        return TORCH
    choice = os.environ.get(FORCE_ENV, "").strip().lower()
    if not choice:
        return None
    if choice != TORCH and choice not in PATHS:
        log.warning("%s=%s is none of %s; choosing by CPU", FORCE_ENV, choice, ", ".join((*PATHS, TORCH)))
        return None
    return choice


@functools.cache
def load() -> Callable[..., int] | None:
    """The entry point of the kernel this process uses, built on first use; None: the torch path (logged
    once). A kernel that cannot be built or loaded is skipped for the next one this CPU runs."""
    _in_use["path"] = TORCH
    _in_use_library.clear()
    choice = forced()
    if choice == TORCH:
        return None
    for path in (choice,) if choice else PATHS:
        if choice is None and unsupported(path):
            continue
        lib, why = _open(path)
        if lib is not None:
            _in_use["path"] = path
            _in_use_library.append(lib)
            log.info("MoE kernel: %s", path)
            return lib.moe
        # A forced kernel that cannot run means the torch path, not another kernel in its place.
        after = "the torch path runs instead" if choice else "trying the next one"
        log.warning("MoE kernel off (%s), %s (slower at decode): %s", path, after, why)
    if choice is None:
        log.info("MoE kernel off: this CPU runs none of %s; the torch path runs", ", ".join(PATHS))
    return None


def in_use() -> Library | None:
    """The library load() chose; None on the torch path."""
    return _in_use_library[0] if load() is not None and _in_use_library else None


def load_linear() -> Callable[..., int] | None:
    """The dense projection of the library load() chose; None on the torch path."""
    lib = in_use()
    return None if lib is None else lib.linear


def load_attention() -> Callable[..., int] | None:
    """Decode attention (attention.c) of the library load() chose; None on the torch path."""
    lib = in_use()
    return None if lib is None else lib.attention


def load_rms_norm() -> Callable[..., int] | None:
    """RMSNorm (norm.c) of the library load() chose; None on the torch path."""
    lib = in_use()
    return None if lib is None else lib.rms_norm


def load_add_rms_norm() -> Callable[..., int] | None:
    """The residual add and RMSNorm (norm.c) of the library load() chose; None on the torch path."""
    lib = in_use()
    return None if lib is None else lib.add_rms_norm


def load_norm_rope() -> Callable[..., int] | None:
    """Heads' RMSNorm and rotary (norm.c) of the library load() chose; None on the torch path."""
    lib = in_use()
    return None if lib is None else lib.norm_rope


def load_linear_tiles() -> Callable[..., int] | None:
    """The dense projection on AMX tiles, where the library load() chose has it (amx); else None."""
    lib = in_use()
    return None if lib is None else lib.linear_tiles


def uses_tiles(slots: int, experts: int) -> bool:
    """Whether the amx library runs a call of `slots` rows over `experts` picked experts on its tiles."""
    return slots >= AMX_MIN_ROWS * experts


def tiles() -> bool:
    """Whether the kernel in use has AMX tiles (then it is the fastest path at every row count)."""
    lib = in_use()
    return lib is not None and lib.tiles is not None


def path() -> str:
    """The routed experts' path in this process: "amx", "avx512bf16", "avx2" or "torch" (no kernel)."""
    load()
    return _in_use["path"]


def describe() -> str:
    """One line: the path in use, why, and the CPU flags it was chosen by."""
    flags = cpu_flags()
    shown = " ".join(f for f in SHOWN_FLAGS if f in flags) or "none of " + " ".join(SHOWN_FLAGS)
    if os.environ.get("KUBEMOE_KERNELS") == "0":
        how = "KUBEMOE_KERNELS=0"
    elif choice := forced():
        how = f"{FORCE_ENV}={choice}"
    else:
        how = "chosen by CPU"
    return f"MoE routed experts: {path()} ({how}); CPU {platform.machine()} flags: {shown}"


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
    path: str | None = None,
) -> torch.Tensor:
    """Each token's routing-weighted sum over its slots `slots` (token * K + choice), grouped by expert:
    local expert `experts[p]` owns `slots[starts[p]:starts[p + 1]]`. Returns [M, D] bf16. On the kernel
    in use (load()), or on kernel `path` (tests, benchmarks)."""
    lib = library(path) if path else in_use()
    assert lib is not None, f"routed_experts needs a kernel: {why_not(path) if path else 'load() is None'}"
    fn = lib.tiles if lib.tiles and uses_tiles(len(slots), len(experts)) else lib.moe
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
    h_SF = x_MD.new_empty(len(slots) if fn is lib.moe else 0, F)  # the tiles keep h in their own layout
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
