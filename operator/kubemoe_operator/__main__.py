"""`kubemoe-operator` / `python -m kubemoe_operator`: run the operator (leader-elected) with kopf."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

import kopf
from lightkube import AsyncClient

from kubemoe_operator.catalog import load_catalog
from kubemoe_operator.handlers import Runtime, build_registry
from kubemoe_operator.kube import Kube
from kubemoe_operator.leader import LeaderElector, LeaseConfig
from kubemoe_operator.reconcile import ReconcileContext
from kubemoe_operator.settings import OperatorSettings, parse_settings

log = logging.getLogger("kubemoe.operator")


async def run(settings: OperatorSettings) -> int:
    """Wait for the Lease, then reconcile until stopped (0) or the Lease is lost (1)."""
    client = AsyncClient(field_manager=settings.field_manager)
    elector: LeaderElector | None = None
    lost = asyncio.Event()
    stop = asyncio.Event()
    try:
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
            await elector.acquire()
            log.info("leading as %s", settings.identity)
        runtime = Runtime(
            kube=Kube(client, field_manager=settings.field_manager),
            context=ReconcileContext(catalog=load_catalog(), image=settings.image),
            settings=settings,
        )
        tasks: list[asyncio.Task[None]] = []
        if elector is not None:
            tasks.append(asyncio.create_task(elector.hold(lost)))

            async def stop_when_lost() -> None:
                await lost.wait()
                stop.set()

            tasks.append(asyncio.create_task(stop_when_lost()))
        try:
            await kopf.operator(
                registry=build_registry(runtime),
                standalone=True,
                clusterwide=settings.clusterwide,
                namespaces=list(settings.namespaces),
                stop_flag=stop,
                liveness_endpoint=settings.liveness_endpoint,
            )
        finally:
            for task in tasks:
                task.cancel()
        if elector is not None and not lost.is_set():
            await elector.release()
    finally:
        await client.close()
    return 1 if lost.is_set() else 0


def main(argv: Sequence[str] | None = None) -> int:
    settings, verbose = parse_settings(argv)
    kopf.configure(verbose=verbose)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    if not verbose:  # kopf logs every successful watch-event handler at INFO
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    return asyncio.run(run(settings))


if __name__ == "__main__":
    sys.exit(main())
