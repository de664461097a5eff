"""vLLM as an AVX2-only CPU runs it, on a machine with AVX-512: bench_engine's avx2 profile puts this
directory first on the vLLM interpreter's PYTHONPATH, so Python imports it at start-up.

vLLM chooses its kernels from torch.cpu's view of the CPU, which reads cpuid and ignores
ATEN_CPU_CAPABILITY: so capped, it still loads its AVX512-BF16 library (vllm/_C) and plans AMX paths,
whose oneDNN matmuls then die under ONEDNN_MAX_CPU_ISA=AVX2. Here torch.cpu.get_capabilities, which
every torch.cpu._is_*_supported query reads, leaves out the AVX-512 and AMX features, as on an AVX2 CPU:
vLLM loads vllm/_C_AVX2 and takes its non-AMX paths, and the profile's caps keep torch's and oneDNN's
own kernels at AVX2.
"""

import torch

_capabilities = torch.cpu.get_capabilities


def _avx2_capabilities() -> dict[str, object]:
    return {
        name: False if name.startswith(("avx512", "amx")) else present
        for name, present in _capabilities().items()
    }


setattr(torch.cpu, "get_capabilities", _avx2_capabilities)  # noqa: B010 (torch types it as an lru_cache)
