"""The routed-expert block's two execution forms (looped and batched) against a plain per-token reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

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

    for name in ("_looped", "_batched"):
        setattr(block, name, recorded(name))
    return calls


@pytest.mark.parametrize(
    ("tokens", "owned", "form"),
    [
        (1, range(0, 8), "looped"),  # decode at batch 1: two of eight experts picked
        (8, range(0, 8), "batched"),  # most experts picked, few rows each
        (64, range(0, 8), "looped"),  # prefill: more rows per expert than the batched form pads to
        (8, range(4, 8), "batched"),  # an expert-parallel rank owning the upper half
        (1, range(4, 6), "either"),  # a rank that may own none of the picked experts
    ],
)
def test_both_forms_match_the_per_token_reference(tokens: int, owned: range, form: str) -> None:
    block = experts(owned)
    x, ids, w = routed(tokens, n_experts=8, k=2, seed=tokens)
    calls = record_forms(block)
    with torch.no_grad():
        got = block(x, ids, w)
        want = reference(block, x, ids, w)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if form != "either":
        assert calls == [f"_{form}"]


def test_padding_rows_of_other_ranks_contribute_nothing() -> None:
    block = experts(range(0, 4))
    x, ids, w = routed(6, n_experts=8, k=2, seed=3)
    ids[3:] = -1  # expert-parallel padding rows carry expert id -1
    with torch.no_grad():
        y = block(x, ids, w)
    assert torch.count_nonzero(y[3:]) == 0
    torch.testing.assert_close(y, reference(block, x, ids, w), atol=1e-4, rtol=1e-4)
