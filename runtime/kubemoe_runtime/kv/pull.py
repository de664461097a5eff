"""The decode side of the KV hand-off: fetch a prefill's KV over HTTP (see handoff.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import httpx2

from kubemoe_runtime.kv.handoff import ENGINE_ID, PrefilledKV

log = logging.getLogger("kubemoe_runtime.kv")
PULL_TIMEOUT_S = 30.0


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
    """One connection pool for every pull this server makes."""

    def __init__(self) -> None:
        self._client: httpx2.AsyncClient | None = None

    async def pull(self, params: Mapping[str, Any]) -> PrefilledKV:
        if self._client is None:
            self._client = httpx2.AsyncClient(timeout=PULL_TIMEOUT_S)
        url = kv_url(params)
        try:
            response = await self._client.get(url)
        except httpx2.HTTPError as err:
            raise KVPullError(f"GET {url}: {type(err).__name__}: {err}") from err
        if response.status_code != 200:
            raise KVPullError(f"GET {url}: HTTP {response.status_code}")
        try:
            return await asyncio.to_thread(PrefilledKV.decode, response.content)
        except ValueError as err:
            raise KVPullError(f"GET {url}: {err}") from err
