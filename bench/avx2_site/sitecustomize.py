"""vLLM as an AVX2-only CPU runs it, on a machine with AVX-512: bench_engine's avx2 profile puts this
directory first on the vLLM interpreter's PYTHONPATH, so Python imports it at start-up.

vLLM chooses its kernels from torch.cpu's view of the CPU, which reads cpuid and ignores
ATEN_CPU_CAPABILITY: so capped, it still loads its AVX512-BF16 library (vllm/_C) and plans AMX paths,
whose oneDNN matmuls then die under ONEDNN_MAX_CPU_ISA=AVX2. Here every AVX-512 and AMX query answers
False, as on an AVX2 CPU: vLLM loads vllm/_C_AVX2 and takes its non-AMX paths, and the profile's
caps keep torch's and oneDNN's own kernels at AVX2.
"""

import torch

for _query in (
    "_is_avx512_supported",
    "_is_avx512_bf16_supported",
    "_is_avx512_vnni_supported",
    "_is_amx_tile_supported",
    "_is_amx_fp16_supported",
):
    if hasattr(torch.cpu, _query):
        setattr(torch.cpu, _query, lambda: False)
