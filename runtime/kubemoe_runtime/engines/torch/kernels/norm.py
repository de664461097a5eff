"""RMSNorm over bf16 rows, the same after the residual add, and heads' RMSNorm fused with rotary
embedding, on the kernel library's `kubemoe_rms_norm`, `kubemoe_add_rms_norm` and `kubemoe_norm_rope`
(norm.c): float inside, one rounding, on every CPU a kernel library runs on.

`rms_norm` takes what `F.rms_norm` takes over the last dimension and returns None where the kernel does not
apply; the caller then runs torch's. It applies to bf16 CPU rows (any leading shape, each row contiguous,
the rows evenly spaced, or evenly spaced groups of evenly spaced rows: the hidden states, or the q/k heads
of a fused projection's output) with a bf16 weight of the row's size, a multiple of 8, where no gradient
is wanted (the kernel builds no autograd graph). `add_rms_norm` is the same for contiguous rows after a
residual add, and returns the sum as well. `norm_rope` is the same for heads [B, T, H, C] (C a
multiple of 16), rotated after the norm (or without one) in the halves form, and None where it does not
apply.
"""

from __future__ import annotations

import torch

from kubemoe_runtime.engines.torch.kernels import moe as kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """`F.rms_norm(x, (D,), weight, eps)` for x [..., D], or None where the kernel does not apply."""
    if x.dim() == 0 or not _takes(x, weight) or (x_OID := _rows(x)) is None:
        return None
    fn = kernels.load_rms_norm()
    if fn is None:
        return None
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    outer, inner = x_OID.shape[:2]
    rc = fn(x_OID.data_ptr(), x_OID.stride(0), x_OID.stride(1), inner, weight.data_ptr(), outer * inner,
            x.shape[-1], eps, y.data_ptr(), torch.get_num_threads())  # fmt: skip
    return y if rc == 0 else None


def add_rms_norm(
    x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(h, F.rms_norm(h, (D,), weight, eps))` with h = x + r (bf16, rounded once, as torch adds), in one
    pass: x and r contiguous, of one shape [..., D]. None where the kernel does not apply."""
    if x.dim() == 0 or r.shape != x.shape:
        return None
    if not _takes(x, weight) or not _takes(r, weight) or not (x.is_contiguous() and r.is_contiguous()):
        return None
    fn = kernels.load_add_rms_norm()
    if fn is None:
        return None
    h, y = torch.empty_like(x), torch.empty_like(x)
    dim = x.shape[-1]
    rc = fn(x.data_ptr(), r.data_ptr(), weight.data_ptr(), x.numel() // dim, dim, eps, h.data_ptr(),
            y.data_ptr(), torch.get_num_threads())  # fmt: skip
    return (h, y) if rc == 0 else None


def norm_rope(
    x_BTHC: torch.Tensor, weight: torch.Tensor | None, eps: float, cos_NR: torch.Tensor, sin_NR: torch.Tensor
) -> torch.Tensor | None:
    """`apply_rope(F.rms_norm(x, (C,), weight, eps), ...)` in the halves form (layers.py), without the norm
    where `weight` is None, rounded once: x [B, T, H, C], cos and sin float32 [B * T, C / 2] contiguous (a
    row a token). None where the kernel does not apply."""
    if x_BTHC.dim() != 4 or not _takes(x_BTHC, weight):
        return None
    B, T, H, C = x_BTHC.shape
    if C % 16 or any(t.shape != (B * T, C // 2) for t in (cos_NR, sin_NR)):
        return None
    if any(
        t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu" for t in (cos_NR, sin_NR)
    ):
        return None
    x_OID = _rows(x_BTHC, heads=True)
    fn = kernels.load_norm_rope()
    if x_OID is None or fn is None:
        return None
    y = torch.empty(x_BTHC.shape, dtype=torch.bfloat16)
    w = 0 if weight is None else weight.data_ptr()
    rc = fn(x_OID.data_ptr(), x_OID.stride(0), x_OID.stride(1), H, w, B * T * H, C, eps, cos_NR.data_ptr(),
            sin_NR.data_ptr(), y.data_ptr(), torch.get_num_threads())  # fmt: skip
    return y if rc == 0 else None


def _takes(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """bf16 CPU rows, not empty, of a size (a multiple of 8) a bf16 CPU weight of one stride matches (or no
    weight), no gradient wanted."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.numel() == 0:
        return False
    dim = x.shape[-1]
    if dim % 8 or (torch.is_grad_enabled() and x.requires_grad):
        return False
    if weight is None:
        return True
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.shape != (dim,):
        return False
    return weight.stride() == (1,) and not (torch.is_grad_enabled() and weight.requires_grad)


def _rows(x: torch.Tensor, *, heads: bool = False) -> torch.Tensor | None:
    """x [..., D] as a view [O, I, D] with the last dimension contiguous and rows that do not overlap (the
    last two leading dimensions kept apart if they cannot merge, or with `heads` always: O then counts the
    tokens); None if there is none. No copy."""
    dim = x.shape[-1]
    apart = (-1, x.shape[-2] if x.dim() > 1 else 1, dim)
    for shape in (apart,) if heads else ((-1, 1, dim), apart):
        try:
            view = x.view(shape)
        except RuntimeError:  # the rows are not evenly spaced in this grouping
            continue
        outer, inner, _ = view.shape
        s0, s1, s2 = view.stride()
        if s2 == 1 and (inner == 1 or s1 >= dim) and (outer == 1 or s0 >= (inner - 1) * s1 + dim):
            return view
    return None
