"""Leader election on a coordination.k8s.io/v1 Lease: only one operator reconciles at a time.

Standbys wait until the Lease expires (its holder stopped renewing) and take it with an
optimistic-concurrency update (resourceVersion precondition), so two candidates cannot both win.
As client-go's leaderelection, expiry is judged on each candidate's own monotonic clock, never from
the holder's renewTime (another node's wall clock, which may be skewed): a Lease has expired once it
has not changed for leaseDurationSeconds since this process saw it change.

The leader renews every fifth of the lease. Its renew deadline is two thirds of the lease after its
last successful renewal was sent; every attempt is cut off there, and there it gives up (`lost`),
before any standby can see the Lease expire.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import httpx2
from lightkube import ApiError, AsyncClient
from lightkube.resources.coordination_v1 import Lease
from lightkube.types import PatchType

log = logging.getLogger("kubemoe.leader")

RENEW_DEADLINE = 2 / 3
"""The leader gives up this part of the lease after its last successful renewal (client-go: 10 s of 15)."""


@dataclass(frozen=True, kw_only=True)
class LeaseConfig:
    name: str
    namespace: str
    identity: str
    duration_s: int = 15


def _micro(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_free_for(spec: dict[str, Any], *, identity: str, unchanged_for: float) -> bool:
    """Whether `identity` may take or keep a Lease whose spec is `spec`, which this process has seen
    unchanged for `unchanged_for` seconds (of its own monotonic clock)."""
    holder = spec.get("holderIdentity")
    if not holder or holder == identity:
        return True
    return unchanged_for > int(spec.get("leaseDurationSeconds") or 0)


class LeaderElector:
    def __init__(
        self, client: AsyncClient, config: LeaseConfig, *, clock: Callable[[], datetime] | None = None
    ):
        self.client = client
        self.config = config
        self.clock = clock or (lambda: datetime.now(UTC))
        """The wall clock, for the acquireTime and renewTime written (for people reading the Lease)."""
        self._seen: tuple[dict[str, Any], float] | None = None
        """The Lease's spec as last read, and when this process first read it so (time.monotonic)."""
        self._renewed_at = -math.inf
        """When the last successful acquire or renewal was sent (time.monotonic)."""

    async def try_acquire(self) -> bool:
        """One attempt to take or renew the Lease. True: this process leads."""
        cfg, now, sent = self.config, self.clock(), time.monotonic()
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
            self._renewed_at = sent
            return True
        spec, seen_at = lease.get("spec") or {}, time.monotonic()
        if self._seen is None or self._seen[0] != spec:
            self._seen = (spec, seen_at)
        if not lease_free_for(spec, identity=cfg.identity, unchanged_for=seen_at - self._seen[1]):
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
        self._renewed_at = sent
        if taking:
            log.info("acquired lease %s/%s as %s", cfg.namespace, cfg.name, cfg.identity)
        return True

    async def acquire(self, *, reached: Callable[[bool], None] | None = None) -> None:
        """Wait until this process leads. After each attempt, `reached` is told whether it reached
        the API server (a standby that can read the Lease is watching it). An attempt that fails in
        any way (the API, a credential plugin, a bug) is retried: a standby that exits on one would
        restart in a loop rather than wait its turn."""
        while True:
            try:
                won = await self.try_acquire()
            except Exception as err:
                log.warning("lease %s/%s: %r", self.config.namespace, self.config.name, err)
                won = None
            if reached is not None:
                reached(won is not None)
            if won:
                return
            await asyncio.sleep(max(1.0, self.config.duration_s / 5))

    async def hold(self, lost: asyncio.Event) -> None:
        """After acquire(): renew until cancelled. A renewal that fails in any way (the API, a credential
        plugin, a bug) is retried until the renew deadline; there, or once another operator holds the
        Lease, set `lost` and return."""
        cfg = self.config
        while True:
            deadline = self._renewed_at + cfg.duration_s * RENEW_DEADLINE
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("lease %s/%s could not be renewed in time: giving it up", cfg.namespace, cfg.name)
                lost.set()
                return
            await asyncio.sleep(min(cfg.duration_s / 5, left))
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    if await self.try_acquire():
                        continue
                log.error("lease %s/%s was taken by another operator", cfg.namespace, cfg.name)
                lost.set()
                return
            except Exception as err:  # TimeoutError at the deadline too
                log.warning("could not renew lease %s/%s: %r", cfg.namespace, cfg.name, err)

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
