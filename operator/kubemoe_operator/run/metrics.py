"""The operator's own Prometheus metrics, in a registry it owns, served on --metrics-port.

kubemoe_operator_reconciles_total                counter  reconciles run, by result (ok, error)
kubemoe_operator_reconcile_errors_total          counter  reconciles that raised, by kind of error
kubemoe_operator_reconcile_duration_seconds      histogram
kubemoe_operator_autoscale_evaluations_total     counter  per role, by outcome (decided, unavailable)
kubemoe_operator_autoscale_decisions_total       counter  per role, by direction (up, down, hold)
kubemoe_operator_autoscale_desired_replicas      gauge    per role: the latest decision
kubemoe_operator_autoscale_metric_value          gauge    per role and metric: the latest sample
kubemoe_operator_leader                          gauge    1 while this replica holds the Lease (or runs
                                                          without leader election), else 0
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

ROLE_LABELS = ("namespace", "deployment", "role")


@dataclass
class OperatorMetrics:
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        r = self.registry
        self.reconciles = Counter(
            "kubemoe_operator_reconciles", "Reconciles of a ModelDeployment", ["result"], registry=r
        )
        self.reconcile_errors = Counter(
            "kubemoe_operator_reconcile_errors", "Reconciles that failed", ["error"], registry=r
        )
        self.reconcile_seconds = Histogram(
            "kubemoe_operator_reconcile_duration_seconds", "Duration of one reconcile", registry=r
        )
        self.evaluations = Counter(
            "kubemoe_operator_autoscale_evaluations",
            "Autoscaler evaluations of one role",
            [*ROLE_LABELS, "outcome"],
            registry=r,
        )
        self.decisions = Counter(
            "kubemoe_operator_autoscale_decisions",
            "Autoscaler decisions of one role, by direction against the current replicas",
            [*ROLE_LABELS, "direction"],
            registry=r,
        )
        self.desired = Gauge(
            "kubemoe_operator_autoscale_desired_replicas",
            "The autoscaler's latest decision (serving groups) per role",
            ROLE_LABELS,
            registry=r,
        )
        self.leader = Gauge(
            "kubemoe_operator_leader",
            "1 while this replica leads (holds the Lease, or runs without leader election), else 0",
            registry=r,
        )
        self.metric_value = Gauge(
            "kubemoe_operator_autoscale_metric_value",
            "The latest per-group value of an autoscaling metric (NaN: not available)",
            [*ROLE_LABELS, "metric"],
            registry=r,
        )


@dataclass
class MetricsServer:
    """The /metrics HTTP endpoint (prometheus_client's WSGI server on a thread)."""

    server: WSGIServer
    thread: threading.Thread

    @classmethod
    def start(cls, metrics: OperatorMetrics, *, port: int, address: str = "0.0.0.0") -> MetricsServer:
        server, thread = start_http_server(port, addr=address, registry=metrics.registry)
        return cls(server, thread)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
