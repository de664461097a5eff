"""Tiny checkpoints for the runtime tests, generated once per session into a temporary directory."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.kernels import moe as moe_kernel
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.tools.checkpoints import ARCHITECTURES, write_tiny_checkpoint
from tests.runtime.echo_backend import EchoBackend

torch.set_num_threads(1)  # tiny models: threads only add contention on a small, busy machine
# ...and in the ranks a test starts, in process or not (serve/threads.py keeps an explicit OMP_NUM_THREADS)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: write_tiny_checkpoint(root / arch, arch=arch, seed=0) for arch in ARCHITECTURES}


@pytest.fixture
def kernel_library(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The engine on kernel library `request.param` (indirect parametrization) for one test."""
    monkeypatch.delenv(moe_kernel.ISA_ENV, raising=False)
    monkeypatch.delenv("KUBEMOE_KERNELS", raising=False)
    monkeypatch.setenv(moe_kernel.FORCE_ENV, request.param)
    moe_kernel.load.cache_clear()
    assert moe_kernel.path() == request.param
    yield request.param
    moe_kernel.load.cache_clear()


@pytest.fixture
def spy_kernel(monkeypatch: pytest.MonkeyPatch) -> Callable[[object, str], list[bool]]:
    """`spy_kernel(module, name)` wraps `module.name`, a kernel wrapper that returns None where its kernel
    does not apply, for one test: the list it returns grows by one entry a call, whether the kernel ran."""

    def spy_on(module: object, name: str) -> list[bool]:
        real, ran = getattr(module, name), []

        def spy(*args: Any) -> Any:
            out = real(*args)
            ran.append(out is not None)
            return out

        monkeypatch.setattr(module, name, spy)
        return ran

    return spy_on


# The Qwen3-MoE checkpoint, its tokenizer and a float32 engine on it: the server and router tests' model
# (a test module may define its own `engine` or `tokenizer` instead).
@pytest.fixture(scope="module")
def qwen(checkpoints: dict[str, Path]) -> Path:
    return checkpoints["qwen3_moe"]


@pytest.fixture(scope="module")
def tokenizer(qwen: Path) -> TextTokenizer:
    return TextTokenizer.load(qwen)


@pytest.fixture(scope="module")
def engine(qwen: Path) -> TorchEngine:
    return TorchEngine.load(qwen, dtype=torch.float32)


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoBackend]:
    """A stand-in backend that echoes what it was sent (echo_backend.py), one per test module."""
    backend = EchoBackend()
    try:
        yield backend
    finally:
        backend.close()
