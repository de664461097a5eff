"""The decode side of the KV hand-off: fetch a prefill's KV over HTTP (see handoff.py).

The GET and the parse run together in a worker thread, with the standard library's blocking HTTP client:
it reads the body in one call into one buffer, where an asyncio client (httpx2) reads 64 KiB at a time
through h11 and joins the pieces — about three times the time on a multi-megabyte KV
(bench/bench_kv_handoff.py). The event loop stays free meanwhile; a pull opens its own connection.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
from collections.abc import Mapping
from typing import Any

from kubemoe_runtime.kv.handoff import ENGINE_ID, PrefilledKV

log = logging.getLogger("kubemoe_runtime.kv")
PULL_TIMEOUT_S = 30.0  # per socket operation (connect, each read), as an httpx timeout


class KVPullError(RuntimeError):
    """The KV could not be fetched or parsed; the decode prefills the prompt itself."""


def wants_pull(params: Mapping[str, Any] | None) -> bool:
    """kv_transfer_params that point at a torch-engine prefill's KV."""
    return bool(
        params
        and params.get("do_remote_prefill")
        and params.get("remote_engine_id") == ENGINE_ID
        and params.get("remote_handle")
        and params.get("remote_host")
        and params.get("remote_port")
    )


def kv_url(params: Mapping[str, Any]) -> str:
    host = str(params["remote_host"])
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"http://{host}:{int(params['remote_port'])}/v1/kv/{params['remote_handle']}"


class KVPuller:
    """Pulls for one server; each in a worker thread (GET, then parse)."""

    def __init__(self, *, timeout_s: float = PULL_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s

    async def pull(self, params: Mapping[str, Any]) -> PrefilledKV:
        return await asyncio.to_thread(self._pull, dict(params))

    def _pull(self, params: Mapping[str, Any]) -> PrefilledKV:
        url = kv_url(params)
        host = str(params["remote_host"]).strip("[]")
        connection = http.client.HTTPConnection(host, int(params["remote_port"]), timeout=self.timeout_s)
        try:
            connection.request("GET", f"/v1/kv/{params['remote_handle']}")
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as err:
            raise KVPullError(f"GET {url}: {type(err).__name__}: {err}") from err
        finally:
            connection.close()
        if response.status != 200:
            raise KVPullError(f"GET {url}: HTTP {response.status}")
        try:
            return PrefilledKV.decode(data)
        except ValueError as err:
            raise KVPullError(f"GET {url}: {err}") from err
