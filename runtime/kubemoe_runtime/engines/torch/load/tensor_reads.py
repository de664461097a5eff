"""Reading checked tensors out of one safetensors shard (`read_tensors`), cancellably.

The shard's header gives each tensor's byte range, so the loader reads them itself (no mmap): per shard,
the selected tensors in file order, each with readinto() into memory of its own. Memory is touched once,
as a plain read() of those bytes touches it. A caller may give destinations (`into`): a tensor with one
is read straight into it, e.g. into its slice of the engine's stacked experts or fused q/k/v weight, so
those bytes are never copied again. A tensor without one gets a buffer of exactly its bytes, never a view
of a buffer shared with its neighbours: a kept tensor (a norm, a router) would otherwise keep the whole
buffer alive, with the bytes of every tensor the engine copied elsewhere (fused, packed, converted).

Reads are of at most READ_CHUNK bytes; each counts in a `LoadProgress` (load_progress.py), and a caller
may cancel between them (`cancelled`: `LoadCancelled`, as `stop_if_cancelled` raises it), so an abandoned
load stops early instead of reading on. The spans read were checked against the header first
(rank_weights.py), so a read never leaves a tensor's own bytes; a failed or short read is a
`WeightLoadError` naming the shard file and the tensor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

import torch

from kubemoe_runtime.engines.torch.load.checkpoint_files import (
    CheckpointFileError,
    TensorInfo,
    WeightLoadError,
    open_regular_file,
)
from kubemoe_runtime.engines.torch.load.load_progress import LoadProgress

READ_CHUNK: Final = 16 << 20  # bytes per readinto() call

# safetensors dtype tags -> torch dtypes (only those a checkpoint we serve may hold).
SAFETENSORS_DTYPES: Final[dict[str, torch.dtype]] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class LoadCancelled(Exception):
    """A load stopped because its caller's `cancelled()` became true (load_expert_tensors)."""


def stop_if_cancelled(cancelled: Callable[[], bool] | None) -> None:
    """LoadCancelled once `cancelled()` is true."""
    if cancelled is not None and cancelled():
        raise LoadCancelled


def _fits(dest: torch.Tensor | None, info: TensorInfo) -> bool:
    return (
        dest is not None
        and dest.device.type == "cpu"
        and dest.is_contiguous()
        and dest.dtype == SAFETENSORS_DTYPES[info.dtype]
        and tuple(dest.shape) == info.shape
    )


def read_tensors(
    path: Path,
    wanted: list[tuple[str, TensorInfo]],
    *,
    into: Mapping[str, torch.Tensor] | None = None,
    progress: LoadProgress | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Read tensors from one shard, in file order: a tensor with a destination in `into` straight into
    it, each other one into a buffer of its own. Each readinto() counts in `progress`; LoadCancelled once
    `cancelled()`, checked before each readinto()."""
    into = into or {}
    tensors: dict[str, torch.Tensor] = {}
    in_order = sorted(wanted, key=lambda item: item[1].begin)
    reading = in_order[0][0] if in_order else "<none>"  # the tensor an OSError is reported against
    try:
        with os.fdopen(open_regular_file(path), "rb", buffering=0) as f:
            for name, info in in_order:
                reading = name
                dest = into.get(name)
                if not _fits(dest, info):
                    dest = None
                buffer = (
                    torch.empty(info.nbytes, dtype=torch.uint8)
                    if dest is None
                    else dest.view(-1).view(torch.uint8)
                )
                view = buffer.numpy().data  # a memoryview of the tensor's bytes
                f.seek(info.begin)
                got = 0
                while got < len(view):
                    stop_if_cancelled(cancelled)
                    if not (n := f.readinto(view[got : got + READ_CHUNK])):
                        break
                    got += n
                    if progress is not None:
                        progress.advance(n)
                if got < info.nbytes:
                    raise WeightLoadError(f"{path}: truncated while reading tensor {name!r}")
                tensors[name] = _typed(buffer, info) if dest is None else dest
    except CheckpointFileError as err:  # names the file
        raise WeightLoadError(f"{err}; needed for tensor {reading!r}") from err
    except OSError as err:
        raise WeightLoadError(f"{path}: cannot read tensor {reading!r}: {err}") from err
    return tensors


def _typed(raw: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """A buffer of its own (offset 0, so aligned to any dtype) as the tensor its bytes hold."""
    return raw.view(SAFETENSORS_DTYPES[info.dtype]).view(info.shape)
