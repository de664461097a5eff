"""The routed-expert block's torch forms (grouped, looped, batched) against a plain per-token reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel
from kubemoe_runtime.engines.torch.kernels.linear import FLOAT32_MIN_ROWS
from kubemoe_runtime.engines.torch.model import moe
from kubemoe_runtime.engines.torch.model.moe import LocalExperts

D, H = 16, 8


def experts(owned: range, *, seed: int = 0) -> LocalExperts:
    gen = torch.Generator().manual_seed(seed)
    block = LocalExperts(dim=D, hidden=H, experts=owned)
    with torch.no_grad():
        block.w_gate_up_E2FD.copy_(torch.randn(block.w_gate_up_E2FD.shape, generator=gen))
        block.w_down_EDF.copy_(torch.randn(block.w_down_EDF.shape, generator=gen))
    return block


def reference(
    block: LocalExperts, x_MD: torch.Tensor, ids_MK: torch.Tensor, w_MK: torch.Tensor
) -> torch.Tensor:
    """Token by token, choice by choice: the weighted SwiGLU of every owned expert it picked."""
    y = torch.zeros_like(x_MD)
    for m in range(x_MD.shape[0]):
        for k in range(ids_MK.shape[1]):
            expert = int(ids_MK[m, k])
            if expert not in block.experts:
                continue
            local = expert - block.experts.start
            gate, up = (block.w_gate_up_E2FD[local] @ x_MD[m]).chunk(2)
            y[m] += w_MK[m, k] * (block.w_down_EDF[local] @ (F.silu(gate) * up))
    return y


def routed(tokens: int, *, n_experts: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, D, generator=gen)
    ids = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=gen)
    return x, ids, w


def record_forms(block: LocalExperts) -> list[str]:
    """Which execution form each forward takes (wraps the real methods; nothing is replaced)."""
    calls: list[str] = []

    def recorded(name: str) -> Callable[..., torch.Tensor]:
        original = getattr(block, name)

        def wrapped(*args: Any) -> torch.Tensor:
            calls.append(name)
            out: torch.Tensor = original(*args)
            return out

        return wrapped

    for name in ("_grouped", "_looped", "_batched"):
        setattr(block, name, recorded(name))
    return calls


@pytest.mark.parametrize(
    ("tokens", "owned", "grouped_runs", "form"),
    [
        (1, range(0, 8), True, "grouped"),  # decode at batch 1: two of eight experts picked
        (8, range(0, 8), True, "grouped"),  # decode at batch 8: most experts picked
        (64, range(0, 8), True, "looped"),  # a long prefill: past GROUPED_MAX_ROWS (4 here) rows an expert
        (8, range(4, 8), True, "grouped"),  # an expert-parallel rank owning the upper half
        # Off the CPU (grouped_mm's rules are narrower there): batched at decode, looped at prefill
        (8, range(0, 8), False, "batched"),
        (64, range(0, 8), False, "looped"),
        (8, range(4, 8), False, "batched"),
        (1, range(4, 6), True, "either"),  # a rank that may own none of the picked experts
    ],
)
def test_each_form_matches_the_per_token_reference(
    tokens: int, owned: range, grouped_runs: bool, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = experts(owned)
    block.GROUPED_MAX_ROWS = 4
    if not grouped_runs:
        monkeypatch.setattr(moe, "grouped_mm_runs", lambda *args: False)
    x, ids, w = routed(tokens, n_experts=8, k=2, seed=tokens)
    calls = record_forms(block)
    with torch.no_grad():
        got = block(x, ids, w)
        want = reference(block, x, ids, w)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if form != "either":
        assert calls == [f"_{form}"]


def test_grouped_form_skips_experts_no_row_picked() -> None:
    """grouped_mm's groups are every local slot; slots no row picked (2, 5 and 7 here: empty groups between
    busy ones and at the end) are empty groups, and their weights (NaN, so any use shows) are never read."""
    block = experts(range(0, 8))
    idle = [2, 5, 7]
    with torch.no_grad():
        block.w_gate_up_E2FD[idle] = float("nan")
        block.w_down_EDF[idle] = float("nan")
    x, ids, w = routed(6, n_experts=5, k=2, seed=4)
    ids = torch.tensor([0, 1, 3, 4, 6])[ids]  # experts 0, 1, 3, 4 and 6 only
    assert set(ids.flatten().tolist()) == {0, 1, 3, 4, 6}
    calls = record_forms(block)
    with torch.no_grad():
        got = block(x, ids, w)
    assert calls == ["_grouped"]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference(block, x, ids, w), atol=1e-4, rtol=1e-4)


def test_sizes_grouped_mm_cannot_stride_take_the_looped_form() -> None:
    """grouped_mm wants each size 16 bytes wide: an expert of 6 (24 bytes in float32) takes another form."""
    block = LocalExperts(dim=D, hidden=6, experts=range(0, 8))
    with torch.no_grad():
        block.w_gate_up_E2FD.normal_()
        block.w_down_EDF.normal_()
    x, ids, w = routed(4, n_experts=8, k=2, seed=6)
    calls = record_forms(block)
    with torch.no_grad():
        got = block(x, ids, w)
    assert calls
    assert "_grouped" not in calls
    torch.testing.assert_close(got, reference(block, x, ids, w), atol=1e-4, rtol=1e-4)


def test_padding_rows_of_other_ranks_contribute_nothing() -> None:
    block = experts(range(0, 4))
    x, ids, w = routed(6, n_experts=8, k=2, seed=3)
    ids[3:] = -1  # expert-parallel padding rows carry expert id -1
    with torch.no_grad():
        y = block(x, ids, w)
    assert torch.count_nonzero(y[3:]) == 0
    torch.testing.assert_close(y, reference(block, x, ids, w), atol=1e-4, rtol=1e-4)


def test_float64_experts_take_a_form_torch_multiplies_in_float64() -> None:
    """grouped_mm has no float64 on the CPU: a float64 block (a reference model) takes the other forms."""
    block = experts(range(0, 8)).double()
    x, ids, w = routed(8, n_experts=8, k=2, seed=5)
    calls = record_forms(block)
    with torch.no_grad():
        got = block(x.double(), ids, w.double())
    assert calls == ["_batched"]
    torch.testing.assert_close(got, reference(block, x.double(), ids, w.double()), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(("tokens", "form"), [(4, "grouped"), (64, "looped")])
def test_bf16_on_a_cpu_whose_bf16_gemm_is_slow(
    tokens: int, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where torch's bf16 GEMM is a loop (an AVX2-only CPU: fast_bf16_gemm is False there, set so here on
    any CPU), decode's few rows an expert still take the grouped form (one C++ loop of torch's bf16 GEMMs,
    no per-expert op from Python); from FLOAT32_MIN_ROWS rows an expert the looped form widens to float32.
    Both against the float64 reference."""
    monkeypatch.setattr(moe_kernel, "fast_bf16_gemm", lambda: False)
    block = experts(range(0, 8))
    x, ids, w = routed(tokens, n_experts=8, k=2, seed=tokens)
    few = max(torch.bincount(ids.flatten(), minlength=8).tolist()) < FLOAT32_MIN_ROWS
    assert few == (form == "grouped")
    calls = record_forms(block.bfloat16())
    with torch.no_grad():
        got = block(x.bfloat16(), ids, w.bfloat16())
        want = reference(block.double(), x.bfloat16().double(), ids, w.bfloat16().double())
    assert calls == [f"_{form}"]
    torch.testing.assert_close(got.double(), want, atol=0.05 * want.abs().max().item(), rtol=0.02)
