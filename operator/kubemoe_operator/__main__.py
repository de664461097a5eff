"""`kubemoe-operator` / `python -m kubemoe_operator`: run the operator (leader-elected) with kopf."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

import httpx2
import kopf
from lightkube import AsyncClient

from kubemoe_operator.autoscale.loop import Autoscaler, Source, pod_targets
from kubemoe_operator.autoscale.prometheus import PrometheusSource
from kubemoe_operator.autoscale.removal import LeastLoaded, pod_leaders
from kubemoe_operator.autoscale.scrape import ScrapeSource
from kubemoe_operator.catalog import load_catalog
from kubemoe_operator.kube.client import Kube
from kubemoe_operator.kube.leader import LeaderElector, LeaseConfig
from kubemoe_operator.rebalance.loop import Rebalancer
from kubemoe_operator.reconcile.handlers import OperatorState, build_registry
from kubemoe_operator.reconcile.reconcile import ReconcileContext
from kubemoe_operator.run.health import Health, HealthServer
from kubemoe_operator.run.metrics import MetricsServer, OperatorMetrics
from kubemoe_operator.run.settings import OperatorSettings, parse_settings

log = logging.getLogger("kubemoe.operator")


def autoscaler(
    settings: OperatorSettings, *, kube: Kube, http: httpx2.AsyncClient, metrics: OperatorMetrics
) -> Autoscaler:
    """The autoscaler on Prometheus when --prometheus-url is set, else on a direct scrape of the pods."""
    source: Source
    if settings.prometheus_url:
        source = PrometheusSource(settings.prometheus_url, client=http)
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
    client = AsyncClient(field_manager=settings.field_manager)
    http = httpx2.AsyncClient()
    metrics = OperatorMetrics()
    metrics.leader.set(0)
    server = MetricsServer.start(metrics, port=settings.metrics_port) if settings.metrics_port else None
    health = Health(leader_election=settings.leader_election)
    health_server = HealthServer(health, port=settings.health_port) if settings.health_port else None
    elector: LeaderElector | None = None
    lost = asyncio.Event()
    stop = asyncio.Event()
    failed = False
    try:
        if health_server is not None:
            await health_server.start()
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
            ),
            settings=settings,
            metrics=metrics,
        )
        tasks: list[asyncio.Task[None]] = []
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
            tasks.append(scaling)
        if settings.rebalance_tick_seconds > 0:
            rebalancer = Rebalancer(
                kube=kube,
                client=http,
                tick_s=settings.rebalance_tick_seconds,
                interval_override_s=settings.rebalance_interval_seconds,
                namespaces=settings.namespaces,
            )
            tasks.append(asyncio.create_task(rebalancer.run_forever(), name="rebalancer"))
        if elector is not None:
            tasks.append(asyncio.create_task(elector.hold(lost)))

            async def stop_when_lost() -> None:
                await lost.wait()
                stop.set()

            tasks.append(asyncio.create_task(stop_when_lost()))
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
        await client.close()
        await http.aclose()
        if server is not None:
            server.stop()
        if health_server is not None:
            await health_server.stop()
    return 1 if lost.is_set() or failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    settings, verbose = parse_settings(argv)
    kopf.configure(verbose=verbose)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    if not verbose:  # kopf logs every successful watch-event handler at INFO
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    return asyncio.run(run(settings))


if __name__ == "__main__":
    sys.exit(main())
