"""Which MoE path runs (kernels/moe.py): the fastest kernel this CPU has, KUBEMOE_MOE_KERNEL to force one,
KUBEMOE_KERNELS=0 for none; and the AVX2 kernel is what an AVX2-only CPU's engine gets, with no change to
the model code. The AVX2 kernel runs for real here on any CPU with AVX2 (AVX-512 CPUs included): only the
flags the choice reads are pretended."""

from __future__ import annotations

import logging
import platform
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kubemoe_runtime.engines.torch.kernels import build
from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel
from kubemoe_runtime.engines.torch.model.moe import LocalExperts
from tests.runtime.test_moe_kernel import CASES, grouped, reference

AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})  # an AVX2 EPYC or Haswell..Alder Lake
needs_avx2 = pytest.mark.skipif(moe_kernel.kernel("avx2") is None, reason=f"{moe_kernel.why_not('avx2')}")
needs_both = pytest.mark.skipif(
    moe_kernel.kernel("avx512bf16") is None or moe_kernel.kernel("avx2") is None,
    reason=f"needs both kernels: {moe_kernel.why_not('avx512bf16') or moe_kernel.why_not('avx2')}",
)


@pytest.fixture(autouse=True)
def choose_afresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test chooses with its own environment; the next one (and other modules) choose again."""
    monkeypatch.delenv("KUBEMOE_KERNELS", raising=False)
    monkeypatch.delenv(moe_kernel.FORCE_ENV, raising=False)
    moe_kernel.load.cache_clear()
    yield
    moe_kernel.load.cache_clear()


def pretend_cpu(monkeypatch: pytest.MonkeyPatch, flags: frozenset[str]) -> None:
    monkeypatch.setattr(moe_kernel, "cpu_flags", lambda: flags)


@needs_avx2
def test_an_avx2_cpu_gets_the_avx2_kernel_in_the_unchanged_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pretend_cpu(monkeypatch, AVX2_ONLY)
    assert moe_kernel.path() == "avx2"
    assert moe_kernel.load() is not None
    case = CASES[2]  # decode at batch 16, 64 experts top-8
    x, (w13, w2), ids, w = case.inputs(zeros=False)
    experts = LocalExperts(dim=case.D, hidden=case.F, experts=case.experts)
    experts.w_gate_up_E2FD.data, experts.w_down_EDF.data = w13, w2
    experts.requires_grad_(False)
    experts.choose_kernel()  # as pack_model calls it
    assert experts.kernel
    calls: list[str] = []
    real = moe_kernel.routed_experts

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(moe_kernel.path())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(moe_kernel, "routed_experts", spy)
    with torch.inference_mode():
        got = experts(x, ids, w)
    assert calls == ["avx2"]
    torch.testing.assert_close(
        got.double(), reference(x, (w13, w2), ids, w, case.experts), atol=2e-3, rtol=2**-8
    )


def test_a_cpu_without_avx2_runs_the_torch_path(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pretend_cpu(monkeypatch, frozenset({"sse4_2", "avx"}))
    caplog.set_level(logging.INFO)
    assert moe_kernel.load() is None
    assert moe_kernel.path() == "torch"
    assert "runs none of amx, avx512bf16, avx2" in caplog.text
    assert "lacks avx2, fma" in str(moe_kernel.unsupported("avx2"))


def test_off_x86_no_kernel_is_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert moe_kernel.load() is None
    assert "needs an x86-64 CPU, this is aarch64" in str(moe_kernel.unsupported("avx2"))


@needs_avx2
@pytest.mark.parametrize("path", ["avx2", "torch"])
def test_the_environment_forces_a_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(moe_kernel.FORCE_ENV, path)
    assert moe_kernel.path() == path
    assert (moe_kernel.load() is None) == (path == "torch")
    assert f"{path} ({moe_kernel.FORCE_ENV}={path})" in moe_kernel.describe()


@needs_avx2
def test_kernels_off_wins_over_a_forced_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBEMOE_KERNELS", "0")
    monkeypatch.setenv(moe_kernel.FORCE_ENV, "avx2")
    assert moe_kernel.load() is None
    assert "torch (KUBEMOE_KERNELS=0)" in moe_kernel.describe()


@needs_avx2
def test_a_forced_kernel_the_cpu_lacks_means_the_torch_path_not_another_kernel(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pretend_cpu(monkeypatch, AVX2_ONLY)
    monkeypatch.setenv(moe_kernel.FORCE_ENV, "avx512bf16")
    assert moe_kernel.load() is None
    assert moe_kernel.path() == "torch"
    assert "MoE kernel off (avx512bf16), the torch path runs instead" in caplog.text
    assert "lacks avx512_bf16, avx512bw, avx512f, avx512vl" in caplog.text


def test_every_kernel_needs_fma_as_its_library_is_built_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """An AVX-512 CPU without FMA (a hypervisor can hide it) runs no kernel: each is built with -mfma."""
    for path, flags in build.KERNELS.items():
        assert "-mfma" in flags, path
    pretend_cpu(monkeypatch, (moe_kernel.NEEDS["amx"] | {"avx2"}) - {"fma"})
    for path in moe_kernel.PATHS:
        assert str(moe_kernel.unsupported(path)).endswith("this CPU lacks fma"), path


@needs_avx2
def test_an_unknown_forced_path_is_ignored_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pretend_cpu(monkeypatch, AVX2_ONLY)
    monkeypatch.setenv(moe_kernel.FORCE_ENV, "avx512")
    assert moe_kernel.path() == "avx2"
    assert "KUBEMOE_MOE_KERNEL=avx512 is none of amx, avx512bf16, avx2, torch" in caplog.text


@needs_both
def test_the_fastest_kernel_is_chosen_and_a_broken_one_falls_back_to_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fastest, second = [path for path in moe_kernel.PATHS if moe_kernel.kernel(path) is not None][:2]
    assert moe_kernel.path() == fastest
    monkeypatch.setenv("KUBEMOE_KERNEL_DIR", str(tmp_path))
    build.library_path(moe_kernel.LIBRARIES[fastest]).write_bytes(b"not an ELF file")  # it is damaged
    moe_kernel.load.cache_clear()
    assert moe_kernel.path() == second
    assert f"MoE kernel off ({fastest}), trying the next one" in caplog.text


def test_describe_names_the_path_and_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_cpu(monkeypatch, AVX2_ONLY)
    line = moe_kernel.describe()
    assert line.startswith(f"MoE routed experts: {moe_kernel.path()} (chosen by CPU)")
    assert line.endswith("flags: avx2 fma")


def disassembly(name: str, tmp_path: Path) -> str:
    objdump = shutil.which("objdump")
    if objdump is None or build.compiler() is None:
        pytest.skip("needs objdump and a C compiler")
    library = build.build(name, tmp_path)
    return subprocess.run([objdump, "-d", str(library)], capture_output=True, text=True, check=True).stdout


def test_the_avx2_library_holds_no_avx512_instruction(tmp_path: Path) -> None:
    """Built with -mavx2 -mfma, never -march=native: it must run on every AVX2 CPU, whatever built it."""
    avx2 = disassembly("moe_bf16_avx2", tmp_path)
    assert "vfmadd" in avx2
    assert "%ymm" in avx2
    assert "%zmm" not in avx2
    assert "{%k" not in avx2  # no AVX-512 masking on narrower registers either
    assert "vdpbf16ps" in disassembly("moe_bf16", tmp_path)  # the check above can see what it looks for
    assert "-march=native" not in " ".join(flag for flags in build.KERNELS.values() for flag in flags)


@needs_avx2
def test_the_avx2_kernel_matches_the_avx512_kernel_where_both_run() -> None:
    """On a CPU with both, the two kernels sum the same products in a different order: within rounding."""
    if moe_kernel.kernel("avx512bf16") is None:
        pytest.skip(f"{moe_kernel.why_not('avx512bf16')}")
    case = CASES[3]
    x, (w13, w2), ids, w = case.inputs(zeros=False)
    slots, picked, starts = grouped(ids, case.experts)
    a, b = (
        moe_kernel.routed_experts(x, w13, w2, w, slots=slots, experts=picked, starts=starts, path=p)
        for p in ("avx2", "avx512bf16")
    )
    torch.testing.assert_close(a.float(), b.float(), atol=4e-3, rtol=2**-7)
    assert a.float().abs().max() > 0.1
