"""bf16 weights packed for the CPU's matmuls (packing.py): same answers as the row-major weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel
from kubemoe_runtime.engines.torch.kernels.linear import KernelLinear, beats_packing
from kubemoe_runtime.engines.torch.model.moe import LocalExperts
from kubemoe_runtime.engines.torch.model.packing import PackedLinear, can_pack
from kubemoe_runtime.tools.checkpoints import ARCHITECTURES

PROMPT = [493, 71, 460, 317, 71, 479, 264, 81, 268, 71, 373, 16, 5, 100, 200, 300, 17, 42, 7, 99]

needs_bf16_onednn = pytest.mark.skipif(
    not can_pack(torch.bfloat16, torch.device("cpu")),
    reason="this CPU lacks oneDNN bf16 support (AVX512-BF16 or AMX), so nothing is packed here",
)


@needs_bf16_onednn
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_engine_matches_row_major_weights(checkpoints: dict[str, Path], arch: str) -> None:
    plain = TorchEngine.load(checkpoints[arch], dtype=torch.bfloat16, pack=False)
    packed = TorchEngine.load(checkpoints[arch], dtype=torch.bfloat16)

    # where the kernels beat oneDNN at decode (AMX, AVX512-BF16): dense weights row-major, in KernelLinear
    dense: type[torch.nn.Module] = KernelLinear if beats_packing() else PackedLinear
    linears = [m for m in packed.model.modules() if isinstance(m, dense)]
    experts = [m for m in packed.model.modules() if isinstance(m, LocalExperts)]
    assert linears, f"no linear layer became {dense.__name__}"
    assert experts
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.model.modules())
    for e in experts:  # the MoE kernel or the torch path, both on the row-major bf16 stacks (one copy)
        assert e.kernel == (moe_kernel.load() is not None)
        assert e.w_gate_up_E2FD.dtype == torch.bfloat16
        assert e.w_gate_up_E2FD.numel() > 0

    got, want = packed.logits(PROMPT), plain.logits(PROMPT)
    # Same bf16 weights, different blocking of the sums: bf16 rounding apart, nothing more.
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)


def test_float32_is_never_packed(checkpoints: dict[str, Path]) -> None:
    engine = TorchEngine.load(checkpoints[ARCHITECTURES[0]], dtype=torch.float32)
    assert not any(isinstance(m, PackedLinear) for m in engine.model.modules())
    experts = [e for e in engine.model.modules() if isinstance(e, LocalExperts)]
    assert experts
    assert all(not e.kernel and e.w_gate_up_E2FD.dtype == torch.float32 for e in experts)
