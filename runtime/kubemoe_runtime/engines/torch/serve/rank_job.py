"""A torch-engine rank's job and how it joins its group: what a rank needs (`RankJob`: picklable for the
pod's child processes), joining the group and loading this rank's share (`join_group`: under
GROUP_TIMEOUT, then the serving timeout for every collective, timeouts.py), and a child process's life as
one follower rank (`run_rank_process`).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from torch.distributed.distributed_c10d import _set_pg_timeout

from kubemoe_runtime.engines.torch.load.load_progress import LoadProgress
from kubemoe_runtime.engines.torch.model.engine import DTYPES, TorchEngine
from kubemoe_runtime.engines.torch.model.parallel import (
    ExpertParallel,
    init_expert_parallel,
    leave_process,
    shutdown_expert_parallel,
)
from kubemoe_runtime.engines.torch.model.placement import Placement
from kubemoe_runtime.engines.torch.serve.group import RankRunner, follow
from kubemoe_runtime.engines.torch.serve.threads import set_rank_threads
from kubemoe_runtime.engines.torch.serve.timeouts import GROUP_TIMEOUT, Timeouts


@dataclass(frozen=True)
class RankJob:
    """Everything a rank needs to join its group and load its share (picklable for child processes)."""

    model: Path
    dtype: str
    size: int
    address: str
    port: int
    max_model_len: int
    max_num_seqs: int
    placement: Placement | None = None  # the expert placement to start with (read by the API pod)
    local_ranks: int = 1  # ranks in this pod: they share its CPU budget (threads.py)
    timeouts: Timeouts = Timeouts()  # noqa: RUF009  # frozen (timeouts.py): one shared default is safe


def join_group(
    job: RankJob, *, rank: int, progress: LoadProgress | None = None
) -> tuple[ExpertParallel, RankRunner]:
    """Join the group, load this rank's weights (counted in `progress`: the pod's /ready shows it), and
    wait until every rank has loaded (all under GROUP_TIMEOUT), then set the serving timeout for every
    collective after. Every rank loads rank 0's placement (broadcast here): the pods of a group may see
    different versions of the placement file (a ConfigMap reaches each node in its own time), and a group
    must run one placement."""
    set_rank_threads(job.local_ranks)
    ep = init_expert_parallel(
        rank=rank, size=job.size, address=job.address, port=job.port, timeout=GROUP_TIMEOUT
    )
    placement = job.placement
    if ep.size > 1:
        box: list[Placement | None] = [placement if ep.rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        placement = box[0]
    engine = TorchEngine.load(
        job.model, dtype=DTYPES[job.dtype], ep=ep, placement=placement, progress=progress
    )
    runner = RankRunner(
        engine, slots=job.max_num_seqs, max_len=job.max_model_len, local_ranks=job.local_ranks
    )
    runner.heartbeat.watch(engine)  # a beat a decoder layer: a long step is progress too
    if ep.size > 1:
        torch.distributed.barrier()
        # From here on a silent rank fails the group within the serving timeout, not GROUP_TIMEOUT.
        _set_pg_timeout(timedelta(seconds=job.timeouts.collective_s))
    return ep, runner


def run_rank_process(job: RankJob, rank: int) -> None:
    """A child process's life: one follower rank (its load logs its own progress)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pod's main process decides when the group ends
    ep, runner = join_group(job, rank=rank, progress=LoadProgress(label=f"rank {rank}"))
    try:
        follow(runner, ep=ep)
    finally:
        shutdown_expert_parallel(ep)
    leave_process(0)
