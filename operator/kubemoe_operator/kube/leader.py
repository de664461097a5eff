"""Leader election on a coordination.k8s.io/v1 Lease: only one operator reconciles at a time.

Standbys wait until the Lease expires (its holder stopped renewing) and take it with an
optimistic-concurrency update (resourceVersion precondition), so two candidates cannot both win.
The leader renews every third of the lease; if it cannot renew before the lease runs out it
stops, and a standby takes over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx2
from lightkube import ApiError, AsyncClient
from lightkube.resources.coordination_v1 import Lease
from lightkube.types import PatchType

log = logging.getLogger("kubemoe.leader")


@dataclass(frozen=True, kw_only=True)
class LeaseConfig:
    name: str
    namespace: str
    identity: str
    duration_s: int = 15


def _micro(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def lease_free_for(spec: dict[str, Any], *, identity: str, now: datetime) -> bool:
    """Whether `identity` may take or keep a Lease whose spec is `spec`."""
    holder = spec.get("holderIdentity")
    if not holder or holder == identity:
        return True
    renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
    duration = int(spec.get("leaseDurationSeconds") or 0)
    return renewed is None or renewed + timedelta(seconds=duration) < now


class LeaderElector:
    def __init__(
        self, client: AsyncClient, config: LeaseConfig, *, clock: Callable[[], datetime] | None = None
    ):
        self.client = client
        self.config = config
        self.clock = clock or (lambda: datetime.now(UTC))

    async def try_acquire(self) -> bool:
        """One attempt to take or renew the Lease. True: this process leads."""
        cfg, now = self.config, self.clock()
        try:
            lease = (await self.client.get(Lease, cfg.name, namespace=cfg.namespace)).to_dict()
        except ApiError as err:
            if err.status.code != 404:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": cfg.name, "namespace": cfg.namespace},
                "spec": {
                    "holderIdentity": cfg.identity,
                    "leaseDurationSeconds": cfg.duration_s,
                    "acquireTime": _micro(now),
                    "renewTime": _micro(now),
                    "leaseTransitions": 0,
                },
            }
            try:
                await self.client.create(cast(Lease, Lease.from_dict(body)))
            except ApiError as create_err:
                if create_err.status.code == 409:
                    return False  # another candidate created it first
                raise
            return True
        spec = lease.get("spec") or {}
        if not lease_free_for(spec, identity=cfg.identity, now=now):
            return False
        taking = spec.get("holderIdentity") != cfg.identity
        patch: dict[str, Any] = {
            "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
            "spec": {
                "holderIdentity": cfg.identity,
                "leaseDurationSeconds": cfg.duration_s,
                "renewTime": _micro(now),
            },
        }
        if taking:
            patch["spec"]["acquireTime"] = _micro(now)
            patch["spec"]["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        try:
            await self.client.patch(
                Lease, cfg.name, patch, namespace=cfg.namespace, patch_type=PatchType.MERGE
            )
        except ApiError as err:
            if err.status.code == 409:
                return False  # someone else renewed or took it meanwhile
            raise
        if taking:
            log.info("acquired lease %s/%s as %s", cfg.namespace, cfg.name, cfg.identity)
        return True

    async def acquire(self, *, reached: Callable[[bool], None] | None = None) -> None:
        """Wait until this process leads. After each attempt, `reached` is told whether it reached
        the API server (a standby that can read the Lease is watching it)."""
        while True:
            try:
                won = await self.try_acquire()
            except (ApiError, httpx2.HTTPError) as err:
                log.warning("lease %s: %s", self.config.name, err)
                won = None
            if reached is not None:
                reached(won is not None)
            if won:
                return
            await asyncio.sleep(max(1.0, self.config.duration_s / 5))

    async def hold(self, lost: asyncio.Event) -> None:
        """Renew until cancelled; set `lost` if the lease could not be renewed in time."""
        cfg = self.config
        deadline = self.clock() + timedelta(seconds=cfg.duration_s)
        while True:
            await asyncio.sleep(cfg.duration_s / 3)
            try:
                if await self.try_acquire():
                    deadline = self.clock() + timedelta(seconds=cfg.duration_s)
                    continue
                log.error("lease %s/%s was taken by another operator", cfg.namespace, cfg.name)
                lost.set()
                return
            except (ApiError, httpx2.HTTPError) as err:
                log.warning("could not renew lease %s: %s", cfg.name, err)
            if self.clock() >= deadline:
                log.error("lease %s/%s expired before it could be renewed", cfg.namespace, cfg.name)
                lost.set()
                return

    async def release(self) -> None:
        """Give the lease up (on a clean stop) so a standby takes over at once."""
        cfg = self.config
        patch = {"spec": {"holderIdentity": None, "renewTime": None, "acquireTime": None}}
        try:
            lease = (await self.client.get(Lease, cfg.name, namespace=cfg.namespace)).to_dict()
            if (lease.get("spec") or {}).get("holderIdentity") != cfg.identity:
                return
            patch["metadata"] = {"resourceVersion": lease["metadata"]["resourceVersion"]}
            await self.client.patch(
                Lease, cfg.name, patch, namespace=cfg.namespace, patch_type=PatchType.MERGE
            )
        except (ApiError, httpx2.HTTPError) as err:
            log.warning("could not release lease %s: %s", cfg.name, err)
