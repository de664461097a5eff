"""RMSNorm on the kernel libraries (kernels/norm.c through kernels/norm.py): every library this CPU runs
(the avx2 one runs on AVX-512 machines too) against float64 and against torch's bf16 F.rms_norm, the strided
rows of a fused projection's heads, the inputs it leaves to torch, and the engine running through it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel
from kubemoe_runtime.engines.torch.kernels.norm import add_rms_norm, rms_norm
from kubemoe_runtime.engines.torch.model import layers
from kubemoe_runtime.tools.checkpoints import write_tiny_checkpoint
from tests.runtime.test_moe_kernel import KERNELS

EPS = 1e-6


def weight(dim: int, *, seed: int = 1) -> torch.Tensor:
    return (torch.rand(dim, generator=torch.Generator().manual_seed(seed)) + 0.5).bfloat16()


def agrees(got: torch.Tensor | None, x: torch.Tensor, w: torch.Tensor, eps: float = EPS) -> None:
    """Within one bf16 rounding of float64, and nearly always the very bits torch's bf16 rms_norm gives
    (both sum in float, in different orders)."""
    assert got is not None
    assert got.dtype == torch.bfloat16
    assert got.shape == x.shape
    assert got.is_contiguous()
    want = F.rms_norm(x.double(), (x.shape[-1],), w.double(), eps=eps)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=2**-8)
    torch_bf16 = F.rms_norm(x, (x.shape[-1],), w, eps=eps)
    assert int((got != torch_bf16).sum()) <= max(1, x.numel() // 1000)


# rows x dim: decode's hidden states, a prefill's, one row of one vector, rows of 24 (three vectors)
SHAPES = [(16, 1, 1024), (3, 37, 512), (1, 8), (5, 24)]


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_and_torch(kernel_library: str, shape: tuple[int, ...]) -> None:
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * 3).bfloat16()
    w = weight(shape[-1])
    agrees(rms_norm(x, w, EPS), x, w)


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_eps_counts_where_rows_are_small(kernel_library: str, eps: float) -> None:
    """Rows whose mean square (1e-6) is of eps's size or far below it: a dropped or misplaced eps shows."""
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(7)) * 1e-3).bfloat16()
    w = weight(64)
    agrees(rms_norm(x, w, eps), x, w, eps)


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
def test_heads_with_gaps_between_them_read_no_gap(kernel_library: str) -> None:
    """Heads of 64 with 8 NaN between them (and after the last): any read outside a head shows as NaN."""
    base = torch.full((3, 5, 4, 72), float("nan")).bfloat16()
    base[..., :64] = torch.randn(3, 5, 4, 64, generator=torch.Generator().manual_seed(8)).bfloat16()
    heads = base[..., :64]
    w = weight(64)
    agrees(rms_norm(heads, w, EPS), heads.contiguous(), w)


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
def test_no_kernel_where_a_gradient_is_wanted(kernel_library: str) -> None:
    x = torch.randn(2, 64).bfloat16().requires_grad_()
    assert rms_norm(x, weight(64), EPS) is None
    with torch.no_grad():
        assert rms_norm(x, weight(64), EPS) is not None


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
def test_heads_of_a_fused_projection_are_read_where_they_lie(kernel_library: str) -> None:
    """q and k heads as views of one [B, T, (H + 2G) * C] projection: rows of C, H or G of them a token, a
    token's width apart (Qwen3's q/k norms). Nothing is copied: the input is read in place."""
    qkv = torch.randn(3, 5, (8 + 2 * 2) * 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    q = qkv[..., : 8 * 64].view(3, 5, 8, 64)
    k = qkv[..., 8 * 64 : 10 * 64].view(3, 5, 2, 64)
    assert not q.is_contiguous()
    w = weight(64)
    for heads in (q, k):
        agrees(rms_norm(heads, w, EPS), heads, w)
    with torch.no_grad():
        qkv[..., 10 * 64 :] = float("nan")  # the v part: a read past a k head's rows would show
    agrees(rms_norm(k, w, EPS), k, w)


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
def test_a_row_of_nan_stays_nan_and_others_are_untouched(kernel_library: str) -> None:
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    x[2, 5] = float("nan")
    w = weight(64)
    got = rms_norm(x, w, EPS)
    assert got is not None
    assert torch.isnan(got[2]).all()
    agrees(got[[0, 1, 3]].contiguous(), x[[0, 1, 3]].contiguous(), w)


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
@pytest.mark.parametrize(
    "case",
    [
        "float32 input",
        "float32 weight",
        "size not a multiple of 8",
        "transposed rows",
        "overlapping rows",
        "no rows",
        "weight of another size",
    ],
)
def test_what_it_leaves_to_torch(kernel_library: str, case: str) -> None:
    x = torch.randn(6, 64).bfloat16()
    w = weight(64)
    x, w = {
        "float32 input": (x.float(), w),
        "float32 weight": (x, w.float()),
        "size not a multiple of 8": (torch.randn(6, 60).bfloat16(), weight(60)),
        "transposed rows": (torch.randn(64, 6).bfloat16().t(), w),
        "overlapping rows": (torch.randn(64).bfloat16().expand(6, 64), w),
        "no rows": (torch.empty(0, 64, dtype=torch.bfloat16), w),
        "weight of another size": (x, weight(32)),
    }[case]
    assert rms_norm(x, w, EPS) is None


def test_the_torch_path_has_no_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(moe_kernel.FORCE_ENV, moe_kernel.TORCH)
    moe_kernel.load.cache_clear()
    try:
        assert rms_norm(torch.randn(2, 64).bfloat16(), weight(64), EPS) is None
    finally:
        moe_kernel.load.cache_clear()


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
def test_engine_runs_its_norms_through_it_as_through_torch(
    kernel_library: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    spy_kernel: Callable[[object, str], list[bool]],
) -> None:
    """A qwen3_moe checkpoint (hidden norms and q/k norms): the kernel ran for every norm of a forward, and
    the logits match the same engine with torch's norms within bf16 rounding. The norms run here as where
    the fused kernels do not apply: the add + norm one (tested below) and the norm + rotary one
    (test_norm_rope_kernel.py)."""
    monkeypatch.setattr(layers, "norm_rope", lambda *args: None)
    monkeypatch.setattr(layers, "add_rms_norm", lambda *args: None)
    engine = TorchEngine.load(write_tiny_checkpoint(tmp_path / "m", arch="qwen3_moe"), dtype=torch.bfloat16)
    prompt = [5, 17, 42, 99, 7, 3, 250, 11]
    ran = spy_kernel(layers, "rms_norm")
    through_kernel = engine.logits(prompt)
    norms = sum(isinstance(m, layers.RMSNorm) for m in engine.model.modules())
    assert len(ran) >= norms > 0
    assert all(ran), f"{ran.count(False)} of {len(ran)} norms fell back to torch"
    monkeypatch.setattr(layers, "rms_norm", lambda *args: None)
    torch.testing.assert_close(through_kernel, engine.logits(prompt), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_then_norm_is_torchs_add_then_the_norm_bit_for_bit(
    kernel_library: str, shape: tuple[int, ...]
) -> None:
    """The residual add rounds as torch's bf16 add, and the norm is of that rounded sum: the same bits as
    the two calls apart (so a model's tokens do not change with the fusion)."""
    gen = torch.Generator().manual_seed(len(shape))
    x, r = ((torch.randn(shape, generator=gen) * 3).bfloat16() for _ in range(2))
    w = weight(shape[-1])
    got = add_rms_norm(x, r, w, EPS)
    assert got is not None
    h, y = got
    assert torch.equal(h, x + r)
    apart = rms_norm(x + r, w, EPS)
    assert apart is not None
    assert torch.equal(y, apart)
    agrees(y, x + r, w)


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
@pytest.mark.parametrize(
    "case", ["shapes differ", "residual not contiguous", "float32 residual", "size not a multiple of 8"]
)
def test_what_the_add_leaves_to_torch(kernel_library: str, case: str) -> None:
    x, r, w = torch.randn(6, 64).bfloat16(), torch.randn(6, 64).bfloat16(), weight(64)
    x, r, w = {
        "shapes differ": (x, r[:5], w),
        "residual not contiguous": (x, torch.randn(64, 6).bfloat16().t(), w),
        "float32 residual": (x, r.float(), w),
        "size not a multiple of 8": (
            torch.randn(6, 60).bfloat16(),
            torch.randn(6, 60).bfloat16(),
            weight(60),
        ),
    }[case]
    assert add_rms_norm(x, r, w, EPS) is None


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
def test_engine_adds_each_residual_with_its_norm(
    kernel_library: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    spy_kernel: Callable[[object, str], list[bool]],
) -> None:
    """Every residual add of a forward but the first layer's input (which has none) ran with the norm after
    it: two a layer, the last into the final norm; the logits and tokens are those of torch's adds."""
    engine = TorchEngine.load(write_tiny_checkpoint(tmp_path / "m", arch="qwen3_moe"), dtype=torch.bfloat16)
    prompt = [5, 17, 42, 99, 7, 3, 250, 11]
    ran = spy_kernel(layers, "add_rms_norm")
    through_kernel = engine.logits(prompt)
    layer_count = len(engine.model.blocks())
    assert ran == [True] * 2 * layer_count
    decoded = engine.generate([prompt, prompt[:3]], max_new_tokens=4)
    monkeypatch.setattr(layers, "add_rms_norm", lambda *args: None)
    assert torch.equal(through_kernel, engine.logits(prompt))
    assert engine.generate([prompt, prompt[:3]], max_new_tokens=4) == decoded
