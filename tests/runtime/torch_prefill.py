"""The torch engine's API as a prefill pod runs it, on a thread of the test process (api_state.py's state:
EP=1, a 64-token context, two slots), with the deployment's KV key (the API's signer reads it from the
environment)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubemoe_runtime.engines.torch import TorchEngine
from kubemoe_runtime.engines.torch.serve.app import ServerState, build_app
from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.kv_auth import KV_KEY_ENV
from tests.runtime.api_state import api_state, engine_thread
from tests.runtime.app_thread import serving


@contextlib.contextmanager
def serve_torch_prefill(
    *, model_path: Path, tokenizer: TextTokenizer, engine: TorchEngine, key: str
) -> Iterator[tuple[int, ServerState]]:
    """Serve it (as api_state.MODEL) until the block ends: its port and state (state.metrics,
    state.scheduler.kv_store)."""
    state = api_state(engine, tokenizer, model_path, role="prefill")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(KV_KEY_ENV, key)
        app = build_app(state)
    with engine_thread(state), serving(app, lifespan="off", what="the prefill") as port:
        yield port, state
