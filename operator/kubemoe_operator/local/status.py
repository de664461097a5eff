"""`kubemoe status`: a local run's processes, their health (probed now) and its endpoint."""

from __future__ import annotations

import json
from collections.abc import Sequence

from kubemoe_operator.grid import grid
from kubemoe_operator.local.processes import process_alive
from kubemoe_operator.local.state import RunState
from kubemoe_operator.local.watch import is_ready


def status_rows(state: RunState) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for p in state.processes:
        alive = process_alive(state, p)
        if not alive:
            health = "exited"
        elif is_ready(p.process):
            health = "ready"
        else:
            health = "loading" if p.ready_s is None else "unhealthy"
        rows.append(
            {
                "name": p.process.name,
                "role": p.process.role,
                "group": p.process.group,
                "pod": p.process.pod,
                "ranks": p.process.ranks,
                "pid": p.pid,
                "port": p.process.port,
                "url": p.process.url,
                "state": health,
                "readySeconds": p.ready_s,
                "log": p.log,
            }
        )
    return rows


def status_json(state: RunState) -> str:
    rows = status_rows(state)
    return json.dumps(
        {
            "name": state.name,
            "model": state.model,
            "layout": state.layout,
            "mode": state.mode,
            "endpoint": state.endpoint,
            "runDir": state.run_dir,
            "ready": all(r["state"] == "ready" for r in rows),
            "processes": rows,
        },
        indent=2,
    )


def status_table(state: RunState) -> str:
    rows = status_rows(state)
    header = ("NAME", "ROLE", "GROUP", "RANKS", "PID", "PORT", "STATE", "READY(s)")
    table: list[Sequence[str]] = [header]
    for r in rows:
        ranks = r["ranks"]
        assert isinstance(ranks, list)
        table.append(
            (
                str(r["name"]),
                str(r["role"]),
                str(r["group"]),
                ",".join(map(str, ranks)) or "-",
                str(r["pid"]),
                str(r["port"]),
                str(r["state"]),
                "-" if r["readySeconds"] is None else f"{r['readySeconds']:.1f}",
            )
        )
    lines = grid(header, table[1:])
    lines += ["", f"{state.name}: {state.layout} ({state.mode})", f"endpoint: {state.endpoint}"]
    lines.append(f"logs: {state.run_dir}/logs")
    return "\n".join(lines)
