"""Dense bf16 projections on CPUs whose torch bf16 GEMM is slow (kernels/linear.py): the linear kernel of each
instruction set against a float64 reference, KernelLinear's two forms, and the engine as an AVX2-only CPU
runs it (KUBEMOE_CPU_ISA=avx2, which any AVX2 machine can run, so CI on either kind tests that path)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.kernels import linear as linear_mod
from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel
from kubemoe_runtime.engines.torch.kernels.linear import KernelLinear, kernel_linear, matmul
from kubemoe_runtime.engines.torch.model.layers import attend
from kubemoe_runtime.engines.torch.model.moe import LocalExperts
from kubemoe_runtime.engines.torch.model.packing import PackedLinear, can_pack, pack_model
from kubemoe_runtime.tools.checkpoints import ARCHITECTURES
from tests.runtime.test_moe_kernel import KERNELS
from tests.runtime.test_moe_kernel_paths import needs_avx2

PROMPT = [493, 71, 460, 317, 71, 479, 264, 81, 268, 71, 373, 16, 5, 100, 200, 300, 17, 42, 7, 99]


def bf16_close(got: torch.Tensor, want_f64: torch.Tensor) -> None:
    """Within one bf16 rounding of the exact result (and a float sum's order apart)."""
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want_f64, rtol=2**-8, atol=1e-3)


def _chosen_again(monkeypatch: pytest.MonkeyPatch, env: str, value: str) -> Iterator[None]:
    """The kernel chosen again around a test, with `env` (the ISA cap or the forced kernel) set to `value`
    and the other choices cleared."""
    for name in (moe_kernel.ISA_ENV, moe_kernel.FORCE_ENV, "KUBEMOE_KERNELS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(env, value)
    moe_kernel.load.cache_clear()
    yield
    moe_kernel.load.cache_clear()


@pytest.fixture
def as_avx2(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The engine's view of this CPU capped at AVX2 + FMA, its kernel chosen again around the test."""
    yield from _chosen_again(monkeypatch, moe_kernel.ISA_ENV, "avx2")


@pytest.mark.parametrize("path", KERNELS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 16, 33])
@pytest.mark.parametrize(("n_out", "n_in"), [(40, 64), (16, 32), (96, 1024)])
def test_linear_kernel_matches_float64_reference(path: str, rows: int, n_out: int, n_in: int) -> None:
    """Every row count (each unrolled case and the tails of a block) and an output count that is not a whole
    block (40 = 2 x 16 + 8)."""
    lib = moe_kernel.library(path)
    assert lib is not None
    gen = torch.Generator().manual_seed(rows * 7 + n_out)
    x = torch.randn(rows, n_in, generator=gen).bfloat16()
    w = (torch.randn(n_out, n_in, generator=gen) / n_in**0.5).bfloat16()
    bf16_close(kernel_linear(x, w, fn=lib.linear), F.linear(x.double(), w.double()))


@pytest.mark.parametrize("path", KERNELS)
def test_linear_kernel_keeps_leading_dims_and_refuses_what_it_cannot_run(path: str) -> None:
    lib = moe_kernel.library(path)
    assert lib is not None
    x = torch.randn(2, 3, 64).bfloat16()
    w = torch.randn(48, 64).bfloat16()
    got = kernel_linear(x, w, fn=lib.linear)
    assert got.shape == (2, 3, 48)
    bf16_close(got, F.linear(x.double(), w.double()))
    with pytest.raises(ValueError, match="inner sizes"):
        kernel_linear(torch.randn(2, 48).bfloat16(), torch.randn(8, 48).bfloat16(), fn=lib.linear)
    with pytest.raises(ValueError, match="bf16"):
        kernel_linear(x.float(), w, fn=lib.linear)


def test_isa_cap_drops_avx512_and_amx(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(moe_kernel, "_proc_flags", lambda: frozenset({"avx2", "fma", "avx512f", "amx_bf16"}))
    monkeypatch.setenv(moe_kernel.ISA_ENV, "avx2")
    assert moe_kernel.cpu_flags() == {"avx2", "fma"}
    assert not moe_kernel.fast_bf16_gemm()
    assert "lacks avx512_bf16" in str(moe_kernel.unsupported("avx512bf16"))
    monkeypatch.setenv(moe_kernel.ISA_ENV, "avx9")
    with caplog.at_level(logging.WARNING):
        assert "avx512f" in moe_kernel.cpu_flags()
    assert "KUBEMOE_CPU_ISA=avx9 is not avx2" in caplog.text


@needs_avx2
@pytest.mark.usefixtures("as_avx2")
@pytest.mark.parametrize("rows", [1, 5, linear_mod.KERNEL_MAX_ROWS, linear_mod.KERNEL_MAX_ROWS + 1, 100])
def test_kernel_linear_module_matches_nn_linear_at_few_and_many_rows(
    rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel up to KERNEL_MAX_ROWS rows, float32 past it (a spy on the kernel says which ran); with a
    bias, as an nn.Linear has it."""
    source = nn.Linear(64, 40, bias=True).to(torch.bfloat16)
    assert KernelLinear.applies(source)
    module = KernelLinear(source)
    calls: list[int] = []
    real = linear_mod.kernel_linear

    def spy(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, w)

    monkeypatch.setattr(linear_mod, "kernel_linear", spy)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).bfloat16()
    want = F.linear(x.double(), source.weight.double(), source.bias.double())
    torch.testing.assert_close(module(x).double(), want, rtol=2**-7, atol=2e-2)  # a bias: two roundings
    assert bool(calls) == (rows <= linear_mod.KERNEL_MAX_ROWS)


@needs_avx2
@pytest.mark.usefixtures("as_avx2")
def test_matmul_goes_through_float32_only_where_bf16_gemm_is_slow(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w = torch.randn(6, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    got = matmul(x, w)
    assert got.dtype == torch.bfloat16
    bf16_close(got, F.linear(x.double(), w.double()))
    assert not KernelLinear.applies(nn.Linear(64, 8)), "float32 weights stay as they are"
    monkeypatch.delenv(moe_kernel.ISA_ENV)
    moe_kernel.load.cache_clear()
    bf16 = nn.Linear(64, 8).to(torch.bfloat16)
    if linear_mod.beats_packing():
        assert KernelLinear.applies(bf16), "the AMX or AVX512-BF16 kernel beats its bf16 GEMM at decode"
    elif moe_kernel.fast_bf16_gemm():
        assert not KernelLinear.applies(bf16), "this CPU's bf16 GEMM is fast"


@needs_avx2
@pytest.mark.usefixtures("as_avx2")
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_engine_on_an_avx2_cpu_runs_its_kernels_and_matches_row_major_weights(
    checkpoints: dict[str, Path], arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As an AVX2-only CPU loads it: nothing packed for oneDNN, the routed experts on the AVX2 kernel (it
    was left off there before: packing decided both), the dense bf16 projections on KernelLinear, and the
    same logits as the model as loaded, within bf16 rounding."""
    assert moe_kernel.path() == "avx2"
    plain = TorchEngine.load(checkpoints[arch], dtype=torch.bfloat16, pack=False)
    engine = TorchEngine.load(checkpoints[arch], dtype=torch.bfloat16)
    modules = list(engine.model.modules())
    assert not any(isinstance(m, PackedLinear) for m in modules)
    experts = [m for m in modules if isinstance(m, LocalExperts)]
    assert experts
    assert all(e.kernel for e in experts)
    kernel_linears = [m for m in modules if isinstance(m, KernelLinear)]
    assert kernel_linears, "no dense projection runs on the kernel"
    assert not [m for m in modules if isinstance(m, nn.Linear) and m.weight.dtype == torch.bfloat16]
    # A prefill past KERNEL_MAX_ROWS (float32) and one within it (the kernel); the switch is lowered to 8
    # rows rather than the prompt lengthened: at 40 tokens one bf16 rounding apart flips a near-tied top-1
    # choice of Llama 4's router (a routing difference, not an error), which a tolerance cannot absorb.
    monkeypatch.setattr(linear_mod, "KERNEL_MAX_ROWS", 8)
    for prompt in (PROMPT, PROMPT[:8]):
        torch.testing.assert_close(engine.logits(prompt), plain.logits(prompt), atol=0.05, rtol=0.05)
    assert engine.generate([PROMPT], max_new_tokens=4)


@pytest.mark.parametrize("capped", [True, False])
def test_attention_matches_float64_with_and_without_the_cap(
    capped: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """attend() in bf16: through float32 as an AVX2 CPU runs it, torch's own bf16 otherwise; the same
    answer within bf16 rounding, with grouped-query heads and a mask that hides keys."""
    if capped:
        monkeypatch.setenv(moe_kernel.ISA_ENV, "avx2")
    else:
        monkeypatch.delenv(moe_kernel.ISA_ENV, raising=False)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 8, 1, 32, generator=gen).bfloat16()
    k, v = (torch.randn(3, 2, 20, 32, generator=gen).bfloat16() for _ in range(2))
    mask = torch.arange(20)[None, None, None, :] < torch.tensor([20, 7, 1])[:, None, None, None]
    got = attend(q, k, v, mask=mask, scale=32**-0.5, gqa=True)
    assert got.dtype == torch.bfloat16
    want = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, scale=32**-0.5, enable_gqa=True
    )
    torch.testing.assert_close(got.double(), want, rtol=2**-7, atol=2e-2)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_kernel_linear_module_without_a_kernel_and_at_odd_sizes(
    rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With kernels off (or an input size the kernel cannot take), KernelLinear still answers as nn.Linear:
    torch's bf16 GEMV below FLOAT32_MIN_ROWS rows, float32 from there."""
    monkeypatch.setenv(moe_kernel.ISA_ENV, "avx2")
    monkeypatch.setenv("KUBEMOE_KERNELS", "0")
    moe_kernel.load.cache_clear()
    try:
        assert moe_kernel.load_linear() is None
        for n_in in (64, 48):
            source = nn.Linear(n_in, 24, bias=False).to(torch.bfloat16)
            assert KernelLinear.applies(source)
            x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(rows)).bfloat16()
            bf16_close(KernelLinear(source)(x), F.linear(x.double(), source.weight.double()))
    finally:
        moe_kernel.load.cache_clear()


@needs_avx2
@pytest.mark.parametrize(
    "rows", [1, linear_mod.FLOAT32_MIN_ROWS - 1, linear_mod.FLOAT32_MIN_ROWS, 40], ids=lambda r: f"{r}rows"
)
def test_without_a_kernel_decode_rows_stay_bf16_and_prefill_rows_widen(
    rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a slow bf16 GEMM and no kernel, decode's few rows run torch's bf16 loop (widening a weight costs
    more there) and from FLOAT32_MIN_ROWS on run float32; `matmul` (the torch MoE path) and KernelLinear
    agree, and both answer as F.linear does."""
    monkeypatch.setenv(moe_kernel.ISA_ENV, "avx2")
    monkeypatch.setenv("KUBEMOE_KERNELS", "0")
    moe_kernel.load.cache_clear()
    seen: list[torch.dtype] = []

    def spy(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        seen.append(w.dtype)
        return F.linear(x, w, b)

    monkeypatch.setattr(linear_mod, "F", type("F", (), {"linear": staticmethod(spy)}))
    try:
        wanted = torch.bfloat16 if rows < linear_mod.FLOAT32_MIN_ROWS else torch.float32
        assert linear_mod.form(rows, 64, 32) == ("bf16" if wanted == torch.bfloat16 else "float32")
        x, w = torch.randn(rows, 64).bfloat16(), torch.randn(32, 64).bfloat16()
        bf16_close(matmul(x, w), F.linear(x.double(), w.double()))
        source = nn.Linear(64, 32, bias=False).to(torch.bfloat16)
        bf16_close(KernelLinear(source)(x), F.linear(x.double(), source.weight.double()))
        assert seen == [wanted, wanted]
    finally:
        moe_kernel.load.cache_clear()


@pytest.fixture
def as_avx512bf16(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The AVX512-BF16 kernel in use, without tiles (a Zen 4's; forced on an AMX CPU), chosen again around
    the test."""
    if why := moe_kernel.unsupported("avx512bf16"):
        pytest.skip(why)
    yield from _chosen_again(monkeypatch, moe_kernel.FORCE_ENV, "avx512bf16")


@pytest.mark.usefixtures("as_avx512bf16")
@pytest.mark.parametrize("rows", [1, 2, 8, linear_mod.DOTS_MAX_ROWS, linear_mod.DOTS_MAX_ROWS + 1, 200])
def test_avx512bf16_without_tiles_runs_dense_projections_on_the_kernel_at_decode_rows(rows: int) -> None:
    """Where the AVX512-BF16 kernel runs without AMX, dense weights stay row-major (oneDNN's packing ran
    at about half the kernel's speed at one row on Zen 4): the kernel up to DOTS_MAX_ROWS rows, torch's
    bf16 past it; each against float64, with a bias."""
    assert moe_kernel.path() == "avx512bf16"
    assert not moe_kernel.tiles()
    source = nn.Linear(64, 40, bias=True).to(torch.bfloat16)
    assert linear_mod.beats_packing()
    assert KernelLinear.applies(source)
    assert linear_mod.form(rows, 64, 40) == ("kernel" if rows <= linear_mod.DOTS_MAX_ROWS else "bf16")
    model = nn.Sequential(source)
    assert not pack_model(model)
    assert isinstance(model[0], KernelLinear)
    assert model[0].weight.data_ptr() == source.weight.data_ptr()
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).bfloat16()
    want = F.linear(x.double(), source.weight.double(), source.bias.double())
    torch.testing.assert_close(model(x).double(), want, rtol=2**-7, atol=2e-2)  # two roundings (the bias)


def test_the_torch_moe_path_packs_where_onednn_has_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """No kernel (the torch path forced): oneDNN's packed weights serve the dense projections wherever it
    has bf16, as before the kernels beat it."""
    if not can_pack(torch.bfloat16, torch.device("cpu")):
        pytest.skip("this CPU lacks oneDNN bf16 support (AVX-512 core), so nothing is packed here")
    monkeypatch.setenv(moe_kernel.FORCE_ENV, "torch")
    moe_kernel.load.cache_clear()
    try:
        assert not linear_mod.beats_packing()
        model = nn.Sequential(nn.Linear(64, 32).to(torch.bfloat16))
        assert pack_model(model)
        assert isinstance(model[0], PackedLinear)
    finally:
        moe_kernel.load.cache_clear()
