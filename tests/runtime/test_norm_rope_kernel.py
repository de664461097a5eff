"""Heads' RMSNorm fused with rotary embedding on the kernel libraries (kernels/norm.c `kubemoe_norm_rope`
through kernels/norm.py `norm_rope`): every library this CPU runs against float64, with and without the norm,
heads read in place from a fused projection, the inputs it leaves to torch, and engines running through it
(Qwen3-MoE with q/k norms, Mixtral without)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel
from kubemoe_runtime.engines.torch.kernels.norm import norm_rope
from kubemoe_runtime.engines.torch.model import layers
from kubemoe_runtime.tools.checkpoints import write_tiny_checkpoint
from tests.runtime.test_moe_kernel import KERNELS
from tests.runtime.test_rms_norm_kernel import EPS, weight


def rotation(B: int, T: int, C: int, *, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's float32 cos and sin halves [B * T, C / 2] for positions start.. of B rows of T tokens."""
    return halves((torch.arange(T) + start).expand(B, T), C)


def halves(pos_BT: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = layers.rope_inv_freq(dim=C, theta=10000.0)
    return layers.rope_cos_sin(pos_BT, inv_freq=inv_freq, dtype=torch.bfloat16)[1]


def agrees(
    got: torch.Tensor | None, x: torch.Tensor, w: torch.Tensor | None, rot: tuple[torch.Tensor, ...]
) -> None:
    """A fresh contiguous bf16 tensor within one bf16 rounding of float64 math (norm, then rotate-half) on
    the kernel's own float32 rotation."""
    assert got is not None
    assert got.dtype == torch.bfloat16
    assert got.shape == x.shape
    assert got.is_contiguous()
    B, T, _, C = x.shape
    cos, sin = (t.double().view(B, T, 1, C // 2) for t in rot)
    normed = x.double() if w is None else F.rms_norm(x.double(), (C,), w.double(), eps=EPS)
    want = layers.apply_rope(
        normed, (torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)), interleaved=False
    )
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=2**-8)


# B, T, H, C: decode at batch 16, a prefill, one head of 16 (the smallest size), Qwen3's head of 128
SHAPES = [(16, 1, 16, 64), (3, 37, 4, 32), (1, 1, 1, 16), (2, 5, 2, 128)]


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("normed", [True, False], ids=["norm", "no norm"])
def test_matches_float64(kernel_library: str, shape: tuple[int, int, int, int], normed: bool) -> None:
    B, T, H, C = shape
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(H)) * 3).bfloat16()
    w = weight(C) if normed else None
    rot = rotation(B, T, C, start=7)
    agrees(norm_rope(x, w, EPS, *rot), x, w, rot)


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
def test_heads_of_a_fused_projection_are_read_where_they_lie(kernel_library: str) -> None:
    """q and k heads as views of one [B, T, (H + 2G) * C] projection, the v part NaN: any read past a k
    head's rows shows; each token's heads get that token's rotation (positions differ by row and column)."""
    B, T, H, G, C = 3, 5, 8, 2, 32
    qkv = torch.randn(B, T, (H + 2 * G) * C, generator=torch.Generator().manual_seed(2)).bfloat16()
    qkv[..., (H + G) * C :] = float("nan")
    q = qkv[..., : H * C].view(B, T, H, C)
    k = qkv[..., H * C : (H + G) * C].view(B, T, G, C)
    assert not q.is_contiguous()
    rot = halves(torch.tensor([[0, 1, 2, 3, 4], [10, 11, 12, 13, 14], [3, 9, 27, 81, 200]]), C)
    w = weight(C)
    for heads in (q, k):
        agrees(norm_rope(heads, w, EPS, *rot), heads, w, rot)


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
@pytest.mark.parametrize(
    "case",
    [
        "float32 input",
        "head size not a multiple of 16",
        "rotation of another size",
        "cos and sin of different sizes",
        "rotation in bf16",
        "rotation not contiguous",
        "three dimensions",
        "weight of another size",
        "gradient wanted",
    ],
)
def test_what_it_leaves_to_torch(kernel_library: str, case: str) -> None:
    x = torch.randn(2, 3, 4, 32).bfloat16()
    w = weight(32)
    cos, sin = rotation(2, 3, 32)
    x, w, cos, sin = {
        "float32 input": (x.float(), w, cos, sin),
        "head size not a multiple of 16": (
            torch.randn(2, 3, 4, 24).bfloat16(),
            weight(24),
            *rotation(2, 3, 24),
        ),
        "rotation of another size": (x, w, *rotation(2, 4, 32)),
        "cos and sin of different sizes": (x, w, cos, rotation(2, 4, 32)[1]),
        "rotation in bf16": (x, w, cos.bfloat16(), sin.bfloat16()),
        "rotation not contiguous": (x, w, torch.cat((cos, cos), dim=1)[:, ::2], sin),
        "three dimensions": (x.view(6, 4, 32), w, cos, sin),
        "weight of another size": (x, weight(64), cos, sin),
        "gradient wanted": (x.float().requires_grad_().bfloat16(), w, cos, sin),
    }[case]
    assert norm_rope(x, w, EPS, cos, sin) is None


def test_the_torch_path_has_no_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(moe_kernel.FORCE_ENV, moe_kernel.TORCH)
    moe_kernel.load.cache_clear()
    try:
        assert norm_rope(torch.randn(1, 1, 1, 16).bfloat16(), None, EPS, *rotation(1, 1, 16)) is None
    finally:
        moe_kernel.load.cache_clear()


def test_the_kernels_rotation_is_the_full_width_ones() -> None:
    """Positions carry the rotation twice: the kernel's float32 halves are the full-width cos and the
    second half of the signed sin, row for row (a row a token)."""
    pos_BT = torch.tensor([[0, 1, 2], [40, 41, 42]])
    (cos_BT1C, sin_BT1C), (cos_NR, sin_NR) = layers.rope_cos_sin(
        pos_BT, inv_freq=layers.rope_inv_freq(dim=32, theta=10000.0), dtype=torch.float32
    )
    assert cos_NR.shape == sin_NR.shape == (6, 16)
    torch.testing.assert_close(cos_NR, cos_BT1C.reshape(6, 32)[:, :16], rtol=0, atol=0)
    torch.testing.assert_close(cos_NR, cos_BT1C.reshape(6, 32)[:, 16:], rtol=0, atol=0)
    torch.testing.assert_close(sin_NR, sin_BT1C.reshape(6, 32)[:, 16:], rtol=0, atol=0)
    torch.testing.assert_close(-sin_NR, sin_BT1C.reshape(6, 32)[:, :16], rtol=0, atol=0)


def rounded_once(
    x_BTHC: torch.Tensor, w: torch.Tensor | None, eps: float, cos_NR: torch.Tensor, sin_NR: torch.Tensor
) -> torch.Tensor:
    """What the kernel computes, in torch's float64: the norm, then apply_rope, one rounding to bf16."""
    B, T, _, C = x_BTHC.shape
    x = x_BTHC.double()
    if w is not None:
        x = F.rms_norm(x, (C,), w.double(), eps=eps)
    cos, sin = cos_NR.double().view(B, T, 1, C // 2), sin_NR.double().view(B, T, 1, C // 2)
    full = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    return layers.apply_rope(x, full, interleaved=False).bfloat16()


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_engines_rotate_through_it(
    kernel_library: str,
    arch: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    spy_kernel: Callable[[object, str], list[bool]],
) -> None:
    """Qwen3-MoE (q/k norms) and Mixtral (rotary alone): the kernel ran for q and k in every attention layer
    of a prefill and of cached decode steps, and the engine gives the logits and tokens it gives with the
    same rule in float64 (`rounded_once`). Not torch's bf16 ops as the oracle: they round after the norm
    and after each op, and on this tiny random model one such rounding flips a router's choice at one
    position of the prompt (0.3 in its logits, the kernel and rounded_once alike)."""
    engine = TorchEngine.load(write_tiny_checkpoint(tmp_path / "m", arch=arch), dtype=torch.bfloat16)
    prompt = [5, 17, 42, 99, 7, 3, 250, 11]
    ran = spy_kernel(layers, "norm_rope")
    through_kernel = engine.logits(prompt)
    decoded = engine.generate([prompt, prompt[:5]], max_new_tokens=3)
    attention = sum(isinstance(m, layers.Attention) for m in engine.model.modules())
    assert attention > 0
    assert len(ran) == 2 * attention * 4  # q and k, each layer: the logits' forward, generate's three
    assert all(ran), f"{ran.count(False)} of {len(ran)} calls fell back to torch"
    monkeypatch.setattr(layers, "norm_rope", rounded_once)
    torch.testing.assert_close(through_kernel, engine.logits(prompt), atol=0.05, rtol=0.05)
    assert engine.generate([prompt, prompt[:5]], max_new_tokens=3) == decoded
