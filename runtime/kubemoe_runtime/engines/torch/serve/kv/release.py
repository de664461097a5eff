"""The prefill side of releasing a hand-off's KV early: `DELETE /v1/kv/{handle}`.

A prefill keeps a prompt's KV under its handle until a decode fetches it or it expires (KVStore's ttl_s;
handoff.py). When no decode will fetch it (the decode refused the request or could not be reached, the
client left before the decode pulled), the router asks the prefill that holds it to drop it now, so that
it does not take the store's bytes for the rest of its time to live, nor hold a draining pod up
(serve/pod.py waits while the store holds KV).

Only the router may: the request carries pod/kv_auth.py's release signature of the handle (header
KV_RELEASE_HEADER, under $KUBEMOE_KV_KEY, as the kv_transfer_params are signed), and anything else is a
403 that leaves the KV where it is. A handle the store does not hold (already fetched, expired, never
handed out) is a 404; one dropped, a 204. Either way nothing else happens, so the router's best-effort
release may come after the decode's fetch without harm.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from kubemoe_runtime.engines.torch.serve.kv.handoff import KVStore
from kubemoe_runtime.pod.api_error import ApiError
from kubemoe_runtime.pod.kv_auth import KV_KEY_ENV, KV_RELEASE_HEADER, KVAuthError, KVSigner


def release_endpoint(
    store: Callable[[], KVStore], signer: KVSigner | None
) -> Callable[[Request], Awaitable[Response]]:
    """The DELETE handler: `store()` gives the KV store (ApiError 503 while the engine cannot serve),
    `signer` checks the router's signature (None: the key is not set, and every release is refused)."""

    async def release(request: Request) -> Response:
        handle = request.path_params["handle"]
        if signer is None:
            raise ApiError(
                403,
                f"this server has no key to verify a KV release ({KV_KEY_ENV} is not set)",
                type="permission_error",
                code="kv_signature_invalid",
            )
        try:
            signer.verify_release(handle, request.headers.get(KV_RELEASE_HEADER))
        except KVAuthError as err:
            raise ApiError(
                403, f"KV release: {err}", type="permission_error", code="kv_signature_invalid"
            ) from err
        if store().take(handle) is None:
            raise ApiError(404, "no KV under this handle (expired or taken)", type="not_found_error")
        return Response(status_code=204)

    return release
