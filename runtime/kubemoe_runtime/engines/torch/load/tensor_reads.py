"""Reading checked tensors out of one safetensors shard (`read_tensors`), cancellably.

The shard's header gives each tensor's byte range, so the loader reads them itself (no mmap): per shard,
the selected tensors in file order, each run of adjacent ones with one readinto() into one buffer the
tensors are views of. Memory is touched once, as a plain read() of those bytes touches it; at EP=1 a
shard is one read, and at EP=N a rank's experts are one read per contiguous block. A caller may give
destinations (`into`): a tensor with one is read straight into it, e.g. into its slice of the engine's
stacked experts, so those bytes are never copied again.

Reads are of at most READ_CHUNK bytes; each counts in a `LoadProgress` (load_progress.py), and a caller
may cancel between them (`cancelled`: `LoadCancelled`, as `stop_if_cancelled` raises it), so an abandoned
load stops early instead of reading on. The spans read were checked against the header first
(rank_weights.py), so a read never leaves a tensor's own bytes; a failed or short read is a
`WeightLoadError` naming the shard file and the tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

import torch

from kubemoe_runtime.engines.torch.load.checkpoint_files import TensorInfo, WeightLoadError
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
    it; each run of adjacent others into one buffer they are views of. Each readinto() counts in
    `progress`; LoadCancelled once `cancelled()`, checked before each readinto()."""
    into = into or {}
    runs: list[list[tuple[str, TensorInfo]]] = []  # a placed tensor is a run of its own
    placed = {name for name, info in wanted if _fits(into.get(name), info)}
    for item in sorted(wanted, key=lambda item: item[1].begin):
        joins = runs and runs[-1][-1][1].end == item[1].begin and runs[-1][-1][0] not in placed
        if joins and item[0] not in placed:
            runs[-1].append(item)
        else:
            runs.append([item])
    tensors: dict[str, torch.Tensor] = {}
    reading = runs[0][0][0] if runs else "<none>"  # the tensor an OSError is reported against
    try:
        with path.open("rb", buffering=0) as f:
            for run in runs:
                reading = run[0][0]
                begin, end = run[0][1].begin, run[-1][1].end
                if reading in placed:
                    buffer = into[reading].view(-1).view(torch.uint8)
                else:
                    buffer = torch.empty(end - begin, dtype=torch.uint8)
                view = buffer.numpy().data  # a memoryview of the tensor's bytes
                f.seek(begin)
                got = 0
                while got < len(view):
                    stop_if_cancelled(cancelled)
                    if not (n := f.readinto(view[got : got + READ_CHUNK])):
                        break
                    got += n
                    if progress is not None:
                        progress.advance(n)
                for name, info in run:
                    if info.end - begin > got:
                        raise WeightLoadError(f"{path}: truncated while reading tensor {name!r}")
                    if name in placed:
                        tensors[name] = into[name]
                    else:
                        tensors[name] = _typed(buffer[info.begin - begin : info.end - begin], info)
    except OSError as err:
        raise WeightLoadError(f"{path}: cannot read tensor {reading!r}: {err}") from err
    return tensors


def _typed(raw: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """Bytes as the tensor they hold (a view; a copy only when the bytes are not aligned to the dtype)."""
    dtype = SAFETENSORS_DTYPES[info.dtype]
    if raw.storage_offset() % dtype.itemsize:
        raw = raw.clone()
    return raw.view(dtype).view(info.shape)
