"""The router's Prometheus series, in a registry it owns.

kubemoe_router_requests_total                  counter    by endpoint and HTTP code
kubemoe_router_requests_in_flight              gauge      requests being proxied now
kubemoe_router_time_to_first_token_seconds     histogram  streaming: arrival -> first generated text
kubemoe_router_inter_token_latency_seconds     histogram  streaming: between text events of one answer
kubemoe_router_request_latency_seconds         histogram  arrival -> last byte
kubemoe_router_phase_seconds                   histogram  by phase: prefill (P/D first leg), decode
kubemoe_router_backend_errors_total            counter    by role, backend and kind (connect, read, 5xx, busy)
kubemoe_router_backend_healthy                 gauge      by role and backend: 1 in rotation, 0 ejected
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kubemoe_router_requests", "Requests answered", ["endpoint", "code"], registry=r
        )
        self.in_flight = Gauge("kubemoe_router_requests_in_flight", "Requests being proxied", registry=r)
        self.ttft = Histogram(
            "kubemoe_router_time_to_first_token_seconds", "Time to first token", buckets=BUCKETS, registry=r
        )
        self.itl = Histogram(
            "kubemoe_router_inter_token_latency_seconds", "Inter-token latency", buckets=BUCKETS, registry=r
        )
        self.latency = Histogram(
            "kubemoe_router_request_latency_seconds", "Request latency", buckets=BUCKETS, registry=r
        )
        self.phase = Histogram(
            "kubemoe_router_phase_seconds", "Time per P/D phase", ["phase"], buckets=BUCKETS, registry=r
        )
        self.pd_path = Counter(
            "kubemoe_router_pd_path",
            "Disaggregated requests by path: prefill_decode (the KV hand-off) or decode_only (short prompts)",
            ["path"],
            registry=r,
        )
        self.backend_errors = Counter(
            "kubemoe_router_backend_errors", "Backend failures", ["role", "backend", "kind"], registry=r
        )
        self.backend_healthy = Gauge(
            "kubemoe_router_backend_healthy",
            "Backend in rotation (1) or ejected (0)",
            ["role", "backend"],
            registry=r,
        )
        self._error_kinds: dict[tuple[str, str], set[str]] = {}  # (role, backend): its kinds counted

    def backend_error(self, role: str, address: str, kind: str) -> None:
        self.backend_errors.labels(role=role, backend=address, kind=kind).inc()
        self._error_kinds.setdefault((role, address), set()).add(kind)

    def forget_backend(self, role: str, address: str) -> None:
        """A backend left: its series go, from every per-backend metric (pod IPs come and go; their series
        would pile up for the router's life)."""
        with contextlib.suppress(KeyError):
            self.backend_healthy.remove(role, address)
        for kind in self._error_kinds.pop((role, address), set()):
            with contextlib.suppress(KeyError):
                self.backend_errors.remove(role, address, kind)

    def render(self) -> bytes:
        return generate_latest(self.registry)
