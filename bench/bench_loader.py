"""Sharded weight loading: GB/s against a plain sequential read of the same files; bytes per EP rank.

On the benchmarks' random MoE (bigmoe.py). Both reads run from a warm page cache (dropping it needs
privileges a CI box does not give), best of REPEATS:

    plain read   every shard file read front to back (16 MiB reads) into a buffer of its own, kept
    loader       load_rank_weights for EP rank 0 of 1: index, header checks, then each tensor; once as
                 returned (safetensors may hand back tensors whose pages are not all touched yet), and
                 once with every tensor copied, which like read() moves every byte

Then, at EP = 1, 2 and 4, the bytes each rank reads (all of them: dense + its routed experts) and
the routed-expert part, against EP=1.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Final

from bigmoe import checkpoint, layout_from_env

from kubemoe_runtime.model_config import ModelConfig
from kubemoe_runtime.weights import load_rank_weights, read_weight_map

REPEATS: Final = 3
CHUNK: Final = 16 << 20


def shard_files(model_dir: Path) -> list[Path]:
    return sorted({model_dir / name for name in read_weight_map(model_dir).values()})


def plain_read(files: list[Path]) -> tuple[int, float]:
    """Each file read front to back into a buffer of its own, kept (as a loader keeps its tensors)."""
    kept = []
    total = 0
    started = time.perf_counter()
    for path in files:
        buffer = bytearray(path.stat().st_size)
        view = memoryview(buffer)
        offset = 0
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(view[offset : offset + CHUNK]):
                offset += n
        total += offset
        kept.append(buffer)
    return total, time.perf_counter() - started


def main() -> None:
    model_dir = checkpoint(layout_from_env())
    cfg = ModelConfig.load(model_dir)
    files = shard_files(model_dir)
    plain_read(files)  # warm the page cache
    plain_bytes, plain_s = min((plain_read(files) for _ in range(REPEATS)), key=lambda r: r[1])

    loader_s = owned_s = float("inf")
    loader_bytes = 0
    for _ in range(REPEATS):
        started = time.perf_counter()
        tensors, report = load_rank_weights(model_dir, cfg=cfg, ep_rank=0, ep_size=1)
        loaded = time.perf_counter()
        owned = [t.clone() for t in tensors.values()]  # every byte copied into memory the process owns
        done = time.perf_counter()
        del tensors, owned
        loader_s, owned_s = min(loader_s, loaded - started), min(owned_s, done - started)
        loader_bytes = report.bytes_read
    plain_gbs = plain_bytes / plain_s / 1e9
    loader_gbs, owned_gbs = loader_bytes / loader_s / 1e9, loader_bytes / owned_s / 1e9
    print(f"# {model_dir.name}: {len(files)} shards, {plain_bytes / 1e9:.2f} GB on disk (warm page cache)")
    print(f"plain sequential read        {plain_gbs:7.2f} GB/s  (read() into a buffer: every byte copied)")
    print(f"loader, tensors as returned  {loader_gbs:7.2f} GB/s  {loader_gbs / plain_gbs:.2f}x plain read")
    print(f"loader + copy of every byte  {owned_gbs:7.2f} GB/s  {owned_gbs / plain_gbs:.2f}x plain read")

    base = 0
    print(f"{'EP':>3} {'rank':>5} {'bytes read':>14} {'routed experts':>15} {'vs EP=1':>8}")
    for size in (1, 2, 4):
        for rank in range(size):
            _, report = load_rank_weights(model_dir, cfg=cfg, ep_rank=rank, ep_size=size)
            base = base or report.bytes_read
            print(
                f"{size:>3} {rank:>5} {report.bytes_read:>14,} {report.routed_expert_bytes:>15,} "
                f"{report.bytes_read / base:>7.2f}x"
            )


if __name__ == "__main__":
    main()
