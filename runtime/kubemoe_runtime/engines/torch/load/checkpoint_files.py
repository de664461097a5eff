"""A checkpoint's files, read as untrusted input: the index's shard names and each shard's header.

A checkpoint comes from wherever the user points (a Hub repo, a claim, a bucket), so nothing in it is
trusted. Shard names in `model.safetensors.index.json` must stay inside the checkpoint folder (no
absolute paths, no `..`, no symlink to elsewhere; a Hugging Face cache snapshot's links into its own
`blobs/` are the one exception). The small JSON files (the index, config.json, generation_config.json)
are read the same way by `read_checkpoint_file`: a regular file inside the folder, at most a given number
of bytes counted as they are read (a link to `/dev/zero` reports a size of 0).

A safetensors header is an 8-byte little-endian length, at most `MAX_HEADER_BYTES`, then a JSON object:
tensor name -> {dtype, shape, data_offsets}, plus an optional `__metadata__` object. Each tensor's span
must lie in the file, be exactly dtype x shape bytes, and not overlap another's. Every failure is a
`WeightLoadError` naming the file and the tensor.
"""

from __future__ import annotations

import itertools
import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

INDEX_FILE: Final = "model.safetensors.index.json"
MAX_HEADER_BYTES: Final = 100_000_000  # safetensors' own limit
MAX_INDEX_BYTES: Final = 100_000_000  # DeepSeek-V3's index, the largest we know, is about 9 MB

# Bits per element of every safetensors dtype tag; a tag outside this list is a corrupt header.
DTYPE_BITS: Final[dict[str, int]] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


class WeightLoadError(RuntimeError):
    """A checkpoint cannot be loaded; the message names the shard file and the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors tag, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class CheckpointFileError(ValueError):
    """A checkpoint's file is refused (outside the folder, not a regular file, too big)."""


def open_regular_file(path: Path) -> int:
    """A read-only descriptor of `path`, a regular file (CheckpointFileError naming it otherwise): opened
    with O_NONBLOCK, so that opening a FIFO does not wait for a writer (fstat refuses it next), as it
    refuses a device or a folder. Reads of a regular file ignore O_NONBLOCK. OSError where it cannot be
    opened (FileNotFoundError where there is no such file)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointFileError(f"{path}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _allowed_roots(root: Path) -> tuple[Path, ...]:
    """Where a shard may resolve to: the folder, and for a Hugging Face cache snapshot
    (`.../snapshots/REV`, whose files are links to `../../blobs/SHA`) that cache's blobs."""
    real = root.resolve()
    if real.parent.name == "snapshots":
        return real, real.parent.parent / "blobs"
    return (real,)


def shard_path(root: Path, name: str, *, tensor: str, listed_in: Path) -> Path:
    """`root / name`, checked to stay inside `root` (`listed_in`: the file that named it)."""
    fix = f"shard names must be files inside {root}"
    pure = PurePosixPath(name)
    if not name or "\0" in name or pure.is_absolute() or ".." in pure.parts:
        raise WeightLoadError(
            f"{listed_in}: tensor {tensor!r} is in {name!r}, outside the checkpoint folder; {fix}"
        )
    path = root / name
    try:
        real = path.resolve()
        roots = _allowed_roots(root)
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise WeightLoadError(f"{listed_in}: tensor {tensor!r}: cannot resolve {name!r} ({err})") from err
    if not any(real.is_relative_to(r) for r in roots):
        raise WeightLoadError(
            f"{listed_in}: tensor {tensor!r} is in {name!r}, a link to {real} outside the checkpoint "
            f"folder; {fix}"
        )
    return path


def read_checkpoint_file(root: Path, name: str, *, limit: int) -> bytes:
    """The bytes of `root / name`: a regular file that resolves inside the checkpoint folder (or, for a
    Hugging Face cache snapshot, its blobs), of at most `limit` bytes. The size is counted while reading
    (at most limit + 1 bytes), never taken from stat: a device or a /proc file reports 0.

    FileNotFoundError where there is no such file (a dangling link included); CheckpointFileError (naming
    the file) where it is refused; OSError where it cannot be read."""
    path = root / name
    try:
        real = path.resolve(strict=True)
        roots = _allowed_roots(root)
    except RuntimeError as err:  # a symlink loop
        raise CheckpointFileError(f"{path}: cannot resolve it ({err})") from err
    if not any(real.is_relative_to(r) for r in roots):
        raise CheckpointFileError(
            f"{path}: a link to {real}, outside the checkpoint folder {root}; it must be a file in the folder"
        )
    fd = open_regular_file(real)
    try:
        chunks, size = [], 0
        while size <= limit and (chunk := os.read(fd, min(1 << 20, limit + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise CheckpointFileError(f"{path}: over the {limit}-byte limit for this file")
    return b"".join(chunks)


def read_index(root: Path) -> dict[str, str]:
    """The index's weight_map (tensor name -> shard name), every shard name checked by `shard_path`."""
    index = root / INDEX_FILE
    try:
        raw = read_checkpoint_file(root, INDEX_FILE, limit=MAX_INDEX_BYTES)
    except CheckpointFileError as err:  # names the file
        raise WeightLoadError(str(err)) from err
    except OSError as err:
        raise WeightLoadError(f"{index}: cannot read it ({err})") from err
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as err:  # ValueError: bad JSON, bad UTF-8
        raise WeightLoadError(f"{index}: not a valid safetensors index ({err})") from err
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightLoadError(
            f"{index}: not a valid safetensors index (needs a weight_map object of tensor name -> "
            "shard file name)"
        )
    first_tensor: dict[str, str] = {}
    for tensor, shard in weight_map.items():
        first_tensor.setdefault(shard, tensor)
    for shard, tensor in first_tensor.items():
        shard_path(root, shard, tensor=tensor, listed_in=index)
    return dict(weight_map)


def read_header(path: Path, *, needed: str = "<any>") -> dict[str, TensorInfo]:
    """A shard's tensors, every entry checked against the file (`needed`: the tensor errors name)."""
    try:
        with os.fdopen(open_regular_file(path), "rb") as f:  # a FIFO is refused, not waited on
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise WeightLoadError(f"{path}: truncated (no header); needed for tensor {needed!r}")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise WeightLoadError(
                    f"{path}: corrupt header: it claims {header_len} bytes, over the "
                    f"{MAX_HEADER_BYTES}-byte limit; needed for tensor {needed!r}"
                )
            if 8 + header_len > file_size:
                raise WeightLoadError(f"{path}: truncated inside its header; needed for tensor {needed!r}")
            raw = f.read(header_len)
    except FileNotFoundError as err:
        raise WeightLoadError(
            f"{path}: shard file is missing; the index lists tensor {needed!r} in it"
        ) from err
    except CheckpointFileError as err:  # names the file
        raise WeightLoadError(f"{err}; needed for tensor {needed!r}") from err
    except OSError as err:
        raise WeightLoadError(f"{path}: cannot read it ({err}); needed for tensor {needed!r}") from err
    if len(raw) < header_len:
        raise WeightLoadError(f"{path}: truncated inside its header; needed for tensor {needed!r}")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as err:  # ValueError: bad JSON, bad UTF-8, huge numbers
        raise WeightLoadError(f"{path}: corrupt header ({err}); needed for tensor {needed!r}") from err
    if not isinstance(header, dict):
        raise WeightLoadError(
            f"{path}: corrupt header (a JSON {type(header).__name__}, not an object); "
            f"needed for tensor {needed!r}"
        )
    data_start = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise WeightLoadError(f"{path}: corrupt header (__metadata__ is not an object)")
            continue
        infos[name] = _tensor_info(path, name, entry, data_start=data_start, file_size=file_size)
    _check_no_overlap(path, infos)
    return infos


def _tensor_info(path: Path, name: str, entry: Any, *, data_start: int, file_size: int) -> TensorInfo:
    def corrupt(what: str) -> WeightLoadError:
        return WeightLoadError(f"{path}: corrupt header entry for tensor {name!r}: {what}")

    if not isinstance(entry, dict):
        raise corrupt(f"a JSON {type(entry).__name__}, not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise corrupt(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise corrupt(f"shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
        raise corrupt(f"data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise corrupt(f"data_offsets {offsets!r} do not satisfy 0 <= begin <= end")
    if data_start + end > file_size:
        raise WeightLoadError(
            f"{path}: truncated: tensor {name!r} needs bytes up to {data_start + end} "
            f"but the file has {file_size}"
        )
    span = end - begin
    needs = _span_bits(shape, DTYPE_BITS[dtype], limit=8 * file_size)
    if needs is None or needs != 8 * span:
        need = "more than the file holds" if needs is None else f"{needs / 8:g}"
        raise WeightLoadError(f"{path}: tensor {name!r} spans {span} bytes but {dtype} {shape} needs {need}")
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=data_start + begin, end=data_start + end)


def _span_bits(shape: list[int], bits: int, *, limit: int) -> int | None:
    """Bits a tensor of `shape` holds; None once the product passes `limit` (no huge products)."""
    if 0 in shape:
        return 0
    total = bits
    for n in shape:
        total *= n
        if total > limit:
            return None
    return total


def _check_no_overlap(path: Path, infos: dict[str, TensorInfo]) -> None:
    spans = sorted((info.begin, info.end, name) for name, info in infos.items() if info.end > info.begin)
    for (_, prev_end, prev), (begin, _, name) in itertools.pairwise(spans):
        if begin < prev_end:
            raise WeightLoadError(f"{path}: corrupt header: tensor {name!r} overlaps tensor {prev!r}")
