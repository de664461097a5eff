"""The KV hand-off's authentication: servers act only on kv_transfer_params the router signed.

kv_transfer_params tell a prefill to keep a prompt's KV (`do_remote_decode`) and a decode where to fetch
it from (`remote_host`, `remote_port`, `remote_handle`). Taken from any client, they would make the decode
open a connection to a host and port of the client's choosing. So the router, which alone sets them (it
drops whatever a client sent), signs each set it forwards with HMAC-SHA256 under a per-deployment key,
and a server refuses (400) any it cannot verify.

The key is the environment variable KUBEMOE_KV_KEY (from a Secret; the same value on the router and on
every prefill and decode pod; at least MIN_KEY_BYTES bytes, e.g. `openssl rand -hex 32`). Without it:
  - a server refuses every kv_transfer_params (400): none can be verified;
  - a disaggregated router does not start (it could not sign the hand-off); a colocated router needs no key.

The signature (`kubemoe_signature`, hex) covers the canonical JSON of all the other keys, so no field can
be changed, added or dropped. A replay gains nothing: a handle is read once, and the pulled KV must match
the request's prompt (handoff.prompt_digest).

Releasing a handle's KV early (`DELETE /v1/kv/{handle}` from the router to the prefill that holds it, when
no decode will fetch it: engines/torch/serve/kv/release.py) is signed too, so that no one else can drop
other requests' KV: the header KV_RELEASE_HEADER carries the HMAC-SHA256 of the handle under the same key
(`sign_release`), in a domain of its own, so it is never valid as kv_transfer_params' signature nor they
as it. A replay can only drop the handle the router already dropped.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping
from typing import Any, Final

DECODE_MAX_TOKENS = "kubemoe_decode_max_tokens"
"""In a prefill's kv_transfer_params (signed, by the router): the completion tokens the decode will be
asked for, so that a prefill refuses up front what the decode would refuse for its length."""
KV_KEY_ENV: Final = "KUBEMOE_KV_KEY"
SIGNATURE_FIELD: Final = "kubemoe_signature"
MIN_KEY_BYTES: Final = 16
KV_RELEASE_HEADER: Final = "x-kubemoe-kv-signature"
"""On `DELETE /v1/kv/{handle}`: `KVSigner.sign_release(handle)`."""
KV_HANDLE = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""What a handle may be (a torch prefill hands out secrets.token_urlsafe(16)): safe in a URL path."""
_DOMAIN: Final = b"kubemoe-kv-transfer-params-v1\n"
_RELEASE_DOMAIN: Final = b"kubemoe-kv-release-v1\n"


class KVAuthError(ValueError):
    """kv_transfer_params that are not signed with this deployment's key."""


class KVSigner:
    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(
                f"{KV_KEY_ENV} has {len(key)} bytes; use at least {MIN_KEY_BYTES} random bytes "
                "(e.g. `openssl rand -hex 32`)"
            )
        self._key = key

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KVSigner | None:
        """The deployment's signer, or None when KUBEMOE_KV_KEY is unset or empty."""
        value = (os.environ if environ is None else environ).get(KV_KEY_ENV, "")
        return cls(value.encode()) if value else None

    def sign(self, params: Mapping[str, Any]) -> dict[str, Any]:
        unsigned = {k: v for k, v in params.items() if k != SIGNATURE_FIELD}
        return {**unsigned, SIGNATURE_FIELD: self._digest(unsigned)}

    def verify(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The params without their signature; KVAuthError unless it is this key's."""
        signature = params.get(SIGNATURE_FIELD)
        if not isinstance(signature, str):
            raise KVAuthError("not signed by the router (kv_transfer_params are set by the router only)")
        if not signature.isascii():  # a signature is hex; a lone surrogate would not even encode
            raise KVAuthError("the signature does not match (not signed with this deployment's key)")
        unsigned = {k: v for k, v in params.items() if k != SIGNATURE_FIELD}
        try:
            expected = self._digest(unsigned)
        except ValueError as err:  # NaN or Infinity in a value: never signed
            raise KVAuthError(f"cannot be verified: {err}") from err
        except RecursionError as err:  # nested deeper than the router ever signs
            raise KVAuthError("cannot be verified: nested too deeply") from err
        if not hmac.compare_digest(signature.encode("ascii"), expected.encode("ascii")):
            raise KVAuthError("the signature does not match (not signed with this deployment's key)")
        return unsigned

    def sign_release(self, handle: str) -> str:
        """The KV_RELEASE_HEADER value that lets `DELETE /v1/kv/{handle}` drop the handle's KV; ValueError
        for a handle not of KV_HANDLE."""
        if not KV_HANDLE.fullmatch(handle):
            raise ValueError(f"{handle[:80]!r} is not a KV handle")
        return hmac.new(self._key, _RELEASE_DOMAIN + handle.encode("ascii"), hashlib.sha256).hexdigest()

    def verify_release(self, handle: str, signature: str | None) -> None:
        """KVAuthError unless `signature` is this key's `sign_release(handle)`."""
        if signature is None:
            raise KVAuthError(f"not signed by the router (no {KV_RELEASE_HEADER} header)")
        if not KV_HANDLE.fullmatch(handle) or not signature.isascii():
            raise KVAuthError("the signature does not match (not signed with this deployment's key)")
        if not hmac.compare_digest(signature.encode("ascii"), self.sign_release(handle).encode("ascii")):
            raise KVAuthError("the signature does not match (not signed with this deployment's key)")

    def _digest(self, unsigned: Mapping[str, Any]) -> str:
        canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hmac.new(self._key, _DOMAIN + canonical.encode(), hashlib.sha256).hexdigest()
