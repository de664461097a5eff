"""The AMX tile kernels (kernels/moe_amx.c) against the float64 reference: every shape of its token blocks,
uneven experts, thread counts, its scratch across calls and threads, the choice between its tiles and its
dot products, what happens when Linux refuses the tile state, and the dense projection on tiles. Skips,
saying why, on a CPU without AMX (the dot-product kernels are tested on every x86-64 CPU by
test_moe_kernel.py)."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kubemoe_runtime.engines.torch.kernels import build
from kubemoe_runtime.engines.torch.kernels import linear as linear_mod
from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel
from kubemoe_runtime.engines.torch.kernels.linear import KernelLinear, kernel_linear
from kubemoe_runtime.engines.torch.model.packing import PackedLinear, pack_model
from tests.runtime.test_moe_kernel import Case, grouped, reference

needs_amx = pytest.mark.skipif(moe_kernel.kernel("amx") is None, reason=f"{moe_kernel.why_not('amx')}")


@pytest.fixture
def tiles_always(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moe_kernel, "AMX_MIN_ROWS", 0)


def run(case: Case, *, zeros: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The amx kernel's output on `case` and the float64 reference."""
    x, (w13, w2), ids, w = case.inputs(zeros=zeros)
    slots, picked, starts = grouped(ids, case.experts)
    got = moe_kernel.routed_experts(x, w13, w2, w, slots=slots, experts=picked, starts=starts, path="amx")
    return got, reference(x, (w13, w2), ids, w, case.experts)


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    assert want.abs().max() > 0.1, "a reference of zeros would test nothing"
    # float sums of exact bf16 products, one rounding to bf16 (and h's, from an exp within 2 ulp)
    torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=2**-8)


# One expert that every token picks: 1 token block (a tail of 1, 15, a full 16), a pair of blocks (17, 31,
# 32), a pair and a single (33, 48), two pairs (64) and a pair, a pair and a tail (65).
@needs_amx
@pytest.mark.usefixtures("tiles_always")
@pytest.mark.parametrize("rows", [1, 15, 16, 17, 31, 32, 33, 48, 64, 65])
def test_tiles_match_float64_for_every_shape_of_token_blocks(rows: int) -> None:
    assert_matches(*run(Case(rows, 1, 1, range(1), 96, 64)))


# Uneven experts (random routing), zero weights, expert parallel (other ranks' slots drop), sizes that are
# multiples of 32 but not of 64; 3 threads split hidden units and output columns unevenly.
@needs_amx
@pytest.mark.usefixtures("tiles_always")
@pytest.mark.parametrize(
    "case",
    [
        Case(100, 4, 16, range(16), 128, 96),
        Case(40, 2, 8, range(4, 8), 160, 32),
        Case(3, 8, 64, range(64), 64, 64),
    ],
    ids=str,
)
@pytest.mark.parametrize("zeros", [False, True], ids=["weights", "zero-weights"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_tiles_match_float64_on_uneven_experts(case: Case, zeros: bool, threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, want = run(case, zeros=zeros)
    finally:
        torch.set_num_threads(before)
    assert_matches(got, want)


@needs_amx
def test_tiles_and_dot_products_of_one_library_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same products summed in another order, and h's exp within 2 ulp: within a bf16 rounding."""
    case = Case(64, 4, 32, range(32), 128, 64)
    monkeypatch.setattr(moe_kernel, "AMX_MIN_ROWS", 0)
    tiles, _ = run(case)
    monkeypatch.setattr(moe_kernel, "AMX_MIN_ROWS", 1 << 30)
    dots, _ = run(case)
    torch.testing.assert_close(tiles.float(), dots.float(), atol=4e-3, rtol=2**-7)
    assert tiles.float().abs().max() > 0.1


@needs_amx
@pytest.mark.parametrize(("tokens", "tiles"), [(1, False), (2, False), (3, True), (8, True)])
def test_the_rows_an_expert_choose_tiles_or_dot_products(
    tokens: int, tiles: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 1 or 2 rows an expert (decode) the dot products run; from AMX_MIN_ROWS (3), the tiles. A spy on
    the real library's two entry points records which ran."""
    real = moe_kernel.library("amx")
    assert real is not None
    assert real.tiles is not None
    calls: list[str] = []

    def spy(name: str, fn: Any) -> Any:
        def call(*args: Any) -> int:
            calls.append(name)
            return int(fn(*args))

        return call

    lib = dataclasses.replace(real, moe=spy("moe", real.moe), tiles=spy("tiles", real.tiles))
    monkeypatch.setattr(moe_kernel, "library", lambda path: lib)
    # every token picks the same 4 of 4 experts: `tokens` rows an expert
    x, (w13, w2), _, w = Case(tokens, 4, 4, range(4), 64, 32).inputs(zeros=False)
    ids = torch.arange(4).repeat(tokens, 1)
    slots, picked, starts = grouped(ids, range(4))
    got = moe_kernel.routed_experts(x, w13, w2, w, slots=slots, experts=picked, starts=starts, path="amx")
    assert calls == ["tiles" if tiles else "moe"]
    assert_matches(got, reference(x, (w13, w2), ids, w, range(4)))


@needs_amx
@pytest.mark.usefixtures("tiles_always")
def test_scratch_kept_between_calls_of_any_size_holds_nothing_stale() -> None:
    """The kernel keeps its packing buffers between calls: a long call, a short one (its padded block
    lands on the long one's data), and a long one again."""
    for case in (
        Case(200, 4, 8, range(8), 128, 64),
        Case(3, 2, 8, range(8), 128, 64),
        Case(90, 3, 8, range(8), 128, 64),
    ):
        assert_matches(*run(case))


@needs_amx
@pytest.mark.usefixtures("tiles_always")
def test_threads_calling_at_once_each_get_their_own_scratch() -> None:
    """ctypes drops the GIL during the call: two engine threads may run the kernel at once, each with its
    own scratch; each gets exactly what it gets alone."""
    cases = [Case(64, 4, 16, range(16), 128, 64), Case(37, 2, 16, range(16), 128, 64)]
    alone = [run(case)[0] for case in cases]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def worker(i: int) -> None:
        for _ in range(20):
            results[i].append(run(cases[i])[0])

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        assert len(results[i]) == 20
        for got in results[i]:
            assert torch.equal(got, alone[i])


@pytest.fixture
def fresh_choice() -> Iterator[None]:
    for cached in (moe_kernel.load, moe_kernel.library, moe_kernel.why_not):
        cached.cache_clear()
    yield
    for cached in (moe_kernel.load, moe_kernel.library, moe_kernel.why_not):
        cached.cache_clear()


@needs_amx
@pytest.mark.usefixtures("fresh_choice")
def test_linux_refusing_the_tile_state_leaves_the_next_kernel(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A kernel older than 5.16, or a seccomp filter, refuses arch_prctl(ARCH_REQ_XCOMP_PERM); a real Linux
    cannot be made to refuse on demand, so the library's init is replaced (the one mock here): the amx
    path is off with the reason, and the AVX512-BF16 kernel runs."""
    real_cdll = ctypes.CDLL

    class Refusing:
        def __init__(self, name: str) -> None:
            self._real = real_cdll(name)

        def __getattr__(self, attr: str) -> Any:
            if attr == "kubemoe_amx_init":
                return lambda: -1
            return getattr(self._real, attr)

    monkeypatch.setattr(ctypes, "CDLL", Refusing)  # moe.py calls ctypes.CDLL
    monkeypatch.delenv(moe_kernel.FORCE_ENV, raising=False)
    monkeypatch.delenv("KUBEMOE_KERNELS", raising=False)
    caplog.set_level(logging.INFO)
    assert moe_kernel.kernel("amx") is None
    assert "Linux refused this process the AMX tile state" in str(moe_kernel.why_not("amx"))
    assert moe_kernel.path() == "avx512bf16"
    assert not moe_kernel.tiles()
    assert "MoE kernel off (amx), trying the next one" in caplog.text


def test_an_edit_to_an_included_source_rebuilds_the_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moe_amx.c includes moe_bf16.c, which includes attention.c and norm.c: the cached library's name covers
    every file, so editing any builds a new one (an old library with a new kernel beside it would be a
    silent mismatch)."""
    files = ("moe_amx.c", "moe_bf16.c", "attention.c", "norm.c")
    for name in files:
        (tmp_path / name).write_bytes((build.HERE / name).read_bytes())
    monkeypatch.setattr(build, "HERE", tmp_path)
    assert build.sources("moe_amx") == [tmp_path / name for name in files]
    for edited in ("moe_bf16.c", "attention.c", "norm.c"):
        before = {name: build.library_path(name, tmp_path) for name in ("moe_amx", "moe_bf16")}
        with (tmp_path / edited).open("a") as source:
            source.write("\n/* edited */\n")
        for name, path in before.items():
            assert build.library_path(name, tmp_path) != path, (edited, name)


@needs_amx
@pytest.mark.parametrize("rows", [1, 2, 15, 16, 17, 33, 64, 100])
@pytest.mark.parametrize(("n_out", "n_in"), [(32, 32), (96, 64), (64, 1024)])
def test_linear_tiles_match_float64(rows: int, n_out: int, n_in: int) -> None:
    """kubemoe_linear_amx at every shape of its row blocks (one, a pair, a pair and a tail)."""
    lib = moe_kernel.library("amx")
    assert lib is not None
    gen = torch.Generator().manual_seed(rows * n_out)
    x = torch.randn(rows, n_in, generator=gen).bfloat16()
    w = (torch.randn(n_out, n_in, generator=gen) * n_in**-0.5).bfloat16()
    got = kernel_linear(x, w, fn=lib.linear_tiles)
    want = F.linear(x.double(), w.double())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=2**-8)  # one rounding of float sums


@needs_amx
def test_linear_tiles_refuse_outputs_not_a_multiple_of_32() -> None:
    lib = moe_kernel.library("amx")
    assert lib is not None
    x, w = torch.zeros(4, 64, dtype=torch.bfloat16), torch.zeros(40, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"\[40, 64\] does not fit the kernel"):
        kernel_linear(x, w, fn=lib.linear_tiles)


@needs_amx
@pytest.mark.usefixtures("fresh_choice")
@pytest.mark.parametrize(
    ("rows", "n_out", "how"),
    [
        (1, 64, "kernel"),
        (2, 64, "kernel"),
        (3, 64, "tiles"),
        (256, 64, "tiles"),
        (257, 64, "bf16"),
        (16, 40, "bf16"),
    ],
)
def test_an_amx_cpu_runs_each_dense_projection_in_the_form_for_its_rows(
    rows: int, n_out: int, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dot products at 1-2 rows, tiles to TILES_MAX_ROWS, torch's bf16 (oneDNN) past it or for a shape the
    tiles do not take; each against float64, with a bias, as nn.Linear has it."""
    monkeypatch.delenv(moe_kernel.FORCE_ENV, raising=False)
    monkeypatch.delenv("KUBEMOE_KERNELS", raising=False)
    assert moe_kernel.tiles()
    source = nn.Linear(64, n_out, bias=True).to(torch.bfloat16)
    assert KernelLinear.applies(source)
    assert linear_mod.form(rows, 64, n_out) == how
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).bfloat16()
    want = F.linear(x.double(), source.weight.double(), source.bias.double())
    torch.testing.assert_close(KernelLinear(source)(x).double(), want, rtol=2**-7, atol=2e-2)  # two roundings


@needs_amx
@pytest.mark.usefixtures("fresh_choice")
def test_an_amx_cpu_keeps_its_dense_weights_row_major(monkeypatch: pytest.MonkeyPatch) -> None:
    """pack_model packs nothing for oneDNN where the kernel has tiles: dense projections become
    KernelLinear on the same weights; with the torch MoE path forced, it packs as before."""
    monkeypatch.delenv(moe_kernel.FORCE_ENV, raising=False)
    monkeypatch.delenv("KUBEMOE_KERNELS", raising=False)
    first = nn.Linear(64, 32).to(torch.bfloat16)
    model = nn.Sequential(first, nn.Linear(32, 64).to(torch.bfloat16))
    assert not pack_model(model)
    assert all(isinstance(m, KernelLinear) for m in model)
    replaced = model[0]
    assert isinstance(replaced, KernelLinear)
    assert replaced.weight.data_ptr() == first.weight.data_ptr()
    monkeypatch.setenv(moe_kernel.FORCE_ENV, "torch")
    moe_kernel.load.cache_clear()
    packed = nn.Sequential(nn.Linear(64, 32)).to(torch.bfloat16)
    assert pack_model(packed)
    assert isinstance(packed[0], PackedLinear)
