"""bf16 weights in oneDNN's blocked layout ("packed") for the CPU's matmuls.

On a CPU with AVX512-BF16, `F.linear` on a plain row-major bf16 weight reaches about half the memory
bandwidth at decode's 1-16 rows; the same weight reordered once into oneDNN's blocked layout — what
torch.compile's CPU backend freezes weights into — runs at about the bandwidth (a [1, 1024] x [1024, 1024]
product: 116 µs against 191 µs, with a plain read of the same bytes at 126 µs, on this project's 2-core
box), and is no slower at prefill's thousands of rows. Decode reads every weight once a step, so that is
the engine's decode speed.

`pack_model` swaps every bf16 `nn.Linear` for a `PackedLinear`, and has each `LocalExperts` pick its
MoE kernel (the routed experts stay row-major stacks: moe.py's grouped form beat packed experts from 16
rows an expert on). It packs nothing (returns False) off the CPU, for other dtypes, on CPUs without
bf16 support in oneDNN, and where the engine's kernels beat packing at decode (AMX, or AVX512-BF16:
kernels/linear.py `beats_packing`); on those CPUs it swaps bf16 linears for KernelLinear instead. So
packing serves AVX-512 CPUs without bf16 instructions (their kernel is the AVX2 one), and any CPU with
oneDNN bf16 when the kernels are off (KUBEMOE_KERNELS=0, no compiler).

A packed weight replaces its row-major one, which is freed (the loader gives each weight memory of its
own: load/tensor_reads.py), so no weight is held twice. A weight another parameter shares (a tied
`lm_head`, which is the embedding) stays row-major, in a KernelLinear: the embedding needs it as it is,
and packing it would hold it twice.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from kubemoe_runtime.engines.torch.kernels import moe as kernels
from kubemoe_runtime.engines.torch.kernels.linear import KernelLinear, beats_packing

_OPS = ("_is_mkldnn_bf16_supported", "_reorder_linear_weight", "_linear_pointwise")


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """bf16 on a CPU whose oneDNN does bf16, in a torch that still has the (private) ops used here."""
    if dtype != torch.bfloat16 or device.type != "cpu":
        return False
    if not torch.backends.mkldnn.is_available() or not kernels.fast_bf16_gemm():  # type: ignore[no-untyped-call]
        return False
    try:
        ops = [getattr(torch.ops.mkldnn, name) for name in _OPS]
    except (AttributeError, RuntimeError):  # a torch without them: run the model as loaded
        return False
    return bool(ops[0]())


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] weight reordered for `packed_linear` (an opaque oneDNN tensor)."""
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)
    return packed


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a packed weight; x may have any leading dims."""
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out


class PackedLinear(nn.Module):
    """An `nn.Linear` whose weight is packed."""

    def __init__(self, source: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.packed = pack(source.weight)
        self.bias: torch.Tensor | None = source.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)


def pack_model(model: nn.Module) -> bool:
    """Pack the model's bf16 CPU weights in place (a tied one stays row-major: module docstring); False
    (nothing packed) where packing does not apply or the kernels beat it (`beats_packing`). There, on a CPU
    whose torch bf16 GEMM is slow or where the kernels beat packing (AMX, AVX512-BF16), bf16 linears become
    KernelLinear (kernels/linear.py). Each LocalExperts of a bf16 CPU model picks its MoE kernel either
    way."""
    weight = next(model.parameters())
    packs = can_pack(weight.dtype, weight.device) and not beats_packing()
    bf16_cpu = weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
    holders = Counter(
        p.untyped_storage().data_ptr() for _, p in model.named_parameters(remove_duplicate=False)
    )
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if packs and child.weight.dtype == torch.bfloat16:
                tied = holders[child.weight.untyped_storage().data_ptr()] > 1  # packing would copy it
                setattr(module, name, KernelLinear(child) if tied else PackedLinear(child))
            elif not packs and KernelLinear.applies(child):
                setattr(module, name, KernelLinear(child))
        choose_kernel = getattr(module, "choose_kernel", None)  # LocalExperts
        if callable(choose_kernel) and bf16_cpu:
            choose_kernel()
    return packs
