"""An ASGI app served by a real uvicorn on a free local port, on a thread of the test process, so a
test can both call it over HTTP and look inside its state."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import uvicorn

from kubemoe_runtime.pod.http_server import server_config
from kubemoe_runtime.pod.ports import free_port


@contextmanager
def serving(app: Any, *, lifespan: Literal["on", "off"] = "on", what: str = "the app") -> Iterator[int]:
    """Serve `app` on 127.0.0.1 until the block ends; yields the port once the server is up."""
    port = free_port()
    server = uvicorn.Server(server_config(app, host="127.0.0.1", port=port, lifespan=lifespan))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, f"{what} did not start"
            assert thread.is_alive(), f"{what} stopped before it started"
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
