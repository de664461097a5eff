"""Sharded weight loading: GB/s against a plain sequential read of the same files; bytes per EP rank.

On the benchmarks' random MoE (bigmoe.py). Both reads run from a warm page cache (dropping it needs
privileges a CI box does not give), best of REPEATS:

    plain read   every shard file read front to back (16 MiB reads) into an uninitialised buffer of its
                 own, kept
    loader       load_rank_weights for EP rank 0 of 1: index, header checks, then the tensors, read()
                 into buffers the process owns (no mmap: every byte has moved when it returns)
    engine       TorchEngine.load: the loader plus the engine's layout (experts stacked, gate and up
                 fused), the time until the model can run

Then the memory the loaded model keeps: the distinct storages its tensors hold alive against those
tensors' own bytes (1.00x: no weight held twice, nor a read buffer pinned by a view of it). And, at EP =
1, 2 and 4, the bytes each rank reads (all of them: dense + its routed experts) and the routed-expert
part, against EP=1.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Final

import torch
from bigmoe import checkpoint, layout_from_env

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
from kubemoe_runtime.engines.torch.load.rank_weights import load_rank_weights, read_weight_map

REPEATS: Final = 5
CHUNK: Final = 16 << 20


def shard_files(model_dir: Path) -> list[Path]:
    return sorted({model_dir / name for name in read_weight_map(model_dir).values()})


def plain_read(files: list[Path]) -> tuple[int, float]:
    """Each file read front to back into a buffer of its own, kept (as a loader keeps its tensors)."""
    kept = []
    total = 0
    started = time.perf_counter()
    for path in files:
        buffer = torch.empty(path.stat().st_size, dtype=torch.uint8)  # not zero-filled, like the loader's
        view = buffer.numpy().data
        offset = 0
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(view[offset : offset + CHUNK]):
                offset += n
        total += offset
        kept.append(buffer)
    return total, time.perf_counter() - started


def resident_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the distinct storages the model's tensors keep alive, those tensors' own bytes); a packed
    (oneDNN) weight has no storage to look at and counts its own bytes on both sides."""
    storages: dict[object, int] = {}
    own: dict[object, int] = {}
    for module in model.modules():
        for t in [*module._parameters.values(), *module._buffers.values(), *vars(module).values()]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            nbytes = t.numel() * t.element_size()
            if t.is_mkldnn:
                storages[id(t)] = own[id(t)] = nbytes
            else:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                own[(t.data_ptr(), nbytes)] = nbytes
    return sum(storages.values()), sum(own.values())


def main() -> None:
    model_dir = checkpoint(layout_from_env())
    cfg = ModelConfig.load(model_dir)
    files = shard_files(model_dir)
    plain_read(files)  # warm the page cache
    # Interleaved, best of REPEATS each, so the allocator and page cache treat all three alike.
    plain_s = loader_s = engine_s = float("inf")
    plain_bytes = loader_bytes = 0
    for _ in range(REPEATS):
        plain_bytes, seconds = plain_read(files)
        plain_s = min(plain_s, seconds)
        started = time.perf_counter()
        tensors, report = load_rank_weights(model_dir, cfg=cfg, ep_rank=0, ep_size=1)
        loader_s = min(loader_s, time.perf_counter() - started)
        loader_bytes = report.bytes_read
        del tensors
        started = time.perf_counter()
        engine = TorchEngine.load(model_dir, dtype=getattr(torch, cfg.dtype))
        engine_s = min(engine_s, time.perf_counter() - started)
        del engine
    plain_gbs = plain_bytes / plain_s / 1e9
    loader_gbs = loader_bytes / loader_s / 1e9
    print(f"# {model_dir.name}: {len(files)} shards, {plain_bytes / 1e9:.2f} GB on disk (warm page cache)")
    print(f"plain sequential read        {plain_gbs:7.2f} GB/s  (read() into a buffer: every byte copied)")
    print(f"load_rank_weights            {loader_gbs:7.2f} GB/s  {loader_gbs / plain_gbs:.2f}x plain read")
    engine_gbs = loader_bytes / engine_s / 1e9
    print(f"TorchEngine.load             {engine_gbs:7.2f} GB/s  {engine_gbs / plain_gbs:.2f}x plain read")
    resident, own = resident_bytes(TorchEngine.load(model_dir, dtype=getattr(torch, cfg.dtype)).model)
    print(
        f"resident after the load      {resident / own:7.3f}x the tensors' own {own:,} bytes ({resident:,})"
    )

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
