"""Tiny checkpoints for the runtime tests, generated once per session into a temporary directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubemoe_runtime.checkpoints import ARCHITECTURES, write_tiny_checkpoint

torch.set_num_threads(1)  # tiny models: threads only add contention on a small, busy machine


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: write_tiny_checkpoint(root / arch, arch=arch, seed=0) for arch in ARCHITECTURES}
