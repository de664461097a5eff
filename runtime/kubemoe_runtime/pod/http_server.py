"""How every serving pod runs its HTTP server (the torch engine's, the vLLM front's, the router's)."""

from __future__ import annotations

from typing import Literal

import uvicorn
from starlette.types import ASGIApp

from kubemoe_runtime.pod.drain import SHUTDOWN_S


def server_config(app: ASGIApp, *, host: str, port: int, lifespan: Literal["on", "off"]) -> uvicorn.Config:
    """uvicorn for a pod: warnings only, no access log (the metrics count requests), and SHUTDOWN_S for
    what is still open once the server stops (pod/drain.py)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan=lifespan,
        timeout_graceful_shutdown=SHUTDOWN_S,
    )
