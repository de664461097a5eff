"""The operator's settings: one typed object, built from flags and passed in at start-up."""

from __future__ import annotations

import argparse
import math
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata

from pydantic import ValidationError

from kubemoe_operator.api.pod_metadata import metadata_problems
from kubemoe_operator.api.rules import reserved_label_problems
from kubemoe_operator.api.spec import PodOptions

FIELD_MANAGER = "kubemoe-operator"
DEFAULT_IMAGE = "kubemoe/kubemoe-runtime:0.1.0"
DISTRIBUTION = "kubemoe-operator"


def package_version() -> str:
    """The installed kubemoe-operator's version (`--version` of kubemoe, kubectl-moe and the operator)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


@dataclass(frozen=True, kw_only=True)
class OperatorSettings:
    namespaces: tuple[str, ...] = ()
    """Namespaces to watch; empty: every namespace (cluster-wide)."""
    resync_seconds: float = 60.0
    """How often every ModelDeployment is reconciled even when nothing changed."""
    field_manager: str = FIELD_MANAGER
    image: str = DEFAULT_IMAGE
    """Runtime image for ModelDeployments that name none."""
    leader_election: bool = True
    lease_name: str = "kubemoe-operator"
    lease_namespace: str = "default"
    lease_seconds: int = 15
    identity: str = ""
    """This replica's name in the Lease (defaults to host name and pid)."""
    health_port: int | None = None
    """Port of /healthz and /readyz (health.py), served from process start; None: not served."""
    autoscale_interval_seconds: float = 15.0
    """How often the autoscaler evaluates every autoscaled role; 0 turns the autoscaler off."""
    rebalance_tick_seconds: float = 15.0
    """How often the expert rebalancer looks for roles due a check (rebalance/loop.py); 0 turns it off."""
    rebalance_interval_seconds: float | None = None
    """Every role's rebalance interval instead of spec.experts.rebalance.intervalSeconds (tests, demos)."""
    prometheus_url: str | None = None
    """The Prometheus HTTP API the autoscaler queries; None: scrape the serving pods directly."""
    pod_monitors: bool = True
    """A PodMonitor per ModelDeployment where the CRD is served (render/monitoring.py)."""
    pod_monitor_labels: dict[str, str] = field(default_factory=dict)
    """Labels of those PodMonitors besides kubemoe's: the ones a Prometheus selects on (`release`)."""
    metrics_port: int | None = None
    """Port of the operator's own /metrics; None: not served."""
    pod_defaults: PodOptions = field(default_factory=PodOptions)
    """Annotations, labels and image pull secrets of every rendered pod; spec.pod adds to them."""

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces


def port_type(*, off: bool) -> Callable[[str], int]:
    """An argparse type for a TCP port a server listens on, 1-65535; where `off`, 0 too (the flag's "not
    served"), else 0 is refused (a random port, which nothing could find or probe). argparse turns the
    error into one usage line naming the flag."""
    lowest = 0 if off else 1
    allowed = "1-65535 (0: off)" if off else "1-65535"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if not lowest <= value <= 65535:
            raise argparse.ArgumentTypeError(f"{text!r} is not a port number: give one in {allowed}")
        return value

    return parse


_port = port_type(off=True)
"""--health-port and --metrics-port: 0 (the default where unset) serves nothing."""


def _seconds(*, zero: bool) -> Callable[[str], float]:
    """A finite number of seconds, above 0 (or 0 too where `zero`: the flag's "off")."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"{text} seconds: give a number {'>=' if zero else '>'} 0")
        return value

    return parse


def _lease_seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} seconds: give at least 1")
    return value


def _url(text: str) -> str:
    """An http(s) URL, or '' (unset), as the chart's schema has it."""
    if (text and not text.startswith(("http://", "https://"))) or text in ("http://", "https://"):
        raise argparse.ArgumentTypeError(f"{text!r}: give an http:// or https:// URL")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubemoe-operator", description="Reconcile ModelDeployments.")
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    p.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch only this namespace (repeatable)"
    )
    p.add_argument("--resync-seconds", type=_seconds(zero=False), default=60.0)
    p.add_argument("--field-manager", default=FIELD_MANAGER)
    p.add_argument("--image", default=os.environ.get("KUBEMOE_RUNTIME_IMAGE", DEFAULT_IMAGE))
    p.add_argument("--no-leader-election", action="store_true")
    p.add_argument("--lease-name", default="kubemoe-operator")
    p.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    p.add_argument("--lease-seconds", type=_lease_seconds, default=15)
    p.add_argument("--identity", default=os.environ.get("POD_NAME", ""))
    p.add_argument(
        "--health-port",
        type=_port,
        default=None,
        help="serve /healthz (alive) and /readyz (watching: the Lease as a standby, the resources as "
        "the leader) here, from process start",
    )
    p.add_argument(
        "--autoscale-interval-seconds",
        type=_seconds(zero=True),
        default=15.0,
        help="seconds between autoscaler evaluations (0: no autoscaling)",
    )
    p.add_argument(
        "--rebalance-tick-seconds",
        type=_seconds(zero=True),
        default=15.0,
        help="seconds between the expert rebalancer's looks for roles due a check (0: no rebalancing)",
    )
    p.add_argument(
        "--rebalance-interval-seconds",
        type=_seconds(zero=False),
        default=None,
        help="check every expert-parallel role this often instead of its spec.experts.rebalance."
        "intervalSeconds (for tests and demos)",
    )
    p.add_argument(
        "--no-pod-monitors",
        action="store_true",
        help="never render PodMonitors: put scrape annotations on the pods that serve /metrics instead",
    )
    p.add_argument(
        "--prometheus-url",
        type=_url,
        default=None,
        help="Prometheus HTTP API for autoscaling metrics, e.g. http://prometheus.monitoring:9090; "
        "unset: scrape the serving pods' /metrics directly",
    )
    p.add_argument("--metrics-port", type=_port, default=None, help="serve the operator's /metrics here")
    p.add_argument(
        "--pod-annotation",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="annotate every rendered pod (repeatable; spec.pod.annotations wins on the same key)",
    )
    p.add_argument(
        "--pod-label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="label every rendered pod (repeatable; spec.pod.labels wins on the same key)",
    )
    p.add_argument(
        "--pod-monitor-label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="label every PodMonitor the operator creates, e.g. release=kube-prometheus-stack: the label "
        "your Prometheus's podMonitorSelector matches (repeatable)",
    )
    p.add_argument(
        "--image-pull-secret",
        action="append",
        default=[],
        metavar="NAME",
        help="Secret for pulling the runtime image, in each ModelDeployment's namespace (repeatable)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _pairs(flag: str, values: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {value!r}: write KEY=VALUE")
        out[key] = rest
    return out


def pod_defaults(args: argparse.Namespace) -> PodOptions:
    """--pod-annotation, --pod-label and --image-pull-secret as PodOptions; ValueError naming the flag."""
    labels = _pairs("--pod-label", args.pod_label)
    problems = reserved_label_problems(labels, field="--pod-label")
    if problems:
        raise ValueError("; ".join(str(p) for p in problems))
    try:
        return PodOptions(
            annotations=_pairs("--pod-annotation", args.pod_annotation),
            labels=labels,
            image_pull_secrets=list(args.image_pull_secret),
        )
    except ValidationError as err:
        raise ValueError(f"--image-pull-secret: {err.errors()[0]['msg']}") from None


def pod_monitor_labels(args: argparse.Namespace) -> dict[str, str]:
    """--pod-monitor-label pairs; ValueError naming the flag for a key or value Kubernetes refuses, or
    one of kubemoe's own (the PodMonitor's selector and ownership rest on them)."""
    labels = _pairs("--pod-monitor-label", args.pod_monitor_label)
    problems = reserved_label_problems(labels, field="--pod-monitor-label")
    problems += metadata_problems(labels, {}, field="--pod-monitor-label")
    if problems:
        raise ValueError("; ".join(str(p) for p in problems))
    return labels


def settings_from_args(args: argparse.Namespace) -> OperatorSettings:
    return OperatorSettings(
        namespaces=tuple(args.namespace),
        resync_seconds=args.resync_seconds,
        field_manager=args.field_manager,
        image=args.image,
        leader_election=not args.no_leader_election,
        lease_name=args.lease_name,
        lease_namespace=args.lease_namespace,
        lease_seconds=args.lease_seconds,
        identity=args.identity or f"{socket.gethostname()}-{os.getpid()}",
        health_port=args.health_port,
        autoscale_interval_seconds=args.autoscale_interval_seconds,
        rebalance_tick_seconds=args.rebalance_tick_seconds,
        rebalance_interval_seconds=args.rebalance_interval_seconds,
        prometheus_url=args.prometheus_url or None,
        pod_monitors=not args.no_pod_monitors,
        pod_monitor_labels=pod_monitor_labels(args),
        metrics_port=args.metrics_port,
        pod_defaults=pod_defaults(args),
    )


def parse_settings(argv: Sequence[str] | None = None) -> tuple[OperatorSettings, bool]:
    """(settings, verbose) from the command line."""
    p = parser()
    args = p.parse_args(argv)
    try:
        return settings_from_args(args), bool(args.verbose)
    except ValueError as err:
        p.error(str(err))
