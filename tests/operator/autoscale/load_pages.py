"""Serving pods' /metrics pages for the scale-down tests: the runtime's own ServingMetrics over HTTP,
one page per load (requests running + waiting), as a group leader of a role serves them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

from kubemoe_runtime.pod.metrics import MetricLabels, ServingMetrics
from kubemoe_runtime.pod.ports import free_port


@contextlib.contextmanager
def load_pages(loads: Sequence[int], *, deployment: str, role: str = "decode") -> Iterator[list[str]]:
    """The pages' URLs, in the order of `loads`; each load is split between running and waiting."""
    servers: list[WSGIServer] = []
    urls = []
    try:
        for group, load in enumerate(loads):
            metrics = ServingMetrics(MetricLabels(deployment=deployment, role=role, group=str(group)))
            metrics.running.set(load // 2)
            metrics.waiting.set(load - load // 2)
            port = free_port()
            server, _ = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
            servers.append(server)
            urls.append(f"http://127.0.0.1:{port}/metrics")
        yield urls
    finally:
        for server in servers:
            server.shutdown()
