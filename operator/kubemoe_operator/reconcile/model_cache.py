"""model.cache in a reconcile: has the fill Job succeeded, how far has it got, and what waits for it.

Until the Job has succeeded, the serving workloads are held: not created (the first start), or kept
as they run with the router (a new source is filling: the groups serve the old one until the new one
is complete, then roll; held()). Everything else (Services, the claim, the Job) is applied as usual.
Progress comes from the fill pod itself (GET /progress on render/model_cache.FILL_PORT, what
`kubemoe-runtime fill-cache` serves), read by the operator while the pod runs; the pod's
termination message says why a try failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kubemoe_operator.api.labels import LABEL_ROLE, ROUTER
from kubemoe_operator.api.status import ModelCacheStatus
from kubemoe_operator.kube.kinds import ChildKey
from kubemoe_operator.reconcile.pod_http import PodReader, count, human_bytes
from kubemoe_operator.render.model_cache import CACHE_ROLE, FILL_CONTAINER, FILL_PORT

WORKLOAD_KINDS = frozenset({"Deployment", "LeaderWorkerSet"})


def fill_job_of(desired: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return next((obj for obj in desired if obj["kind"] == "Job"), None)


def _condition(job: Mapping[str, Any], type: str) -> bool:
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(c.get("type") == type and c.get("status") == "True" for c in conditions)


def job_phase(job: Mapping[str, Any] | None) -> str:
    """Filled (the Job completed), Failed (it gave up) or Filling (anything else, not created too)."""
    if job is None:
        return "Filling"
    if _condition(job, "Complete") or ((job.get("status") or {}).get("succeeded") or 0) > 0:
        return "Filled"
    if _condition(job, "Failed"):
        return "Failed"
    return "Filling"


def held(
    desired: list[dict[str, Any]], observed: Mapping[ChildKey, Any]
) -> tuple[list[dict[str, Any]], set[ChildKey]]:
    """(`desired` without the workloads that wait for the fill, the keys of live ones kept as they run).

    First start (no serving workload runs): the serving workloads are not created; the router is
    applied (it answers 503 until a group is ready). A new source filling (serving workloads run):
    every live workload, the router's too, is kept exactly as it runs and none is pruned, even one
    the new render no longer names (a Deployment that becomes a LeaderWorkerSet), so the old groups
    and the router that knows their model serve until the new source is complete; then all roll.
    """
    live = {key for key, obj in observed.items() if key[0] in WORKLOAD_KINDS}
    refill = any(_role(observed[key]) != ROUTER for key in live)
    out = []
    for obj in desired:
        if obj["kind"] in WORKLOAD_KINDS and (refill or _role(obj) != ROUTER):
            continue
        out.append(obj)
    return out, live if refill else set()


def _role(obj: Mapping[str, Any]) -> str | None:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    role = labels.get(LABEL_ROLE)
    return None if role is None else str(role)


def fill_pods(job: str, pods: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The Job's pods among the deployment's, newest first."""
    mine = [
        p
        for p in pods
        if (p.get("metadata", {}).get("labels") or {}).get(LABEL_ROLE) == CACHE_ROLE
        and (p.get("metadata", {}).get("labels") or {}).get("job-name") == job
    ]
    return sorted(mine, key=lambda p: p.get("metadata", {}).get("creationTimestamp") or "", reverse=True)


def last_failure(pods: Iterable[Mapping[str, Any]]) -> str | None:
    """The newest termination message of a failed fill container (its one-line error)."""
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if cs.get("name") != FILL_CONTAINER:
                continue
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                done = state.get("terminated") or {}
                if done.get("exitCode") not in (None, 0) and done.get("message"):
                    return str(done["message"]).strip().splitlines()[-1][:512]
    return None


def progress_fields(body: Mapping[str, Any] | None) -> dict[str, Any]:
    """bytes, bytesTotal, files, filesTotal from GET /progress, each only when it is a sane count."""
    if not isinstance(body, Mapping):
        return {}
    out = {}
    for key, field in (
        ("bytes", "bytes"),
        ("bytesTotal", "bytes_total"),
        ("files", "files"),
        ("filesTotal", "files_total"),
    ):
        n = count(body.get(key))
        if n is not None:
            out[field] = n
    return out


def describe(cache: ModelCacheStatus) -> str:
    """One line for conditions and `kubectl moe status`: what the fill is doing, with its numbers."""
    if cache.phase == "Filled":
        return f"model cached in claim {cache.claim}"
    if cache.phase == "Failed":
        return f"filling the model cache failed (Job {cache.job}): {cache.message or 'see its pod logs'}"
    parts = []
    if cache.bytes_total:
        share = 100 * (cache.bytes or 0) / cache.bytes_total
        parts.append(f"{human_bytes(cache.bytes or 0)} of {human_bytes(cache.bytes_total)} ({share:.0f}%)")
    if cache.files_total:
        parts.append(f"{cache.files or 0}/{cache.files_total} files")
    done = ", ".join(parts) if parts else "starting"
    return f"filling the model cache in claim {cache.claim} (Job {cache.job}): {done}"


async def cache_status(
    *,
    job: Mapping[str, Any],
    live: Mapping[str, Any] | None,
    claim: str,
    pods: Iterable[Mapping[str, Any]],
    read_pod: PodReader | None,
) -> ModelCacheStatus:
    """status.cache from the Job as the cluster holds it (`live`, None before it exists) and its pods."""
    name = str(job["metadata"]["name"])
    phase = job_phase(live)
    mine = fill_pods(name, pods)
    fields: dict[str, Any] = {}
    if phase == "Filling" and read_pod is not None:
        running = [p for p in mine if (p.get("status") or {}).get("phase") == "Running"]
        ip = (running[0].get("status") or {}).get("podIP") if running else None
        if ip:
            fields = progress_fields(await read_pod(str(ip), FILL_PORT, "/progress"))
    message = last_failure(mine) if phase != "Filled" else None
    cache = ModelCacheStatus(phase=phase, job=name, claim=claim, message=message or "", **fields)
    return cache.model_copy(update={"message": describe(cache)})
