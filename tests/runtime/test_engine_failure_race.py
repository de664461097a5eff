"""A request that passed the server's engine check as it arrived, and reaches the scheduler only after the
engine failed, is answered 503 `engine_failed` at once (serve/app.py `_submit`, in_flight.py `admit`).

pod.py's `lead_rank` records the failure on the server's state, then aborts every request the scheduler holds.
A handler checks the engine as it starts, then reads the body, renders the template, tokenizes, pulls KV,
and only then submits: one that submitted after the abort sat in the scheduler's waiting list forever (no
engine thread steps any more), and its client got a bare 500 when the pod ended (or nothing at all).

Real parts: pod.py's own `lead_rank` (rank 0's engine thread: join, load, serve) on the tiny checkpoint, its
`_server_state`, the real API served by uvicorn in this process. The fault is injected: the group's next
keepalive raises, as a collective does when a rank is lost (a lost rank cannot be had on demand in one
process). The request is held deterministically between its check and its submit: it is sent with
`Expect: 100-continue` and no body, and the server answers `100 Continue` only once the handler, past its
check, asks for the body."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubemoe_runtime.engines.torch.load.model_config import ModelConfig
from kubemoe_runtime.engines.torch.serve.app import ServerState, build_app
from kubemoe_runtime.engines.torch.serve.engine_thread import lead_rank
from kubemoe_runtime.engines.torch.serve.generation_config import GenerationDefaults
from kubemoe_runtime.engines.torch.serve.group import GroupLeader
from kubemoe_runtime.engines.torch.serve.pod import _server_state
from kubemoe_runtime.engines.torch.serve.pod_process import PodProcess
from kubemoe_runtime.engines.torch.serve.rank_job import RankJob
from kubemoe_runtime.pod.settings import parse_args
from tests.runtime.app_thread import serving
from tests.runtime.held_request import Held

MODEL = "tiny-qwen"
MAX_MODEL_LEN = 64
LOST = "injected: a rank of the group was lost"


class Lead:
    """pod.py's rank-0 engine thread (`lead_rank`) on the tiny checkpoint, EP=1, whose group's keepalive
    raises once `lose_rank` is called."""

    def __init__(self, qwen: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        args = ["--model", str(qwen), "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN)]
        settings, _ = parse_args([*args, "--max-num-seqs", "2"])
        job = RankJob(
            model=qwen,
            dtype="float32",
            size=1,
            address="127.0.0.1",
            port=0,
            max_model_len=MAX_MODEL_LEN,
            max_num_seqs=2,
        )
        self.pod = PodProcess(settings, job)
        self.state: ServerState = _server_state(
            settings, cfg=ModelConfig.load(qwen), max_model_len=MAX_MODEL_LEN, generation=GenerationDefaults()
        )
        self.fault = threading.Event()
        keepalive = GroupLeader.keepalive

        def failing_keepalive(leader: GroupLeader) -> None:
            if self.fault.is_set():
                raise RuntimeError(LOST)
            keepalive(leader)

        monkeypatch.setattr(GroupLeader, "keepalive", failing_keepalive)
        self.thread = threading.Thread(target=self._run, name="rank-0", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(RuntimeError):  # lead_rank re-raises the failure it recorded
            lead_rank(self.pod, self.state)

    def lose_rank(self) -> None:
        self.fault.set()  # the idle engine thread's next keepalive (KEEPALIVE_S) fails
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the engine thread did not fail"


@pytest.fixture
def lead(qwen: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lead]:
    lead = Lead(qwen, monkeypatch)
    deadline = time.monotonic() + 120
    while lead.state.scheduler is None:
        assert lead.thread.is_alive(), "the engine thread ended before it was ready"
        assert time.monotonic() < deadline, "the engine did not load"
        time.sleep(0.05)
    try:
        yield lead
    finally:
        lead.pod.stop.set()
        lead.thread.join(timeout=30)


def test_a_request_submitted_after_the_engine_failed_gets_a_503_at_once(lead: Lead) -> None:
    with serving(build_app(lead.state), lifespan="off", what="the API") as port:
        body = {"model": MODEL, "prompt": "hello experts", "max_tokens": 4, "temperature": 0}
        held = Held(port, "/v1/completions", body)  # past the engine check: the engine was fine then
        lead.lose_rank()  # the failure is recorded, then every request the scheduler held is aborted
        assert lead.state.failure is not None
        assert LOST in lead.state.failure
        assert lead.pod.failure == lead.state.failure

        began = time.monotonic()
        status, answer = held.finish()  # submitted now: after the abort
        assert status == 503, answer
        error = json.loads(answer)["error"]
        assert error["code"] == "engine_failed"
        assert error["type"] == "server_error"
        assert LOST in error["message"]
        assert time.monotonic() - began < 10
        # ... and the scheduler holds nothing for it: it was aborted as it was refused.
        assert lead.state.scheduler is not None
        assert len(lead.state.in_flight) == 0
