"""The torch engine's pod: its ranks, its engine thread and its HTTP server, and how they end.

A pod runs ranks S .. S+L-1 of an expert-parallel group of N: rank S on an engine thread of this process,
the others as child processes. Every rank joins the group through the TCP store at A:R (rank 0 hosts it;
without R a single-pod group picks a free port). The pod holding rank 0 serves the OpenAI API and drives
the group (group.py); `--headless` pods serve /health and /ready only.

On SIGTERM the API-serving pod drains (pod/drain.py): /ready and new requests get 503, requests in flight
finish (up to --drain-timeout; those left at the deadline are answered 503, app.py's end_in_flight), then
the group ends; if the group fails meanwhile it exits at once. A `--headless` pod does not drain: it has
no requests of its own, and a worker deleted alone has broken its group, which should fail fast (operator
render/lifecycle.py). On SIGTERM it leaves the group at once, without waiting for rank 0 to end it, so
that rank 0 notices the lost rank at its next collective or keepalive (KEEPALIVE_S) and fails.

    main thread     uvicorn: the API (leader) or health (headless)
    engine thread   rank S: join the group, load weights, barrier; then the scheduler loop (rank 0) or
                    follow rank 0's steps (others)
    child processes ranks S+1 .. S+L-1, following rank 0

A failed pod (`_Pod.fail`: a rank exited, a collective failed) records why on the API's ServerState before
the scheduler's requests are aborted, so a request submitted after that abort is refused too (app.py),
and ends its child ranks quickly: a short join, SIGTERM, then SIGKILL (a frozen rank acts on nothing
else), each reaped, none left behind (`_Pod.finish`).

Timeouts. Joining the group, loading the weights and the barrier after the load run under GROUP_TIMEOUT
(30 minutes: the slowest rank's load). Then each rank sets its process group's timeout to the serving
timeout (SERVING_TIMEOUT_S, 120 s; KUBEMOE_COLLECTIVE_TIMEOUT_S overrides it), the limit of every serving
collective: a rank that stays connected but goes silent (stuck in a device call, partitioned, its node
gone without a FIN) fails the others' next collective within it, and a rank whose collective fails fails
its pod as a lost rank does (/health 500, exit 1; the leader aborts its requests). A collective waits for
the slowest rank to reach it: at most what one rank computes between two collectives (one decoder layer,
with its attention over a step's longest prompt) or what rank 0 does between two messages (a keepalive
every KEEPALIVE_S when idle). 120 s holds one layer of a prompt tens of thousands of tokens long on a small
CPU budget, and fails a stuck group well inside the router's 600 s request timeout (a silent rank held
rank 0 for the half hour before). The engine thread's heartbeat (group.py) fails /health (and /ready) when
it has made no progress for the serving timeout and STALL_MARGIN_S more (KUBEMOE_ENGINE_STALL_S
overrides the sum): a thread stuck where no collective times out (a device call, say) is restarted by
the liveness probe. A placement that is still loading LOAD_TIMEOUT_S after it began is aborted
(placement_switch.py; KUBEMOE_PLACEMENT_LOAD_TIMEOUT_S overrides it).

Each rank allocates its KV cache up front, (--max-num-seqs + 1) x (--max-model-len + 1) positions
(group.py), so before any rank starts the pod checks that the caches fit the memory it has. Without
--max-model-len it serves the model's max_position_embeddings where their caches take at most
KV_DEFAULT_SHARE of that memory, and fewer positions where they would take more (Llama 4 Scout's
config.json says 10,485,760); it logs what it chose. A group over several pods gets no such cut: each pod
would choose from its own memory, and the pods must agree, so it is told to give --max-model-len.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch
import uvicorn
from torch.distributed.distributed_c10d import _set_pg_timeout

from kubemoe_runtime.engines.torch.load.load_progress import LoadProgress
from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
from kubemoe_runtime.engines.torch.model.allocator import keep_freed_memory
from kubemoe_runtime.engines.torch.model.engine import DTYPES, TorchEngine
from kubemoe_runtime.engines.torch.model.parallel import (
    ExpertParallel,
    init_expert_parallel,
    leave_process,
    shutdown_expert_parallel,
)
from kubemoe_runtime.engines.torch.model.placement import (
    Placement,
    check_redundant,
    default_placement,
    read_placement_file,
)
from kubemoe_runtime.engines.torch.serve.app import ServerState, build_app, health_app
from kubemoe_runtime.engines.torch.serve.generation_config import GenerationDefaults, generation_defaults
from kubemoe_runtime.engines.torch.serve.group import GroupLeader, Heartbeat, RankRunner, follow
from kubemoe_runtime.engines.torch.serve.kv_budget import available_memory, choose_max_model_len
from kubemoe_runtime.engines.torch.serve.placement_switch import LOAD_TIMEOUT_S
from kubemoe_runtime.engines.torch.serve.scheduler import Scheduler, SchedulerLimits
from kubemoe_runtime.engines.torch.serve.threads import set_rank_threads
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.drain import Drain, DrainingServer, DrainMiddleware
from kubemoe_runtime.pod.gpu_metrics import GpuCollector
from kubemoe_runtime.pod.http_server import server_config
from kubemoe_runtime.pod.metrics import MetricLabels, ServingMetrics
from kubemoe_runtime.pod.ports import free_port
from kubemoe_runtime.pod.settings import ServeSettings

log = logging.getLogger("kubemoe_runtime.serve")

GROUP_TIMEOUT = timedelta(minutes=30)  # joining and loading: covers the slowest rank's weight loading
SERVING_TIMEOUT_S = 120.0  # every collective once serving (the module docstring says why)
STALL_MARGIN_S = 30.0  # the heartbeat's limit: the serving timeout and this (a collective's own error first)
KEEPALIVE_S = 2.0
CHILD_JOIN_S = 15.0  # a rank ending with its group (rank 0's Shutdown) exits within this
FAILED_JOIN_S = 2.0  # the same, once the pod failed: its ranks may be frozen or blocked in a collective
TERMINATE_WAIT_S = 2.0  # after SIGTERM; then SIGKILL
FAILED_LEAVE_S = 2.0  # a failed pod's rank 0 waits this long for the group's other ranks to leave too
SERVING_TIMEOUT_ENV = "KUBEMOE_COLLECTIVE_TIMEOUT_S"
STALL_ENV = "KUBEMOE_ENGINE_STALL_S"
PLACEMENT_TIMEOUT_ENV = "KUBEMOE_PLACEMENT_LOAD_TIMEOUT_S"


@dataclass(frozen=True)
class Timeouts:
    """The serving timeouts, in seconds (the module docstring): from the environment, or the defaults."""

    collective_s: float = SERVING_TIMEOUT_S
    stall_s: float = SERVING_TIMEOUT_S + STALL_MARGIN_S
    placement_load_s: float = LOAD_TIMEOUT_S

    @classmethod
    def from_env(cls) -> Timeouts:
        """ValueError naming the variable for one that is not a positive number of seconds."""
        collective = _seconds(SERVING_TIMEOUT_ENV, SERVING_TIMEOUT_S)
        return cls(
            collective_s=collective,
            stall_s=_seconds(STALL_ENV, collective + STALL_MARGIN_S),
            placement_load_s=_seconds(PLACEMENT_TIMEOUT_ENV, LOAD_TIMEOUT_S),
        )


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={raw!r}: expected a positive number of seconds")
    return value


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
    timeouts: Timeouts = Timeouts()


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
    runner = RankRunner(engine, slots=job.max_num_seqs, max_len=job.max_model_len)
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


class _Server(DrainingServer):
    """uvicorn re-raises SIGTERM once it has shut down, which would end the pod before it stops its ranks.
    Here a signal only starts the drain (pod/drain.py; with a timeout of 0, as a headless pod has, it
    asks the server to exit at once), then the server exits; `serve` then ends the group in order. A
    failed group (`_Pod.fail`) sets should_exit, which ends a drain at once too."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class _Pod:
    """This process: the engine thread, the child ranks and the HTTP server, and how they end."""

    def __init__(self, settings: ServeSettings, job: RankJob) -> None:
        self.settings = settings
        self.job = job
        self.stop = threading.Event()
        self.failure: str | None = None
        self.ready = False
        # the load of this process's rank (the first of the pod's): /ready shows it until ready
        self.progress = LoadProgress(label=f"rank {settings.data_parallel_start_rank}")
        self.ended_by_leader = False  # a headless pod: rank 0 sent Shutdown
        self.server: uvicorn.Server | None = None
        self.children: list[BaseProcess] = []
        self.heartbeat: Heartbeat | None = None  # this process's rank's, once it follows (headless)
        self.state: ServerState | None = None  # the API's (rank 0's pod): told of a failure first

    def problem(self) -> str | None:
        """Why this pod cannot serve: a rank failed, or (headless) its engine thread is stuck."""
        if self.failure is not None:
            return self.failure
        if self.heartbeat is None:
            return None
        return self.heartbeat.stalled(self.job.timeouts.stall_s)

    def fail(self, message: str) -> None:
        """Record the pod's failure (first the API's, before anything aborts its requests), and stop."""
        if self.state is not None and self.state.failure is None:
            self.state.failure = message
        if self.failure is None:
            self.failure = message
            log.error("kubemoe-runtime: %s", message)
        if self.server is not None:
            self.server.should_exit = True

    def start_children(self) -> None:
        ctx = mp.get_context("spawn")
        first = self.settings.data_parallel_start_rank
        for rank in range(first + 1, first + self.settings.data_parallel_size_local):
            child = ctx.Process(
                target=run_rank_process, args=(self.job, rank), name=f"rank-{rank}", daemon=True
            )
            child.start()
            self.children.append(child)
        if self.children:
            threading.Thread(target=self._watch_children, name="watch-ranks", daemon=True).start()

    def _watch_children(self) -> None:
        for sentinel in wait([c.sentinel for c in self.children]):
            child = next(c for c in self.children if c.sentinel == sentinel)
            child.join(timeout=1)  # its sentinel fires as it exits: reap it, for its exit code
            if not self.stop.is_set() and child.exitcode != 0:
                self.fail(f"{child.name} exited with code {child.exitcode}")

    def finish(self, *, child_wait_s: float = CHILD_JOIN_S) -> int:
        """End the child ranks and reap them; the pod's exit code. Each has `child_wait_s` (FAILED_JOIN_S
        once the pod failed) to exit, then TERMINATE_WAIT_S after SIGTERM, then is killed."""
        self.stop.set()
        if self.failure is not None:
            child_wait_s = min(child_wait_s, FAILED_JOIN_S)
        _join_all(self.children, child_wait_s)
        left = [c for c in self.children if c.is_alive()]
        for child in left:
            child.terminate()
        _join_all(left, TERMINATE_WAIT_S)
        for child in left:
            if child.is_alive():  # stopped (SIGSTOP), or deaf to SIGTERM
                log.warning("kubemoe-runtime: %s did not exit on SIGTERM; killing it", child.name)
                child.kill()
        _join_all(left, TERMINATE_WAIT_S)  # reaps them: SIGKILL ends even a stopped process
        return 1 if self.failure is not None else 0


def _join_all(children: list[BaseProcess], timeout: float) -> None:
    """Join each of `children`, all within `timeout` seconds from now."""
    deadline = time.monotonic() + timeout
    for child in children:
        child.join(timeout=max(0.0, deadline - time.monotonic()))


def serve(settings: ServeSettings) -> int:
    if settings.engine != "torch":
        raise ValueError("serve() runs the torch engine; main() hands --engine vllm to serve_vllm()")
    keep_freed_memory()  # before the pod's threads start: one malloc arena (model/allocator.py)
    if problems := settings.torch_problems():
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    cfg = ModelConfig.load(settings.model)
    dtype = cfg.dtype if settings.dtype == "auto" else settings.dtype
    try:
        max_model_len, note = choose_max_model_len(settings, cfg, dtype=dtype, available=available_memory())
        generation = GenerationDefaults() if settings.headless else generation_defaults(settings.model)
    except ValueError as err:  # MaxModelLenError names the flags; ConfigError the file and the field
        print(f"error: {err}", file=sys.stderr)
        return 2
    if note:
        log.warning("kubemoe-runtime: %s", note)
    try:
        timeouts = Timeouts.from_env()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    placement = None
    if not settings.headless:  # the API pod's placement is the group's (join_group)
        try:
            placement = start_placement(settings, cfg)
        except ValueError as err:  # PlacementError names the file and the field
            print(f"error: {err}", file=sys.stderr)
            return 2
    job = RankJob(
        model=settings.model,
        dtype=dtype,
        size=settings.data_parallel_size,
        address=settings.data_parallel_address,
        port=settings.data_parallel_rpc_port or free_port(),
        max_model_len=max_model_len,
        max_num_seqs=settings.max_num_seqs,
        placement=placement,
        local_ranks=settings.data_parallel_size_local,
        timeouts=timeouts,
    )
    pod = _Pod(settings, job)
    pod.start_children()
    drain = Drain()
    if settings.headless:
        app = health_app(
            is_alive=lambda: pod.problem() is None,
            is_ready=lambda: pod.ready and pod.problem() is None,
            progress=pod.progress,
        )
        engine_thread = threading.Thread(target=_follow, args=(pod,), name="rank", daemon=True)
    else:
        state = _server_state(settings, cfg=cfg, max_model_len=max_model_len, generation=generation)
        state.load_progress = pod.progress
        state.stall_after_s = timeouts.stall_s
        pod.state = state
        app = build_app(state)
        engine_thread = threading.Thread(target=_lead, args=(pod, state), name="rank-0", daemon=True)
        drain = Drain(pending=lambda: 0 if state.scheduler is None else len(state.scheduler.kv_store))
    served = app if settings.headless else DrainMiddleware(app, drain)
    config = server_config(served, host=settings.host, port=settings.port, lifespan="off")
    # A headless pod does not drain (timeout 0: uvicorn's own exit), see the module docstring.
    pod.server = _Server(
        config,
        drain=drain,
        timeout=0 if settings.headless else settings.drain_timeout,
        on_timeout=None if pod.state is None else pod.state.end_in_flight,
    )
    engine_thread.start()
    pod.server.run()
    pod.stop.set()
    if pod.state is not None and pod.state.scheduler is not None:
        pod.state.scheduler.wake()  # an idle engine thread would notice the stop at its next keepalive
    if settings.headless and not pod.ended_by_leader:
        # Stopped by a signal or a failure, not by rank 0's Shutdown: our ranks would follow rank 0 until
        # it ends the group, keeping the group's sockets open (30 s and more). Leave now, so that rank 0
        # notices the lost rank at its next collective or keepalive (KEEPALIVE_S).
        leave_process(pod.finish(child_wait_s=0))
    engine_thread.join(timeout=FAILED_LEAVE_S + 5 if pod.failure is not None else 30)
    code = pod.finish()
    if settings.data_parallel_size > 1:
        leave_process(code)  # our ranks are stopped and joined; skip the group's C++ teardown
    return code


def start_placement(settings: ServeSettings, cfg: ModelConfig) -> Placement:
    """The placement a group starts with: --expert-placement's file, or the default for
    --redundant-experts when there is none; ValueError (naming the flag, or the file and the field)."""
    n, ranks, redundant = cfg.n_routed_experts, settings.data_parallel_size, settings.redundant_experts
    layers = [i for i, moe in enumerate(cfg.moe_layers) if moe]
    check_redundant(n_experts=n, ranks=ranks, redundant=redundant)
    if settings.expert_placement is None:
        return default_placement(n_experts=n, ranks=ranks, layers=layers, redundant=redundant)
    return read_placement_file(
        settings.expert_placement, n_experts=n, ranks=ranks, layers=layers, redundant=redundant
    )


def _server_state(
    settings: ServeSettings, *, cfg: ModelConfig, max_model_len: int, generation: GenerationDefaults
) -> ServerState:
    labels = MetricLabels.from_env(role=settings.role, rank=settings.data_parallel_start_rank)
    metrics = ServingMetrics(labels, model_name=settings.served_model_names[0])
    metrics.registry.register(GpuCollector(labels.as_dict()))  # kubemoe_gpu_*; none without a driver
    eos = {*cfg.eos_token_ids, *generation.eos_token_ids}
    return ServerState(
        served_names=settings.served_model_names,
        model_path=str(settings.model),
        max_model_len=max_model_len,
        vocab_size=cfg.vocab_size,
        eos_token_ids=tuple(sorted(eos)),
        tokenizer=TextTokenizer.load(settings.model),
        metrics=metrics,
        default_temperature=generation.temperature,
        default_top_p=generation.top_p,
        created=int(time.time()),
    )


def _lead(pod: _Pod, state: ServerState) -> None:
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


def _follow(pod: _Pod) -> None:
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
