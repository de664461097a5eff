"""The torch engine's pod: `serve` starts its ranks, its engine thread and its HTTP server, and ends them.

A pod runs ranks S .. S+L-1 of an expert-parallel group of N: rank S on an engine thread of this process,
the others as child processes. Every rank joins the group through the TCP store at A:R (rank 0 hosts it;
without R a single-pod group picks a free port). The pod holding rank 0 serves the OpenAI API and drives
the group (group.py); `--headless` pods serve /health and /ready only.

On SIGTERM the API-serving pod drains (pod/drain.py): /ready and new requests get 503, requests in flight
finish (up to --drain-timeout; those left at the deadline are answered 503, app.py's end_in_flight), then
the group ends; if the group fails meanwhile it exits at once. A `--headless` pod does not drain: it has
no requests of its own, and a worker deleted alone has broken its group, which should fail fast (operator
render/lifecycle.py). On SIGTERM it leaves the group at once, without waiting for rank 0 to end it, so
that rank 0 notices the lost rank at its next collective or keepalive (KEEPALIVE_S, timeouts.py) and fails.

    main thread     uvicorn: the API (leader) or health (headless)
    engine thread   rank S: join the group, load weights, barrier; then the scheduler loop (rank 0) or
                    follow rank 0's steps (others)
    child processes ranks S+1 .. S+L-1, following rank 0

Its parts: the timeouts (timeouts.py), a rank's job and its joining the group (rank_job.py), the process
with its child ranks, its HTTP server and how they end (pod_process.py), and the engine thread
(engine_thread.py). Here: `serve`, which checks the settings, chooses what the pod serves (its length, its
starting placement, its server's state) and wires the parts.

Each rank allocates its KV cache up front, (--max-num-seqs + 1) x (--max-model-len + 1) positions
(group.py), so before any rank starts the pod checks that the caches fit the memory it has. Without
--max-model-len it serves the model's max_position_embeddings where their caches take at most
KV_DEFAULT_SHARE of that memory, and fewer positions where they would take more (Llama 4 Scout's
config.json says 10,485,760); it logs what it chose. A group over several pods gets no such cut: each pod
would choose from its own memory, and the pods must agree, so it is told to give --max-model-len.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
from kubemoe_runtime.engines.torch.model.allocator import keep_freed_memory
from kubemoe_runtime.engines.torch.model.parallel import leave_process
from kubemoe_runtime.engines.torch.model.placement import (
    Placement,
    check_redundant,
    default_placement,
    read_placement_file,
)
from kubemoe_runtime.engines.torch.serve.app import ServerState, build_app, health_app
from kubemoe_runtime.engines.torch.serve.engine_thread import follow_rank, lead_rank
from kubemoe_runtime.engines.torch.serve.generation_config import GenerationDefaults, generation_defaults
from kubemoe_runtime.engines.torch.serve.kv_budget import available_memory, choose_max_model_len
from kubemoe_runtime.engines.torch.serve.pod_process import PodProcess, PodServer
from kubemoe_runtime.engines.torch.serve.rank_job import RankJob
from kubemoe_runtime.engines.torch.serve.timeouts import FAILED_LEAVE_S, Timeouts
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.drain import Drain, DrainMiddleware
from kubemoe_runtime.pod.gpu_metrics import GpuCollector
from kubemoe_runtime.pod.http_server import server_config
from kubemoe_runtime.pod.metrics import MetricLabels, ServingMetrics
from kubemoe_runtime.pod.ports import free_port
from kubemoe_runtime.pod.settings import ServeSettings

log = logging.getLogger("kubemoe_runtime.serve")


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
    pod = PodProcess(settings, job)
    pod.start_children()
    drain = Drain()
    if settings.headless:
        app = health_app(
            is_alive=lambda: pod.problem() is None,
            is_ready=lambda: pod.ready and pod.problem() is None,
            progress=pod.progress,
        )
        engine_thread = threading.Thread(target=follow_rank, args=(pod,), name="rank", daemon=True)
    else:
        state = _server_state(settings, cfg=cfg, max_model_len=max_model_len, generation=generation)
        state.load_progress = pod.progress
        state.stall_after_s = timeouts.stall_s
        pod.state = state
        app = build_app(state)
        engine_thread = threading.Thread(target=lead_rank, args=(pod, state), name="rank-0", daemon=True)
        drain = Drain(pending=lambda: 0 if state.scheduler is None else len(state.scheduler.kv_store))
    served = app if settings.headless else DrainMiddleware(app, drain)
    config = server_config(served, host=settings.host, port=settings.port, lifespan="off")
    # A headless pod does not drain (timeout 0: uvicorn's own exit), see the module docstring.
    pod.server = PodServer(
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
