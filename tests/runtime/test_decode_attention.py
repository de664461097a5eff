"""Decode attention on the kernel libraries (kernels/attention.c through kernels/attention.py): every
library this CPU runs (the avx2 one runs on AVX-512 machines too) against float64 attention, masks that
drop keys and whole rows, grouped heads, views of a KV cache, the shapes it leaves to torch, and the engine
decoding through it the same tokens as through torch's attention."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.kernels import attention as attention_mod
from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel
from kubemoe_runtime.engines.torch.kernels.attention import decode_attention
from kubemoe_runtime.engines.torch.model import layers
from kubemoe_runtime.tools.checkpoints import write_tiny_checkpoint
from tests.runtime.test_moe_kernel import KERNELS


def cache(
    B: int, S: int, G: int, C: int, *, room: int = 5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, G, S, C] as the engine reads them: views of a [B, S + room, G, C] cache."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, S + room, G, C, generator=gen).bfloat16()
    v = torch.randn(B, S + room, G, C, generator=gen).bfloat16()
    return k[:, :S].transpose(1, 2), v[:, :S].transpose(1, 2)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """float64 attention; a query that may attend no key gets zeros."""
    out = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )
    return torch.nan_to_num(out)


# (B, H, G, S, C): grouped heads 4 and 8 a KV head, one head each, a single key, key counts around the
# kernel's blocks of 8, a head size of 8 (one vector) and of 256 (its largest), 16 query heads a KV head.
SHAPES = [(1, 4, 1, 1, 64), (3, 16, 4, 37, 64), (2, 8, 8, 8, 32), (2, 32, 4, 141, 128), (1, 2, 2, 9, 8),
          (2, 4, 2, 17, 256), (1, 16, 1, 40, 24)]  # fmt: skip


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}G{}S{}C{}".format(*s))
@pytest.mark.parametrize("masked", [False, True], ids=["all-keys", "masked"])
def test_matches_float64_attention(
    kernel_library: str, shape: tuple[int, int, int, int, int], masked: bool
) -> None:
    B, H, G, S, C = shape
    gen = torch.Generator().manual_seed(S * 31 + C)
    q = torch.randn(B, H, 1, C, generator=gen).bfloat16()
    k, v = cache(B, S, G, C, seed=S)
    mask = None
    if masked:
        mask = torch.rand(B, 1, 1, S, generator=gen) < 0.6
        mask[0, ..., 0] = False  # a first key nobody attends
        if B > 1:
            mask[1] = False  # a sequence that may attend nothing
    got = decode_attention(q, k, v, mask=mask, scale=C**-0.5)
    assert got is not None
    assert got.dtype == torch.bfloat16
    assert got.shape == (B, H, 1, C)
    torch.testing.assert_close(got.double(), reference(q, k, v, mask, C**-0.5), rtol=2**-7, atol=2e-3)
    if masked and B > 1:
        assert got[1].abs().max() == 0, "a query with no key to attend gets zeros"


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
def test_masked_cache_rows_never_reach_the_output(kernel_library: str) -> None:
    """The kernel reads masked rows (it widens keys and values a block at a time) but their NaN and inf,
    what an unwritten cache slot may hold, must not reach the output."""
    B, H, G, S, C = 2, 8, 2, 150, 64
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, 1, C, generator=gen).bfloat16()
    k, v = cache(B, S, G, C, seed=7)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[:, ..., 100:] = False
    clean = decode_attention(q, k, v, mask=mask, scale=C**-0.5)
    k[:, :, 100:120] = float("nan")
    v[:, :, 100:120] = float("inf")
    k[:, :, 120:] = float("inf")
    v[:, :, 120:] = float("nan")
    got = decode_attention(q, k, v, mask=mask, scale=C**-0.5)
    assert clean is not None
    assert got is not None
    assert torch.equal(got, clean)


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
def test_threads_split_the_work_and_agree(kernel_library: str) -> None:
    B, H, G, S, C = 5, 8, 2, 70, 64
    q = torch.randn(B, H, 1, C).bfloat16()
    k, v = cache(B, S, G, C)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(decode_attention(q, k, v, mask=None, scale=0.125))
    finally:
        torch.set_num_threads(before)
    assert outs[0] is not None
    for out in outs[1:]:
        assert out is not None
        assert torch.equal(out, outs[0]), "each item is one thread's, in one order"


@pytest.mark.parametrize("kernel_library", KERNELS[-1:], indirect=True)
def test_leaves_what_it_does_not_take_to_torch(kernel_library: str) -> None:
    B, H, G, S, C = 2, 8, 2, 12, 64
    q = torch.randn(B, H, 1, C).bfloat16()
    k, v = cache(B, S, G, C)
    assert decode_attention(q, k, v, mask=None, scale=0.125) is not None
    refused = {
        "prefill (two queries)": (torch.randn(B, H, 2, C).bfloat16(), k, v, None),
        "float32": (q.float(), k.float(), v.float(), None),
        "values of another head size (MLA)": (q, k, cache(B, S, G, 32)[1], None),
        "a head size not a multiple of 8": (q[..., :60], k[..., :60], v[..., :60], None),
        "a head larger than 256": (torch.randn(1, 2, 1, 264).bfloat16(), *cache(1, S, 1, 264), None),
        "17 query heads a KV head": (torch.randn(1, 17, 1, 64).bfloat16(), *cache(1, S, 1, 64), None),
        "keys not [S, G, C] per sequence": (q, k.contiguous(), v.contiguous(), None),
        "a float mask": (q, k, v, torch.zeros(B, 1, 1, S)),
        "a mask of another shape": (q, k, v, torch.ones(B, 1, S, dtype=torch.bool)),
        "no keys": (q, k[:, :, :0], v[:, :, :0], None),
        "no sequences": (q[:0], k[:0], v[:0], None),
    }
    for why, (q_, k_, v_, mask) in refused.items():
        assert decode_attention(q_, k_, v_, mask=mask, scale=0.125) is None, why


def test_the_torch_path_has_no_kernel_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEMOE_KERNELS", "0")
    moe_kernel.load.cache_clear()
    try:
        q = torch.randn(1, 4, 1, 64).bfloat16()
        k, v = cache(1, 9, 2, 64)
        assert decode_attention(q, k, v, mask=None, scale=0.125) is None
        out = layers.attend(q, k, v, mask=None, scale=0.125, gqa=True)  # torch's, through float32 or not
        torch.testing.assert_close(out.double(), reference(q, k, v, None, 0.125), rtol=2**-7, atol=2e-3)
    finally:
        moe_kernel.load.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "shape",
    [(3, 16, 4, 37, 64, 64), (2, 8, 8, 70, 32, 32), (2, 4, 4, 9, 48, 32)],
    ids=["grouped", "one-head-each", "MLA-values-narrower"],
)
def test_torch_path_decode_attention_matches_float64(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, shape: tuple[int, int, int, int, int, int]
) -> None:
    """Without a kernel, decode runs as two matmuls (layers.decode_matmul_attention), not torch's CPU flash
    attention: float64 results, masked keys and a row that may attend nothing (zeros, not NaN)."""
    B, H, G, S, C, c = shape  # c: the values' head size
    monkeypatch.setenv("KUBEMOE_KERNELS", "0")
    moe_kernel.load.cache_clear()
    try:
        gen = torch.Generator().manual_seed(B * S + c)
        q = torch.randn(B, H, 1, C, generator=gen).to(dtype)
        k = torch.randn(B, G, S, C, generator=gen).to(dtype)
        v = torch.randn(B, G, S, c, generator=gen).to(dtype)
        mask = torch.rand(B, 1, 1, S, generator=gen) > 0.3
        mask[-1] = False  # the last row attends nothing
        calls: list[int] = []
        monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1))
        out = layers.attend(q, k, v, mask=mask, scale=C**-0.5, gqa=G != H)
        assert not calls, "decode took torch's flash attention"
        assert out.shape == (B, H, 1, c)
        assert out.dtype == dtype
        monkeypatch.undo()
        want = reference(q, k, v, mask, C**-0.5)
        assert torch.equal(out[-1], torch.zeros_like(out[-1]))
        tols = {torch.bfloat16: (2**-7, 2e-3), torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12)}
        tol = tols[dtype]
        torch.testing.assert_close(out.double(), want, rtol=tol[0], atol=tol[1])
    finally:
        moe_kernel.load.cache_clear()


def decode_logits(engine: TorchEngine, prompts: list[list[int]], steps: int = 4) -> list[torch.Tensor]:
    """Each decode step's logits [B, V] after a batched prefill of equal-length prompts, feeding fixed
    tokens (not the argmax: one rounding apart must not send the two runs down different paths)."""
    B, T = len(prompts), len(prompts[0])
    cache = engine.model.new_cache(slots=B, max_len=T + steps, dtype=torch.bfloat16)
    engine.model(torch.tensor(prompts), pos_BT=torch.arange(T).expand(B, T), cache=cache)
    out = []
    for step in range(steps):
        tokens_B1 = torch.tensor([[7 + 13 * b + step] for b in range(B)])
        out.append(engine.model(tokens_B1, pos_BT=torch.full((B, 1), T + step), cache=cache)[:, -1].float())
    return out


@pytest.mark.parametrize("kernel_library", KERNELS, indirect=True)
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "llama4_text"])
def test_engine_decodes_through_it_as_through_torch(
    kernel_library: str, arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode steps of a batch through the kernel's attention and through torch's (the kernel turned off for
    attention alone): the same logits within bf16 rounding, and the kernel really ran at every layer."""
    engine = TorchEngine.load(write_tiny_checkpoint(tmp_path / arch, arch=arch), dtype=torch.bfloat16)
    prompts = [[5, 17, 42, 99, 7, 3], [3, 8, 1, 250, 11, 60], [100, 200, 300, 17, 42, 7]]
    ran: list[bool] = []
    real = attention_mod.decode_attention

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor | None:
        out = real(*args, **kwargs)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(layers, "decode_attention", spy)
    through_kernel = decode_logits(engine, prompts)
    assert ran
    assert all(ran)
    monkeypatch.setattr(layers, "decode_attention", lambda *a, **k: None)
    through_torch = decode_logits(engine, prompts)
    for kernel_BV, torch_BV in zip(through_kernel, through_torch, strict=True):
        torch.testing.assert_close(kernel_BV, torch_BV, atol=0.05, rtol=0.05)
