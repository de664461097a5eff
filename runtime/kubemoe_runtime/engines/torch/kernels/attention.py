"""Decode attention (one new token a sequence) on the kernel library's `kubemoe_decode_attention`
(attention.c): bf16 in and out, float inside, one rounding, on every CPU a kernel library runs on.

`decode_attention` takes what `F.scaled_dot_product_attention` takes at decode and returns None where the
kernel does not apply; the caller then runs torch's. It applies to bf16 CPU tensors with one query a
sequence, keys and values of the query's head size (a multiple of 8, at most MAX_HEAD) laid out [S, G, C]
per sequence (the KV cache's layout: views of it, sequences any stride apart, are read where they lie, not
copied), at most MAX_GROUP query heads a KV head, and no mask or a boolean one of [B, 1, 1, S].
"""

from __future__ import annotations

from typing import Final

import torch

from kubemoe_runtime.engines.torch.kernels import moe as kernels

MAX_HEAD: Final = 256  # attention.c's ATT_MAX_HEAD and ATT_MAX_GROUP
MAX_GROUP: Final = 16


def decode_attention(
    q_BHTC: torch.Tensor,
    k_BGSC: torch.Tensor,
    v_BGSC: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor | None:
    """[B, H, 1, C] bf16, or None where the kernel does not apply (module docstring)."""
    if q_BHTC.dim() != 4 or q_BHTC.shape[2] != 1 or k_BGSC.dim() != 4 or v_BGSC.dim() != 4:
        return None
    B, H, _, C = q_BHTC.shape
    G, S = k_BGSC.shape[1], k_BGSC.shape[2]
    if (
        any(t.dtype != torch.bfloat16 or t.device.type != "cpu" for t in (q_BHTC, k_BGSC, v_BGSC))
        or k_BGSC.shape != (B, G, S, C)
        or v_BGSC.shape != (B, G, S, C)
        or min(B, H, C, S, G) == 0
        or H % G
        or H // G > MAX_GROUP
        or C % 8
        or C > MAX_HEAD
    ):
        return None
    k_BSGC, v_BSGC = k_BGSC.transpose(1, 2), v_BGSC.transpose(1, 2)
    row_major = (G * C, C, 1)
    if k_BSGC.stride()[1:] != row_major or v_BSGC.stride() != k_BSGC.stride():
        return None
    if mask is None:
        keep = torch.ones(B, S, dtype=torch.uint8)
    elif mask.dtype == torch.bool and mask.shape == (B, 1, 1, S):
        keep = mask.reshape(B, S).to(torch.uint8).contiguous()
    else:
        return None
    fn = kernels.load_attention()
    if fn is None:
        return None
    q = q_BHTC.reshape(B, H, C).contiguous()
    out = q.new_empty(B, H, C)
    rc = fn(
        q.data_ptr(), k_BSGC.data_ptr(), v_BSGC.data_ptr(), k_BSGC.stride(0), keep.data_ptr(),
        B, H, G, S, C, scale, out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if rc == -2:  # no memory for its scores: torch's attention instead
        return None
    if rc != 0:
        raise RuntimeError(f"decode attention kernel failed ({rc}) on B={B} H={H} G={G} S={S} C={C}")
    return out.view(B, H, 1, C)
