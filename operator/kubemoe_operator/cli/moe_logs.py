"""Which pods `kubectl moe logs` reads (a role's, narrowed to a serving group or the pod running one
data-parallel rank) and the `kubectl logs` command line that reads just those. Pure: no kubectl here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kubemoe_operator.api.labels import ROUTER
from kubemoe_operator.cli.moe_status import (
    DEPLOYMENT_LABEL,
    LWS_WORKER_INDEX,
    ROLE_LABEL,
    pod_argv,
    rank_span,
)
from kubemoe_operator.render.pods import CONTAINER, LWS_GROUP_INDEX


class LogsError(RuntimeError):
    """Which pods to read cannot be told; the text is one line for the user."""


def group_indexes(pods: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Each pod's serving group, by pod name: LeaderWorkerSet's group index where a group spans pods;
    where each pod is a whole group (a Deployment), the pods in name order, 0, 1, ..."""
    out: dict[str, int] = {}
    singles = []
    for pod in pods:
        labels = pod["metadata"].get("labels") or {}
        index = labels.get(LWS_GROUP_INDEX, "")
        if index.isdigit():
            out[pod["metadata"]["name"]] = int(index)
        else:
            singles.append(pod["metadata"]["name"])
    out.update({name: i for i, name in enumerate(sorted(singles))})
    return out


def _spans(ranges: Sequence[tuple[int, int]]) -> str:
    return ", ".join(str(a) if n == 1 else f"{a}-{a + n - 1}" for a, n in sorted(set(ranges)))


def select_log_pods(
    pods: Sequence[Mapping[str, Any]], *, role: str, group: int | None, rank: int | None
) -> list[Mapping[str, Any]]:
    """A role's pods narrowed to one group and/or the pod running one data-parallel rank (of its group);
    LogsError naming what there is when nothing matches."""
    groups = group_indexes(pods)
    chosen = list(pods)
    if group is not None:
        chosen = [p for p in chosen if groups[p["metadata"]["name"]] == group]
        if not chosen:
            known = ", ".join(map(str, sorted(set(groups.values()))))
            raise LogsError(f"no {role} group {group} (groups: {known})")
    if rank is not None:
        if role == ROUTER:
            raise LogsError("--rank applies to serving roles; the router has no ranks")
        spans = {p["metadata"]["name"]: rank_span(pod_argv(p), p["metadata"].get("labels")) for p in chosen}
        holding = [p for p in chosen if (s := spans[p["metadata"]["name"]]) and s[0] <= rank < s[0] + s[1]]
        if not holding:
            ranks = _spans([s for s in spans.values() if s])
            raise LogsError(f"no {role} pod runs rank {rank} (ranks per pod: {ranks or 'unknown'})")
        chosen = holding
    return sorted(chosen, key=lambda p: (groups[p["metadata"]["name"]], p["metadata"]["name"]))


def _matches(pod: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    labels = pod["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def logs_argv(
    base: Sequence[str],
    *,
    name: str,
    role: str,
    pods: Sequence[Mapping[str, Any]],
    chosen: Sequence[Mapping[str, Any]],
    follow: bool = False,
    tail: int = -1,
    previous: bool = False,
) -> list[str]:
    """The `kubectl logs` command line for the chosen pods: one pod by name, or several by a label
    selector (deployment, role, and LeaderWorkerSet's group and worker index where those narrow it),
    with each line prefixed by its pod. LogsError when no selector picks exactly the chosen pods."""
    container = ROUTER if role == ROUTER else CONTAINER
    flags = ["-c", container, f"--tail={tail}", *(["-f"] if follow else []), *(["-p"] if previous else [])]
    if len(chosen) == 1:
        return [*base, "logs", chosen[0]["metadata"]["name"], *flags]
    wanted = {p["metadata"]["name"] for p in chosen}

    def picks(selector: Mapping[str, str]) -> set[str]:
        return {p["metadata"]["name"] for p in pods if _matches(p, selector)}

    selector = {DEPLOYMENT_LABEL: name, ROLE_LABEL: role}
    for key in (LWS_GROUP_INDEX, LWS_WORKER_INDEX):
        if picks(selector) == wanted:
            break
        values = {(p["metadata"].get("labels") or {}).get(key) for p in chosen}
        if len(values) == 1 and (value := values.pop()) is not None:
            selector[key] = value
    if picks(selector) != wanted:
        raise LogsError(
            f"no label selector picks just {', '.join(sorted(wanted))}; name one group with --group"
        )
    text = ",".join(f"{k}={v}" for k, v in selector.items())
    return [*base, "logs", "-l", text, "--prefix", f"--max-log-requests={len(chosen)}", *flags]
