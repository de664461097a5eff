"""The fill's failures: FillError (its message already one line), and any error explained as one line
that names the fix; the termination log, where the operator reads that line without reading logs."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

from kubemoe_runtime.pod.messages import one_line
from kubemoe_runtime.tools.model_cache.hub import endpoint

if TYPE_CHECKING:
    from kubemoe_runtime.tools.model_cache.source import Source

TERMINATION_LOG: Final = "/dev/termination-log"
TERMINATION_LOG_ENV: Final = "KUBEMOE_TERMINATION_LOG"


class FillError(Exception):
    """A failure with its one-line explanation (what went wrong and what to do)."""


class UsageError(FillError):
    """A bad --source or --dir: exit 2."""


def explain(err: BaseException, source: Source | None, directory: Path) -> str:
    """One line: what went wrong and what to do."""
    if isinstance(err, FillError):
        return str(err) if isinstance(err, UsageError) else f"{source}: {err}"
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token = "HF_TOKEN is set" if os.environ.get("HF_TOKEN") else "HF_TOKEN is not set"
    where = f"{source} on {endpoint()}"
    if isinstance(err, GatedRepoError):
        return (
            f"{where} is gated ({_status(err)}; {token}): accept its terms on the model's Hub page with "
            f"the account of a token, and give that token as HF_TOKEN (credentialsSecret)"
        )
    if isinstance(err, RevisionNotFoundError):
        return f"{where}: no such revision ({_status(err)}): give a branch, tag or commit the repository has"
    if isinstance(err, RepositoryNotFoundError):
        return (
            f"{where}: no such model repository ({_status(err)}; {token}): check ORG/NAME; a private "
            f"model needs HF_TOKEN with a token that can read it"
        )
    if isinstance(err, RemoteEntryNotFoundError):
        return f"{where}: a listed file is gone ({_status(err)}): the repository changed meanwhile: run again"
    if isinstance(err, HfHubHTTPError) and getattr(err.response, "status_code", None) == 401:
        return f"{where}: the Hub refused the token ({_status(err)}; {token}): set HF_TOKEN to a valid token"
    if (transport := _transport_error(err)) is not None:
        return (
            f"cannot reach the Hub at {endpoint()} ({type(transport).__name__}: {one_line(transport)}): "
            f"check the pod's network (egress, proxy) or HF_ENDPOINT; run again (the fill resumes)"
        )
    if isinstance(err, HfHubHTTPError):
        return (
            f"{where}: the Hub answered {_status(err)}: {one_line(err)[:300]}; run again later "
            f"(the fill resumes)"
        )
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{directory}: the volume is full ({err.strerror}): give it more space than the model's size "
            f"(the progress says bytesTotal); run again (the fill resumes)"
        )
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"{one_line(err)}: {directory} must be writable by this process (uid {os.getuid()}): "
            f"check the volume's permissions (fsGroup) or mount"
        )
    return f"{source}: {type(err).__name__}: {one_line(err)}"


def _status(err: BaseException) -> str:
    response = getattr(err, "response", None)
    code = getattr(response, "status_code", None)
    return f"HTTP {code}" if code is not None else type(err).__name__


def _transport_error(err: BaseException) -> BaseException | None:
    """The connection error (refused, timed out, DNS, TLS) somewhere in `err`'s causes, if any."""
    import httpx2

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, httpx2.TransportError | ConnectionError | TimeoutError):
            return current
        current = current.__cause__ or current.__context__
    return None


def write_termination_log(line: str) -> None:
    """Kubernetes' terminationMessagePath, when there is one to write (the kubelet mounts it)."""
    path = os.environ.get(TERMINATION_LOG_ENV) or TERMINATION_LOG
    if os.path.isfile(path) and os.access(path, os.W_OK):
        with contextlib.suppress(OSError), open(path, "w") as log:
            log.write(line + "\n")
