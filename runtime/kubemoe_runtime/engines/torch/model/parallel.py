"""Expert parallelism: which rank computes which expert, and how tokens reach it and come back.

Scheme (all-gather dispatch, all-reduce combine), for EP size P:

    rank r holds N_r tokens x_ND (its own requests; ranks may hold different tokens or none)
    1. route      each rank routes its own tokens: ids_NK, w_NK            (router weights are replicated)
    2. dispatch   all_gather the token counts, pad every rank's rows to N_max and all_gather
                  x, ids and w (packed byte-wise into one tensor, one collective):
                  x_MD with M = P * N_max (rank q's rows at [q*N_max, q*N_max + N_q));
                  padding rows carry expert id -1, which no expert matches
    3. experts    each rank runs only the experts of its slots (a contiguous id block by default; any
                  placement, with copies, moe.py and placement.py) over all M rows, accumulating a
                  partial output y_MD (zero where none of its slots computes a row's choice)
    4. combine    all_reduce(SUM) y_MD over the group — every rank now has every row's full expert sum —
                  and each rank keeps its own rows [r*N_max, r*N_max + N_r)
                  (on NCCL a reduce_scatter over the same padded layout moves 1/P of the bytes; gloo on
                  CPU lacks it, so one collective serves both)

Attention, norms, the router and shared experts are replicated on every rank; only routed experts are
split, so each rank holds 1/P of the routed-expert bytes. With P == 1 every collective is skipped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from kubemoe_runtime.engines.torch.load.rank_weights import expert_range


@dataclass(frozen=True)
class ExpertParallel:
    """This process's place in the expert-parallel group. `size == 1` means no collectives at all."""

    rank: int = 0
    size: int = 1

    def experts(self, n_experts: int) -> range:
        """The contiguous block of routed-expert ids this rank owns in the default placement."""
        return expert_range(n_experts=n_experts, ep_rank=self.rank, ep_size=self.size)

    def dispatch(
        self, x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Gather every rank's tokens (stage 2). Returns x_MD, ids_MK, w_MK and the padded rows per rank."""
        n = x_ND.shape[0]
        if self.size == 1:
            return x_ND, ids_NK, w_NK, n
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(counts, torch.tensor([n], dtype=torch.int64))
        n_max = int(torch.cat(counts).max())
        if n_max == 0:  # nobody has tokens: nothing to gather
            return x_ND, ids_NK, w_NK, 0
        pad = n_max - n
        x_pad = torch.nn.functional.pad(x_ND, (0, 0, 0, pad))
        ids_pad = torch.nn.functional.pad(ids_NK, (0, 0, 0, pad), value=-1)
        w_pad = torch.nn.functional.pad(w_NK, (0, 0, 0, pad))
        # One collective for all three: each row's bytes side by side, split again after the gather.
        fields = (x_pad, ids_pad, w_pad)
        packed = torch.cat([t.contiguous().view(torch.uint8).view(n_max, -1) for t in fields], dim=1)
        parts = [torch.empty_like(packed) for _ in range(self.size)]
        dist.all_gather(parts, packed)
        gathered = torch.cat(parts)
        widths = [t.element_size() * t.shape[1] for t in fields]
        x_MD, ids_MK, w_MK = (
            chunk.contiguous().view(t.dtype).view(-1, t.shape[1])
            for chunk, t in zip(torch.split(gathered, widths, dim=1), fields, strict=True)
        )
        return x_MD, ids_MK, w_MK, n_max

    def combine(self, y_MD: torch.Tensor, *, rows_per_rank: int, n_local: int) -> torch.Tensor:
        """Sum the ranks' partial expert outputs and keep this rank's rows (stage 4)."""
        if self.size == 1:
            return y_MD
        dist.all_reduce(y_MD, op=dist.ReduceOp.SUM)
        start = self.rank * rows_per_rank
        return y_MD[start : start + n_local]


def init_expert_parallel(
    *,
    rank: int,
    size: int,
    address: str = "127.0.0.1",
    port: int,
    backend: str = "gloo",
    timeout: timedelta = timedelta(seconds=120),
) -> ExpertParallel:
    """Join (or, for size 1, skip) the default process group and return this rank's `ExpertParallel`."""
    if size == 1:
        return ExpertParallel()
    if address == "127.0.0.1" and backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a container's hostname may not resolve
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=size,
        timeout=timeout,
    )
    return ExpertParallel(rank=rank, size=size)


def shutdown_expert_parallel(ep: ExpertParallel, *, wait_s: float = 10.0) -> None:
    """Leave the process group, once every rank is leaving too (waiting at most `wait_s`, so a rank
    that died holds the others no longer): rank 0 hosts the TCPStore, and a rank 0 that exited while
    another rank was still connected aborted ("terminate called without an active exception", about
    1 in 5 EP=2 runs on a loaded machine)."""
    if ep.size > 1 and dist.is_initialized():
        with contextlib.suppress(RuntimeError):  # a rank that died or hung: leave anyway
            dist.monitored_barrier(timeout=timedelta(seconds=wait_s))
        dist.destroy_process_group()


def leave_process(code: int) -> None:
    """End a process that was in a process group, skipping interpreter teardown. Once the group is
    destroyed, gloo's and the TCP store's C++ threads may still be winding down, and their destructors
    at exit can abort the process ("terminate called without an active exception", exit -6) after its
    work is done and reported: seen in 1 of ~20 loaded CI runs of `generate` with two ranks."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
