"""The MoE kernels (kernels/moe_bf16.c, one per instruction set) and the torch path they replace: each
against a float64 reference, on whatever CPU runs this; a path this CPU cannot run skips and says why."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from kubemoe_runtime.engines.torch.kernels import build
from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel
from kubemoe_runtime.engines.torch.model.moe import LocalExperts

# Every kernel, each run (or skipped with its reason) on this CPU, whatever path the engine would choose.
KERNELS = [
    pytest.param(
        path,
        marks=pytest.mark.skipif(moe_kernel.kernel(path) is None, reason=f"{moe_kernel.why_not(path)}"),
        id=path,
    )
    for path in moe_kernel.PATHS
]


@pytest.fixture(autouse=True)
def tiles_at_every_row_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """The amx path on its tiles even at decode's few rows an expert, so that every test here checks them
    (below AMX_MIN_ROWS it runs the AVX512-BF16 code of moe_bf16.c, tested here as that path)."""
    monkeypatch.setattr(moe_kernel, "AMX_MIN_ROWS", 0)


@pytest.fixture
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """torch's (and so the kernel's) thread count for one test; conftest's 1 otherwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def grouped(ids_MK: torch.Tensor, experts: range) -> tuple[list[int], list[int], list[int]]:
    """Slots of this rank's experts grouped by expert, as LocalExperts.forward makes them."""
    local = [e - experts.start for e in ids_MK.flatten().tolist()]
    slots = sorted((s for s, e in enumerate(local) if 0 <= e < len(experts)), key=local.__getitem__)
    picked = sorted({local[s] for s in slots})
    counts = [sum(1 for s in slots if local[s] == e) for e in picked]
    return slots, picked, [0, *itertools.accumulate(counts)]


def reference(
    x_MD: torch.Tensor,
    layer: tuple[torch.Tensor, torch.Tensor],
    ids_MK: torch.Tensor,
    w_MK: torch.Tensor,
    experts: range,
) -> torch.Tensor:
    """Per token and choice, in float64 from the same bf16 values; h rounded to bf16 as the kernel does."""
    x, w13, w2 = x_MD.double(), layer[0].double(), layer[1].double()
    F_ = w2.shape[2]
    y = torch.zeros(x.shape, dtype=torch.float64)
    for m, k in itertools.product(range(ids_MK.shape[0]), range(ids_MK.shape[1])):
        e = int(ids_MK[m, k]) - experts.start
        if not 0 <= e < len(experts):
            continue
        gate_up = w13[e] @ x[m]
        gate, up = gate_up[:F_], gate_up[F_:]
        h = (F.silu(gate) * up).to(torch.bfloat16).double()
        y[m] += float(w_MK[m, k]) * (w2[e] @ h)
    return y


def random_layer(E: int, D: int, F_: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * F_, D, generator=gen) * D**-0.5).bfloat16()
    w2 = (torch.randn(E, D, F_, generator=gen) * F_**-0.5).bfloat16()
    return w13, w2


@dataclass(frozen=True)
class Case:
    M: int  # rows (tokens)
    K: int  # top-K
    E: int  # experts
    experts: range  # this rank's
    D: int  # hidden size
    F: int  # expert size

    def __str__(self) -> str:
        ep = "-ep" if len(self.experts) < self.E else ""
        return f"M{self.M}-K{self.K}-E{self.E}-D{self.D}-F{self.F}{ep}"

    def inputs(
        self, *, zeros: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
        """x [M, D], the layer, ids [M, K] (distinct experts a token) and weights [M, K]: with `zeros`,
        every third slot's weight is 0, and from 2 rows all of the last token's (its output must be 0)."""
        layer = random_layer(len(self.experts), self.D, self.F, seed=self.M + self.D)
        gen = torch.Generator().manual_seed(self.M)
        x = torch.randn(self.M, self.D, generator=gen).bfloat16()
        ids = torch.stack([torch.randperm(self.E, generator=gen)[: self.K] for _ in range(self.M)])
        w = torch.softmax(torch.randn(self.M, self.K, generator=gen), dim=-1)
        if zeros:
            w.view(-1)[::3] = 0.0
            if self.M > 1:
                w[-1] = 0.0
        return x, layer, ids, w


# Decode at batch 1, 4, 16 and 64 (a few rows an expert); 64 rows on 4 experts (dozens of rows an expert:
# the kernels' row blocks and their tails); expert parallel (other ranks' slots drop); sizes multiples of
# 32 but not all of 64.
CASES = [
    Case(1, 4, 32, range(32), 128, 64),
    Case(4, 4, 32, range(32), 128, 64),
    Case(16, 8, 64, range(64), 96, 160),
    Case(64, 4, 32, range(32), 128, 64),
    Case(64, 3, 4, range(4), 160, 96),
    Case(16, 2, 8, range(4, 8), 128, 32),
]
ZEROS = pytest.mark.parametrize("zeros", [False, True], ids=["weights", "zero-weights"])


@pytest.mark.parametrize("path", KERNELS)
@pytest.mark.parametrize("case", CASES, ids=str)
@ZEROS
@pytest.mark.parametrize("threads", [1, 3], indirect=True, ids=["1-thread", "3-threads"])
def test_kernel_matches_float64_reference(path: str, case: Case, zeros: bool, threads: int) -> None:
    check_kernel(path, case, zeros=zeros)


# Each row count an expert can have, up to two full row blocks and a tail, on one expert that every token
# picks: the AVX-512 kernel dots up to 8 rows against a weight row, the AVX2 one 4, and each count below
# that is its own unrolled code (ROW_CASES in moe_bf16.c); the random routing of CASES may miss some.
@pytest.mark.parametrize("path", KERNELS)
@pytest.mark.parametrize("rows", range(1, 18))
def test_kernel_matches_float64_reference_at_every_row_count(path: str, rows: int) -> None:
    check_kernel(path, Case(rows, 1, 1, range(1), 64, 32), zeros=False)


def check_kernel(path: str, case: Case, *, zeros: bool) -> None:
    """Kernel `path` against the float64 reference on `case`'s inputs."""
    x, (w13, w2), ids, w = case.inputs(zeros=zeros)
    slots, picked, starts = grouped(ids, case.experts)

    got = moe_kernel.routed_experts(x, w13, w2, w, slots=slots, experts=picked, starts=starts, path=path)

    want = reference(x, (w13, w2), ids, w, case.experts)
    assert got.dtype == torch.bfloat16
    assert got.shape == (case.M, case.D)
    assert want.abs().max() > 0.1, "a reference of zeros would test nothing"
    # float sums of exact bf16 products, then one rounding to bf16: within bf16's half-ulp (2^-9)
    torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=2**-8)
    for m in range(case.M):  # a token none of whose choices is this rank's, or all weighted 0, gets zeros
        if not any(int(e) in case.experts and float(w[m, k]) != 0 for k, e in enumerate(ids[m])):
            assert got[m].abs().max() == 0


@pytest.mark.parametrize("case", CASES, ids=str)
@ZEROS
def test_torch_path_matches_float64_reference(case: Case, zeros: bool) -> None:
    """LocalExperts without a kernel: what runs without AVX2, or with KUBEMOE_MOE_KERNEL=torch (its grouped
    form where torch's bf16 GEMM is fast, else its looped form, through float32)."""
    x, (w13, w2), ids, w = case.inputs(zeros=zeros)
    module = LocalExperts(dim=case.D, hidden=case.F, experts=case.experts)
    module.w_gate_up_E2FD.data, module.w_down_EDF.data = w13, w2
    module.requires_grad_(False)
    assert not module.kernel

    with torch.inference_mode():
        got = module(x, ids, w)

    want = reference(x, (w13, w2), ids, w, case.experts)
    assert got.dtype == torch.bfloat16
    assert got.shape == (case.M, case.D)
    # bf16 all the way: h, each expert's output and the weighted sum are each rounded to bf16
    torch.testing.assert_close(got.double(), want, atol=1e-2, rtol=2e-2)


@pytest.mark.parametrize("path", KERNELS)
@pytest.mark.parametrize(("M", "kernel_runs"), [(6, True), (400, False)])
def test_local_experts_kernel_matches_torch_path(
    path: str, M: int, kernel_runs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LocalExperts on each kernel (forced as KUBEMOE_MOE_KERNEL does) against the same module on its torch
    path. Long prefills (many rows an expert) go to the torch path on the same weights, except on the amx
    path, whose tiles are the fastest at any length: a spy on the real kernel records which ran."""
    monkeypatch.setenv(moe_kernel.FORCE_ENV, path)
    moe_kernel.load.cache_clear()
    assert moe_kernel.path() == path
    D, F_, E, K = 64, 32, 8, 2
    fast, slow = (LocalExperts(dim=D, hidden=F_, experts=range(E)) for _ in range(2))
    w13, w2 = random_layer(E, D, F_, seed=3)
    for module in (fast, slow):
        module.w_gate_up_E2FD.data, module.w_down_EDF.data = w13.clone(), w2.clone()
    fast.choose_kernel()
    assert fast.kernel
    calls: list[int] = []
    real = moe_kernel.routed_experts

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(len(kwargs["slots"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(moe_kernel, "routed_experts", spy)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(M, D, generator=gen).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(M)])
    w = torch.softmax(torch.randn(M, K, generator=gen), dim=-1)

    try:
        got, want = fast(x, ids, w), slow(x, ids, w)
    finally:
        moe_kernel.load.cache_clear()  # the next test chooses again, without the forced path
    assert bool(calls) == (kernel_runs or path == "amx")
    # the torch path rounds each expert's output to bf16 before the weighted sum; the kernel does not
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_kernel_refuses_shapes_it_cannot_run() -> None:
    assert moe_kernel.fits(1024, 512)
    assert not moe_kernel.fits(1000, 512)
    assert not moe_kernel.fits(1024, 48)


@pytest.mark.parametrize("path", KERNELS)
@pytest.mark.parametrize(
    ("slots", "experts", "starts"),
    [
        ([0, 1], [0], [0, 1]),  # starts does not end at the slot count
        ([0, 1], [0, 9], [0, 1, 2]),  # expert 9 of 4
        ([0, 8], [0, 1], [0, 1, 2]),  # slot 8 of 2 tokens x 2 choices
        ([0, 1], [0, 1], [0, 2, 1]),  # starts go backwards
    ],
)
def test_kernel_checks_indexes_before_touching_memory(
    path: str, slots: list[int], experts: list[int], starts: list[int]
) -> None:
    w13, w2 = random_layer(4, 64, 32, seed=0)
    x, w = torch.zeros(2, 64, dtype=torch.bfloat16), torch.full((2, 2), 0.5)
    with pytest.raises(ValueError, match="out of range"):
        moe_kernel.routed_experts(x, w13, w2, w, slots=slots, experts=experts, starts=starts, path=path)
    with pytest.raises(ValueError, match="shapes do not agree"):
        moe_kernel.routed_experts(x[:1], w13, w2, w, slots=[0], experts=[0], starts=[0, 1], path=path)


@pytest.mark.parametrize("path", KERNELS)
def test_kernel_shares_torchs_openmp_runtime(path: str) -> None:
    """Two OpenMP runtimes in one process would each keep a spinning thread pool on the same cores."""
    assert moe_kernel.kernel(path) is not None
    maps = Path("/proc/self/maps").read_text().splitlines()
    runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


@pytest.mark.parametrize("name", build.KERNELS)
def test_build_is_cached_and_versioned(tmp_path: Path, name: str) -> None:
    if build.compiler() is None:
        pytest.skip("no C compiler on this machine")
    first = build.build(name, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build.build(name, tmp_path) == first
    assert first.stat().st_mtime_ns == stamp
    assert first.name.startswith(f"{name}-")
    assert len(first.stem) == len(f"{name}-") + 16
    assert list(tmp_path.glob(f".{name}-*")) == [], "a temporary file was left behind"


def test_build_failure_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails: the error carries the command line
    with pytest.raises(build.KernelBuildError, match=r"building the moe_bf16 kernel failed: .*false"):
        build.build("moe_bf16", tmp_path)
    assert list(tmp_path.iterdir()) == [], "a failed build left a file in the cache"


def test_a_kernel_that_cannot_be_loaded_leaves_the_torch_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if moe_kernel.load() is None:
        pytest.skip("the kernel does not run on this machine in the first place")
    monkeypatch.setenv("KUBEMOE_KERNEL_DIR", str(tmp_path))
    monkeypatch.delenv(moe_kernel.FORCE_ENV, raising=False)
    for name in moe_kernel.LIBRARIES.values():  # every kernel's cache entry damaged
        build.library_path(name).write_bytes(b"not an ELF file")
    moe_kernel.load.cache_clear()
    try:
        assert moe_kernel.load() is None
        assert moe_kernel.path() == "torch"
        assert "MoE kernel off (avx2)" in caplog.text
        experts = LocalExperts(dim=64, hidden=32, experts=range(4))
        experts.w_gate_up_E2FD.data = experts.w_gate_up_E2FD.data.bfloat16()
        experts.w_down_EDF.data = experts.w_down_EDF.data.bfloat16()
        experts.choose_kernel()
        assert not experts.kernel, "LocalExperts picked a kernel that cannot load"
    finally:
        moe_kernel.load.cache_clear()
