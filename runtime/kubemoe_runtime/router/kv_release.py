"""Releasing a P/D hand-off's KV that no decode will fetch.

A torch prefill keeps a prompt's KV under the handle it answered (kv_transfer_params' `remote_handle`)
until a decode fetches it, or for about a minute (engines/torch/serve/kv/handoff.py). When the decode
refuses the request (any answer but a 2xx), none can be reached, the request times out, or the client
leaves before the decode has answered, no decode will fetch it. The router then sends the prefill it
asked (the backend address it dialled, not the host named in the answer) `DELETE /v1/kv/{handle}`,
signed (pod/kv_auth.py: KVSigner.sign_release), so that the KV does not take the prefill's bytes for the
rest of its time to live. A decode that did fetch it already makes this a harmless 404.

Best effort, off the client's path: each release runs as a task of its own once the decode's answer (or
its failure) is known, bounded by RELEASE_TIMEOUT_S; a failure is logged, never raised. At most
MAX_PENDING run at once (past that a release is skipped, and the KV expires as before); the router's
shutdown waits for those under way, each within its bound. Prefills whose answers name no handle (vLLM's
connectors move the KV themselves) have nothing to release.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from kubemoe_runtime.pod.kv_auth import KV_HANDLE, KV_RELEASE_HEADER, KVSigner
from kubemoe_runtime.router.upstream import Upstream, UpstreamError, UpstreamTimeout

log = logging.getLogger("kubemoe_runtime.router")
RELEASE_TIMEOUT_S = 5.0  # one DELETE: connect, send, the answer
MAX_PENDING = 1024  # releases under way at once


def held_handle(params: Mapping[str, Any]) -> str | None:
    """The handle a prefill keeps the KV under, from the kv_transfer_params it answered; None if it
    names none (or none that could go into a URL)."""
    handle = params.get("remote_handle")
    return handle if isinstance(handle, str) and KV_HANDLE.fullmatch(handle) else None


class KVReleaser:
    def __init__(self, upstream: Upstream, *, timeout_s: float = RELEASE_TIMEOUT_S) -> None:
        self.upstream = upstream
        self.timeout_s = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        """Releases under way."""
        return len(self._tasks)

    def release(self, signer: KVSigner, address: str, handle: str, *, why: str) -> None:
        """Have the prefill at `address` drop `handle`'s KV, in the background (`why`: for the log)."""
        if len(self._tasks) >= MAX_PENDING:
            log.warning(
                "router: %d KV releases under way; this one's KV on %s expires instead", MAX_PENDING, address
            )
            return
        task = asyncio.get_running_loop().create_task(self._release(signer, address, handle, why=why))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, signer: KVSigner, address: str, handle: str, *, why: str) -> None:
        headers = {KV_RELEASE_HEADER: signer.sign_release(handle)}
        shown = f"{handle[:6]}..."  # a handle lets anyone fetch its KV: not whole into the log
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        try:
            async with asyncio.timeout(self.timeout_s):  # the whole DELETE, the connect included
                response = await self.upstream.request(
                    "DELETE", address, f"/v1/kv/{handle}", b"", headers, deadline=deadline
                )
                try:
                    await response.read()
                finally:
                    await response.aclose()
        except (UpstreamError, UpstreamTimeout, TimeoutError) as err:
            log.warning(
                "router: releasing KV %s on %s (%s) failed: %s", shown, address, why, err or "timeout"
            )
            return
        if response.status not in (204, 404):  # 404: fetched meanwhile, or expired
            log.warning("router: releasing KV %s on %s (%s): HTTP %d", shown, address, why, response.status)

    async def aclose(self) -> None:
        """Wait for the releases under way (each bounded by its timeout)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.timeout_s + 1)
