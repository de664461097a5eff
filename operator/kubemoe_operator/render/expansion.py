"""User strings in a container's arguments, kept literal through the kubelet's `$(VAR)` expansion.

The kubelet expands `$(VAR)` in a container's command and args (and turns `$$` into `$`), so an
extraArgs entry, model name or path that holds `$(...)` would reach the process changed, or carrying
another variable's value. Every `$` is doubled, which the kubelet turns back into the `$` written; the
references the operator means to expand are kept: LeaderWorkerSet's $(LWS_LEADER_ADDRESS) after
--data-parallel-address (vLLM) and in --dist-init-addr (SGLang), and $(LWS_WORKER_INDEX) after
--node-rank (SGLang).
"""

from __future__ import annotations

from kubemoe_operator.plan.command import LWS_LEADER_ADDRESS, LWS_WORKER_INDEX, SGLANG_DIST_INIT_PORT

OPERATOR_REFERENCES = {
    "--data-parallel-address": LWS_LEADER_ADDRESS,
    "--dist-init-addr": f"{LWS_LEADER_ADDRESS}:{SGLANG_DIST_INIT_PORT}",
    "--node-rank": LWS_WORKER_INDEX,
}


def literal(value: str) -> str:
    """`value` as the kubelet must be given it to pass it on unchanged."""
    return value.replace("$", "$$")


def container_argv(argv: list[str]) -> list[str]:
    """`argv` with every user string made literal and the operator's own references kept."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        flag = argv[i - 1] if i else ""
        out.append(arg if OPERATOR_REFERENCES.get(flag) == arg else literal(arg))
    return out
