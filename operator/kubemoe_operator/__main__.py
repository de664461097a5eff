"""`kubemoe-operator` / `python -m kubemoe_operator`: run the operator (leader-elected) with kopf.

What stops it from starting is one line on stderr and exit 1, never a traceback (as `kubemoe`'s errors,
cli/errors.py; KUBEMOE_DEBUG=1 adds the traceback): a bad flag (argparse's usage line, exit 2), no
Kubernetes configuration, a port already taken. Once it runs, a failure is logged with its traceback,
as kopf logs a handler's: that log is what is left of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

import httpx2
import kopf
from lightkube import AsyncClient

from kubemoe_operator.autoscale.loop import Autoscaler, Source, pod_targets
from kubemoe_operator.autoscale.prometheus import PrometheusSource
from kubemoe_operator.autoscale.ready import ready_groups
from kubemoe_operator.autoscale.removal import LeastLoaded, pod_leaders
from kubemoe_operator.autoscale.scrape import ScrapeSource
from kubemoe_operator.catalog import load_catalog
from kubemoe_operator.kube.client import Kube
from kubemoe_operator.kube.leader import LeaderElector, LeaseConfig
from kubemoe_operator.rebalance.loop import Rebalancer
from kubemoe_operator.reconcile.handlers import OperatorState, build_registry
from kubemoe_operator.reconcile.pod_http import pod_reader
from kubemoe_operator.reconcile.reconcile import ReconcileContext
from kubemoe_operator.run.health import Health, HealthServer
from kubemoe_operator.run.metrics import MetricsServer, OperatorMetrics
from kubemoe_operator.run.settings import OperatorSettings, parse_settings

log = logging.getLogger("kubemoe.operator")

PROG = "kubemoe-operator"
DEBUG_ENV = "KUBEMOE_DEBUG"  # as cli/errors.py's (the cli stage is above this one)
EXIT_INTERRUPTED = 130


class StartupError(Exception):
    """The operator cannot start: its message is the one line `kubemoe-operator: error: ...`."""


def _one_line(err: BaseException) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if isinstance(err, OSError) and err.errno:
        text = os.strerror(err.errno)  # not "[Errno 98] Address already in use", nor asyncio's long form
    return text or type(err).__name__


def kube_client(settings: OperatorSettings) -> AsyncClient:
    """The API client from the kubeconfig ($KUBECONFIG, ~/.kube/config) or the pod's ServiceAccount."""
    try:
        return AsyncClient(field_manager=settings.field_manager)
    except Exception as err:  # lightkube's ConfigError; a kubeconfig that is not YAML, a missing cert file
        raise StartupError(
            f"no usable Kubernetes configuration: {_one_line(err)} (set KUBECONFIG, or run in a pod "
            "with a ServiceAccount)"
        ) from err


def metrics_server(settings: OperatorSettings, metrics: OperatorMetrics) -> MetricsServer | None:
    if not settings.metrics_port:
        return None
    try:
        return MetricsServer.start(metrics, port=settings.metrics_port)
    except OSError as err:
        raise StartupError(f"--metrics-port {settings.metrics_port}: {_one_line(err)}") from err


async def start_health(server: HealthServer, port: int) -> None:
    try:
        await server.start()
    except OSError as err:
        raise StartupError(f"--health-port {port}: {_one_line(err)}") from err


def autoscaler(
    settings: OperatorSettings, *, kube: Kube, http: httpx2.AsyncClient, metrics: OperatorMetrics
) -> Autoscaler:
    """The autoscaler on Prometheus when --prometheus-url is set, else on a direct scrape of the pods."""
    source: Source
    if settings.prometheus_url:
        source = PrometheusSource(settings.prometheus_url, client=http, groups=ready_groups(kube))
        name = f"Prometheus at {settings.prometheus_url}"
    else:
        source = ScrapeSource(client=http, targets=pod_targets(kube))
        name = "the serving pods' /metrics"
    return Autoscaler(
        kube=kube,
        source=source,
        source_name=name,
        interval_s=settings.autoscale_interval_seconds,
        namespaces=settings.namespaces,
        metrics=metrics,
        removal=LeastLoaded(kube=kube, leaders=pod_leaders(kube), client=http),
    )


async def run(settings: OperatorSettings) -> int:
    """Wait for the Lease, then reconcile until stopped (0) or the Lease is lost (1).

    Only the leader reconciles and autoscales; every replica serves its /metrics, and /healthz and
    /readyz from the start (a standby is alive and ready: see health.py)."""
    metrics = OperatorMetrics()
    metrics.leader.set(0)
    server = metrics_server(settings, metrics)
    health = Health(leader_election=settings.leader_election)
    health_server = HealthServer(health, port=settings.health_port) if settings.health_port else None
    elector: LeaderElector | None = None
    client: AsyncClient | None = None
    http: httpx2.AsyncClient | None = None
    lost = asyncio.Event()
    stop = asyncio.Event()
    failed = False
    try:
        if health_server is not None and settings.health_port:
            await start_health(health_server, settings.health_port)
        client = kube_client(settings)
        http = httpx2.AsyncClient()
        if settings.leader_election:
            elector = LeaderElector(
                client,
                LeaseConfig(
                    name=settings.lease_name,
                    namespace=settings.lease_namespace,
                    identity=settings.identity,
                    duration_s=settings.lease_seconds,
                ),
            )
            log.info(
                "waiting for lease %s/%s as %s",
                settings.lease_namespace,
                settings.lease_name,
                settings.identity,
            )

            def reached(ok: bool) -> None:
                health.lease_reachable = ok

            await elector.acquire(reached=reached)
            log.info("leading as %s", settings.identity)
        health.leading = True
        metrics.leader.set(1)
        kube = Kube(client, field_manager=settings.field_manager)
        state = OperatorState(
            kube=kube,
            context=ReconcileContext(
                catalog=load_catalog(),
                image=settings.image,
                pod_defaults=settings.pod_defaults,
                pod_monitors=settings.pod_monitors,
                pod_monitor_labels=settings.pod_monitor_labels,
                read_pod=pod_reader(http),
            ),
            settings=settings,
            metrics=metrics,
        )
        writers: list[asyncio.Task[None]] = []
        """The leader-only writers besides kopf's handlers."""
        if settings.autoscale_interval_seconds > 0:
            scaler = autoscaler(settings, kube=kube, http=http, metrics=metrics)
            scaling = asyncio.create_task(scaler.run_forever(), name="autoscaler")

            def scaling_ended(task: asyncio.Task[None]) -> None:
                """The loop only ends by a bug: say so and stop, rather than serve without it."""
                nonlocal failed
                if not task.cancelled() and task.exception() is not None:
                    log.error("the autoscaler stopped", exc_info=task.exception())
                    failed = True
                    stop.set()

            scaling.add_done_callback(scaling_ended)
            writers.append(scaling)
        if settings.rebalance_tick_seconds > 0:
            rebalancer = Rebalancer(
                kube=kube,
                client=http,
                tick_s=settings.rebalance_tick_seconds,
                interval_override_s=settings.rebalance_interval_seconds,
                namespaces=settings.namespaces,
            )
            writers.append(asyncio.create_task(rebalancer.run_forever(), name="rebalancer"))
        tasks = list(writers)
        if elector is not None:
            holding = asyncio.create_task(elector.hold(lost), name="lease")

            def holding_ended(task: asyncio.Task[None]) -> None:
                """hold() ends when the Lease is lost (or by a bug: then it is lost as well). A standby
                may lead in a moment: the leader-only writers stop at once, then kopf is told to."""
                if task.cancelled():
                    return
                if task.exception() is not None:
                    log.error("renewing the lease stopped", exc_info=task.exception())
                lost.set()
                for writer in writers:
                    writer.cancel()
                stop.set()

            holding.add_done_callback(holding_ended)
            tasks.append(holding)
        watching = asyncio.Event()

        async def mark_watching() -> None:
            await watching.wait()
            health.watching = True

        tasks.append(asyncio.create_task(mark_watching()))
        try:
            await kopf.operator(
                registry=build_registry(state),
                standalone=True,
                clusterwide=settings.clusterwide,
                namespaces=list(settings.namespaces),
                stop_flag=stop,
                ready_flag=watching,
            )
        finally:
            for task in tasks:
                task.cancel()
            health.watching = health.leading = False
            metrics.leader.set(0)
        if elector is not None and not lost.is_set():
            await elector.release()
    finally:
        if client is not None:
            await client.close()
        if http is not None:
            await http.aclose()
        if server is not None:
            server.stop()
        if health_server is not None:
            await health_server.stop()
    return 1 if lost.is_set() or failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    settings, verbose = parse_settings(argv)  # a bad flag: argparse's usage and one error line, exit 2
    kopf.configure(verbose=verbose)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    if not verbose:  # kopf logs every successful watch-event handler at INFO
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        return asyncio.run(run(settings))
    except StartupError as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        with contextlib.suppress(OSError):
            print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception:  # while running: the log keeps the whole story
        log.critical("the operator stopped on an unexpected error", exc_info=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
