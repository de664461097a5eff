"""The torch engine's API state on a real scheduler over a real engine (EP=1), for tests that serve the API
in their own process (tests/runtime/app_thread.py) and look inside it. Whether an engine thread runs the
scheduler is the test's choice: without one, submitted requests wait in the scheduler, as behind a long
step."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel
from kubemoe_runtime.engines.torch.serve.app import ServerState
from kubemoe_runtime.engines.torch.serve.group import GroupLeader, RankRunner
from kubemoe_runtime.engines.torch.serve.scheduler import Scheduler, SchedulerLimits
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.metrics import MetricLabels, ServingMetrics

MODEL = "tiny-qwen"


def api_state(
    engine: TorchEngine,
    tokenizer: TextTokenizer,
    model: Path,
    *,
    max_model_len: int = 64,
    slots: int = 2,
    max_waiting: int = 256,
    role: str = "worker",
) -> ServerState:
    metrics = ServingMetrics(MetricLabels(role=role))
    scheduler = Scheduler(
        GroupLeader(RankRunner(engine, slots=slots, max_len=max_model_len), ep=ExpertParallel()),
        tokenizer=tokenizer,
        limits=SchedulerLimits(max_model_len=max_model_len, max_num_seqs=slots, max_waiting=max_waiting),
        eos_token_ids=engine.cfg.eos_token_ids,
        metrics=metrics,
    )
    return ServerState(
        served_names=(MODEL,),
        model_path=str(model),
        max_model_len=max_model_len,
        vocab_size=engine.cfg.vocab_size,
        eos_token_ids=tuple(engine.cfg.eos_token_ids),
        tokenizer=tokenizer,
        metrics=metrics,
        scheduler=scheduler,
    )


@contextmanager
def engine_thread(state: ServerState) -> Iterator[threading.Thread]:
    """The scheduler's loop on its own thread for the block (as pod.py's engine thread runs it)."""
    assert state.scheduler is not None
    stop = threading.Event()
    thread = threading.Thread(target=state.scheduler.run, args=(stop,), kwargs={"keepalive_s": 0.5})
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(timeout=30)
