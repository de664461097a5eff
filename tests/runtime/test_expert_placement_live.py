"""Replication and placement change no result: a live rebalance at EP=2 and EP=4, three architectures.

Each rank is a process (gloo), as in test_torch_engine.py. Per architecture every rank loads the model twice:
under the default placement without redundant slots (the reference), and with R redundant slots (one copy
more a rank). Both are then rebalanced live — TorchEngine.stage_placement (each rank reads the experts
new to it from the checkpoint) and apply_placement, before the same forward on every rank — to a placement
that moves every expert to another slot, the redundant one copying the experts the prompt routes most to,
on other ranks than their first copy, so their tokens are split between ranks.

What must hold, against the reference: greedy tokens identical; float32 logits within ATOL = 1e-5
absolute, not bitwise. Why not bitwise: an expert's tokens split between two copies run as two smaller
matmuls, and a rank's matmuls may take the batched form instead of the looped one (it depends on how many
of its slots were picked); a matmul's summation order (its blocking) depends on its shape, so a row's
result can differ in the last bits. The combine itself adds the same K = 2 partial sums whatever rank holds
them (a + b == b + a, and + 0 is exact). Measured here: 0 (bitwise equal) for every placement without
copies, up to 8.3e-7 with copies, on logits of magnitude about 3, a few float32 ulps; ATOL leaves more
than ten times that.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest
import torch

from kubemoe_runtime.engines.torch import TorchEngine, init_expert_parallel
from kubemoe_runtime.engines.torch.model.engine import moe_layer_indexes
from kubemoe_runtime.engines.torch.model.parallel import leave_process, shutdown_expert_parallel
from kubemoe_runtime.engines.torch.model.placement import Placement, default_placement
from kubemoe_runtime.pod.ports import free_port
from kubemoe_runtime.tools.checkpoints import ARCHITECTURES

PROMPT = [3, 17, 92, 5, 41, 8, 66, 120, 7]
SHORT_PROMPT = [11, 4, 250]
NEW_TOKENS = 8
ATOL = 1e-5  # float32 logits: see the module docstring


def rebalanced(
    load: list[list[int]], *, n_experts: int, ranks: int, redundant: int, layers: tuple[int, ...]
) -> Placement:
    """Every expert moved (the blocks reversed); each redundant slot a copy of one of the most loaded
    experts, on a rank that does not hold it yet."""
    per_rank = (n_experts + redundant) // ranks
    block = n_experts // ranks
    slots = []
    for tokens in load:
        order = list(reversed(range(n_experts)))
        held = [order[r * block : (r + 1) * block] for r in range(ranks)]
        hottest = sorted(range(n_experts), key=lambda e: (-tokens[e], e))[:redundant]
        for e in hottest:
            free = [r for r in range(ranks) if len(held[r]) < per_rank]
            fresh = [r for r in free if e not in held[r]]
            held[(fresh or free)[0]].append(e)
        slots.append(tuple(e for rank in held for e in rank))
    return Placement(
        generation=1, n_experts=n_experts, rank_sizes=(per_rank,) * ranks, layers=layers, slots=tuple(slots)
    )


def outputs(engine: TorchEngine, rank: int) -> dict[str, Any]:
    return {
        "logits": engine.logits(PROMPT),
        # ranks may hold different tokens: rank 1 runs a one-token batch while the others run PROMPT
        "uneven": engine.logits(PROMPT if rank != 1 else PROMPT[:1]),
        "greedy": engine.generate_greedy([PROMPT, SHORT_PROMPT], max_new_tokens=NEW_TOKENS),
    }


def _worker(rank: int, size: int, port: int, paths: dict[str, Path], out_dir: Path) -> None:
    torch.set_num_threads(1)
    ep = init_expert_parallel(rank=rank, size=size, port=port)
    try:
        results: dict[str, Any] = {}
        for arch, path in paths.items():
            reference = TorchEngine.load(path, dtype=torch.float32, ep=ep)
            before = outputs(reference, rank)
            load = reference.expert_load.window().tokens  # the whole group's routing: the same on every rank
            cfg, layers = reference.cfg, reference.placement.layers
            assert layers == tuple(moe_layer_indexes(cfg))
            E = cfg.n_routed_experts
            plain = rebalanced(load, n_experts=E, ranks=size, redundant=0, layers=layers)
            copies = rebalanced(load, n_experts=E, ranks=size, redundant=size, layers=layers)
            reference.apply_placement(reference.stage_placement(plain))
            moved = outputs(reference, rank)
            redundant = TorchEngine.load(
                path,
                dtype=torch.float32,
                ep=ep,
                placement=default_placement(n_experts=E, ranks=size, layers=layers, redundant=size),
            )
            with_copies = outputs(redundant, rank)
            staged = redundant.stage_placement(copies)
            redundant.apply_placement(staged)
            rebalanced_copies = outputs(redundant, rank)
            results[arch] = {
                "before": before,
                "moved": moved,
                "with_copies": with_copies,
                "rebalanced": rebalanced_copies,
                "load": load,
                "copies": copies,
                "slots": [tuple(block.experts.experts) for _, block in redundant.moe_layers()],
                "fresh_bytes": staged.fresh_bytes,
            }
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        shutdown_expert_parallel(ep)
    leave_process(0)


@pytest.mark.slow
@pytest.mark.parametrize("size", [2, 4])
def test_a_live_rebalance_changes_no_result(size: int, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, size, port, checkpoints, tmp_path)) for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0] * size
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(size)]
    for arch in ARCHITECTURES:
        copies: Placement = ranks[0][arch]["copies"]
        for rank, result in enumerate(ranks):
            assert result[arch]["slots"] == [copies.rank_slots(i, rank) for i in range(len(copies.layers))]
            assert result[arch]["fresh_bytes"] > 0  # it read the experts new to it from the checkpoint
        # The copies are exercised: in some layer an expert with a copy on each of two ranks got at least
        # two of the prompt's (token, choice) pairs, so both copies computed some.
        load = ranks[0][arch]["load"]
        split = [
            e
            for i, tokens in enumerate(load)
            for e in range(copies.n_experts)
            if copies.copies(i)[e] > 1
            and tokens[e] >= 2
            and len({r for r in range(size) if e in copies.rank_slots(i, r)}) > 1
        ]
        assert split, f"{arch}: no replicated expert on two ranks got two tokens; the test proves nothing"
        for rank, result in enumerate(ranks):
            before = result[arch]["before"]
            for case in ("moved", "with_copies", "rebalanced"):
                after = result[arch][case]
                assert after["greedy"] == before["greedy"], f"{arch} EP={size} rank {rank} {case}"
                for key in ("logits", "uneven"):
                    diff = (after[key] - before[key]).abs().max().item()
                    print(f"{arch} EP={size} rank {rank} {case} {key}: max |logit diff| = {diff:.3g}")
                    assert diff <= ATOL, f"{arch} EP={size} rank {rank} {case} {key}: {diff}"
