"""The torch engine pod's engine thread, rank S of the group: rank 0 joins and loads, then runs the
scheduler until the server stops (`lead_rank`); a headless pod's first rank follows rank 0 until it shuts the
group down (`follow_rank`). Either records a failure on the pod (pod_process.py) before re-raising it.
"""

from __future__ import annotations

import logging

from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel, shutdown_expert_parallel
from kubemoe_runtime.engines.torch.serve.app import ServerState
from kubemoe_runtime.engines.torch.serve.group import GroupLeader, follow
from kubemoe_runtime.engines.torch.serve.pod_process import PodProcess
from kubemoe_runtime.engines.torch.serve.rank_job import join_group
from kubemoe_runtime.engines.torch.serve.scheduler import Scheduler, SchedulerLimits
from kubemoe_runtime.engines.torch.serve.timeouts import FAILED_LEAVE_S, KEEPALIVE_S

log = logging.getLogger("kubemoe_runtime.serve")


def lead_rank(pod: PodProcess, state: ServerState) -> None:
    """Rank 0: join and load, then run the scheduler until the server stops."""
    s = pod.settings
    ep = ExpertParallel()
    try:
        ep, runner = join_group(pod.job, rank=0, progress=pod.progress)
        limits = SchedulerLimits(
            max_model_len=pod.job.max_model_len,
            max_num_seqs=s.max_num_seqs,
            max_waiting=s.max_waiting_requests,
            max_prefill_tokens=s.max_num_batched_tokens,
        )
        scheduler = Scheduler(
            GroupLeader(runner, ep=ep, placement_timeout_s=pod.job.timeouts.placement_load_s),
            tokenizer=state.tokenizer,
            limits=limits,
            eos_token_ids=state.eos_token_ids,
            metrics=state.metrics,
        )
        state.scheduler = scheduler
        pod.ready = True
        log.warning("kubemoe-runtime: ready on %s:%d (group of %d ranks)", s.host, s.port, ep.size)
        scheduler.run(pod.stop, keepalive_s=KEEPALIVE_S)
    except BaseException as err:  # recorded for /health and the exit code, then re-raised
        message = f"{type(err).__name__}: {err}"
        if state.failure is None:  # first: app.py refuses what is submitted after the abort below
            state.failure = message
        pod.fail(message)
        if state.scheduler is not None:
            state.scheduler.abort_all(engine_failed=True)  # their clients get an error, not an empty answer
        raise
    finally:
        # A failed group's other ranks may never come to leave (frozen, or gone): wait for them briefly.
        shutdown_expert_parallel(ep, wait_s=FAILED_LEAVE_S if pod.failure is not None else 10.0)


def follow_rank(pod: PodProcess) -> None:
    """A headless pod's first rank: follow rank 0 until it shuts the group down, then stop the server."""
    ep = ExpertParallel()
    try:
        ep, runner = join_group(pod.job, rank=pod.settings.data_parallel_start_rank, progress=pod.progress)
        runner.heartbeat.beat()  # following starts now (the load barrier may have taken long)
        pod.heartbeat = runner.heartbeat
        pod.ready = True
        follow(runner, ep=ep)
        pod.ended_by_leader = True
    except BaseException as err:  # recorded for /health and the exit code, then re-raised
        pod.fail(f"{type(err).__name__}: {err}")
        raise
    finally:
        shutdown_expert_parallel(ep)
        if pod.server is not None:
            pod.server.should_exit = True
