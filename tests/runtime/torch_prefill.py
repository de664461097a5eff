"""The torch engine's API as a prefill pod runs it, on a thread of the test process: EP=1, a 64-token
context, two slots, the deployment's KV key (the API's signer reads it from the environment)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.model.parallel import ExpertParallel
from kubemoe_runtime.engines.torch.serve.app import ServerState, build_app
from kubemoe_runtime.engines.torch.serve.group import GroupLeader, RankRunner
from kubemoe_runtime.engines.torch.serve.scheduler import Scheduler, SchedulerLimits
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.kv_auth import KV_KEY_ENV
from kubemoe_runtime.pod.metrics import MetricLabels, ServingMetrics
from tests.runtime.app_thread import serving

MAX_LEN = 64


@contextlib.contextmanager
def serve_torch_prefill(
    *, model_path: Path, tokenizer: TextTokenizer, engine: TorchEngine, served: str, key: str
) -> Iterator[tuple[int, ServerState]]:
    """Serve it until the block ends: its port and state (state.metrics, state.scheduler.kv_store)."""
    metrics = ServingMetrics(MetricLabels(role="prefill"))
    scheduler = Scheduler(
        GroupLeader(RankRunner(engine, slots=2, max_len=MAX_LEN), ep=ExpertParallel()),
        tokenizer=tokenizer,
        limits=SchedulerLimits(max_model_len=MAX_LEN, max_num_seqs=2),
        eos_token_ids=engine.cfg.eos_token_ids,
        metrics=metrics,
    )
    state = ServerState(
        served_names=(served,),
        model_path=str(model_path),
        max_model_len=MAX_LEN,
        vocab_size=engine.cfg.vocab_size,
        eos_token_ids=tuple(engine.cfg.eos_token_ids),
        tokenizer=tokenizer,
        metrics=metrics,
        scheduler=scheduler,
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KV_KEY_ENV, key)
        app = build_app(state)
    stop = threading.Event()
    engine_thread = threading.Thread(target=scheduler.run, args=(stop,), kwargs={"keepalive_s": 0.5})
    engine_thread.start()
    try:
        with serving(app, lifespan="off", what="the prefill") as port:
            yield port, state
    finally:
        stop.set()
        engine_thread.join(timeout=10)
