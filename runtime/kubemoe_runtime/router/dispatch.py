"""Sending one request to a backend of a role: the role's policy picks among its healthy backends, and a
request is retried on another one when the first refuses the connection, drops it before answering, or
answers 503 (that backend is ejected at once, until a health probe passes; backends.py), except a 503
`queue_full`: that backend is busy, not down, and stays in rotation (ejecting busy backends would empty a
loaded role, and take the router's own /ready down with it). A 502 or 504 is counted against its backend
and retried too; any other answer is the request's; when every backend refused, the last refusal is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from kubemoe_runtime.pod.api_error import ApiError
from kubemoe_runtime.router.backends import Backend, Backends
from kubemoe_runtime.router.policies import Policy
from kubemoe_runtime.router.upstream import Upstream, UpstreamError, UpstreamResponse

RETRY_STATUS = frozenset({502, 503, 504})


def is_busy(body: bytes) -> bool:
    """Whether a 503's body is an OpenAI-shaped error with code `queue_full` (the engine's waiting queue is
    full, or it is tokenizing too many long prompts): a busy backend, not a broken one."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):  # not JSON, or not an object
        return False
    return isinstance(error, dict) and error.get("code") == "queue_full"


class BackendAnswer:
    """A backend's answer: either fully read (`body`) or open for streaming (`response`)."""

    def __init__(self, backend: Backend, response: UpstreamResponse, *, body: bytes | None) -> None:
        self.backend = backend
        self.response = response
        self.body = body

    @property
    def status(self) -> int:
        return self.response.status


class Dispatcher:
    def __init__(
        self, *, backends: Backends, policies: Mapping[str, Policy], upstream: Upstream, max_attempts: int
    ) -> None:
        self.backends = backends
        self.policies = policies
        self.upstream = upstream
        self.max_attempts = max_attempts

    def pick(self, role: str, *, key: str, exclude: set[str]) -> Backend | None:
        candidates = [b for b in self.backends.pool(role).healthy() if b.address not in exclude]
        if not candidates:
            return None
        return candidates[self.policies[role].choose(candidates, key=key)]

    async def send(
        self,
        role: str,
        content: bytes,
        *,
        endpoint: str,
        key: str,
        headers: dict[str, str],
        stream: bool,
        deadline: float,
        method: str = "POST",
        relay_any_status: bool = False,
    ) -> BackendAnswer:
        """POST (or `method`) to a backend of `role`, moving on to another one after a transport failure or
        a 503 (either ejects the backend at once: it is down or terminating; a health probe re-admits it;
        a 503 `queue_full` only moves on: that backend is busy). `stream`: a 200 answer comes back open,
        its body unread (and, `relay_any_status`, any answer not retried); whoever relays it then releases
        the backend (`outstanding`) and the connection."""
        tried: set[str] = set()
        last: BackendAnswer | None = None
        for _ in range(self.max_attempts):
            backend = self.pick(role, key=key, exclude=tried)
            if backend is None:
                break
            tried.add(backend.address)
            backend.outstanding += 1
            keep_open = False
            try:
                response = await self.upstream.request(
                    method, backend.address, endpoint, content, headers, deadline=deadline
                )
                if stream and (
                    response.status == 200 or (relay_any_status and response.status not in RETRY_STATUS)
                ):
                    keep_open = True  # the relay releases the backend when the stream ends
                    return BackendAnswer(backend, response, body=None)
                try:
                    data = await response.read()
                finally:  # closed unless read to its end (a timeout, the client gone)
                    await response.aclose()
            except UpstreamError as err:
                self.backends.eject(backend, reason=err.kind)
                continue
            finally:
                if not keep_open:
                    backend.outstanding -= 1
            last = BackendAnswer(backend, response, body=data)
            if response.status not in RETRY_STATUS:
                return last
            if response.status == 503 and not is_busy(data):
                self.backends.eject(backend, reason="503")
            else:
                self.backends.count_error(
                    backend, kind="busy" if response.status == 503 else str(response.status)
                )
        if last is not None:
            return last
        raise ApiError(
            503,
            f"no healthy {role} backend answered ({len(tried)} tried)",
            type="server_error",
            code="no_backend",
            retry_after=1,  # backends come back as health probes pass (every few seconds)
        )
