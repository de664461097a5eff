"""The processes `kubemoe up` runs for a plan: each pod's runtime command line, mapped to 127.0.0.1.

What a cluster gives a pod, this machine gives a process: its own port instead of :8000 on its pod IP,
127.0.0.1 for the group leader's address (LeaderWorkerSet's $(LWS_LEADER_ADDRESS)) and a free port per
group for the data-parallel rendezvous (instead of 29550). The router is told each role's group leaders
as HOST:PORT lists in place of the roles' headless Services. Each pod's accelerators (devices.py) come as
the variable its runtime reads (CUDA_VISIBLE_DEVICES; HIP_VISIBLE_DEVICES and CUDA_VISIBLE_DEVICES alike for
AMD), as a device plugin gives them.
Only pods that run `kubemoe-runtime` (the vllm and torch engines) can run here (LOCAL_ENGINES).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from kubemoe_operator.local.devices import VISIBLE_DEVICES_ENV, DeviceKey
from kubemoe_operator.plan.command import router_command
from kubemoe_operator.plan.model import Plan

LOOPBACK = "127.0.0.1"
NAMESPACE = "local"
# The engines whose pods run `kubemoe-runtime` (their command line runs here as it is); sglang and tgi
# pods run their engine's own image and launcher.
LOCAL_ENGINES = ("vllm", "torch")


class LocalProcess(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str  # e.g. decode-g0-p1
    role: str  # prefill | decode | worker | router
    group: int
    pod: int
    leader: bool
    ranks: list[int]
    port: int
    argv: list[str]
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with `flag`'s value replaced (or the flag appended)."""
    out = list(argv)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


def _kv_config(argv: list[str], *, kv_dir: Path) -> list[str]:
    """The example connector's shared directory: this run's, not the engine's default (/tmp)."""
    if "--kv-transfer-config" not in argv:
        return argv
    config = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    if config.get("kv_connector") == "ExampleConnector":
        extra = dict(config.get("kv_connector_extra_config") or {})
        extra.setdefault("shared_storage_path", str(kv_dir))
        config["kv_connector_extra_config"] = extra
    return set_flag(argv, "--kv-transfer-config", json.dumps(config, separators=(",", ":")))


def local_processes(
    plan: Plan,
    *,
    model: Path,
    runtime: str,
    router_port: int,
    kv_dir: Path,
    port: Callable[[], int] = free_port,
    base_env: dict[str, str] | None = None,
    devices: Mapping[DeviceKey, list[str]] | None = None,
) -> list[LocalProcess]:
    """Every process of the plan: each group's pods, then the router (listening on `router_port`);
    `devices` gives each pod its accelerators (devices.device_ranges), none for a cpu plan."""
    if plan.engine not in LOCAL_ENGINES:
        raise ValueError(f"engine {plan.engine}: only {' and '.join(LOCAL_ENGINES)} pods run locally")
    visible = VISIBLE_DEVICES_ENV.get(plan.resource or "")
    processes: list[LocalProcess] = []
    leaders: dict[str, list[str]] = {}
    given = {router_port}

    def distinct_port() -> int:
        """A free port no process of this run has been given: each free_port() closes its probe
        socket, so two calls can return the same port (a rank's store and its pod's HTTP port met
        once: EADDRINUSE)."""
        while (candidate := port()) in given:
            pass
        given.add(candidate)
        return candidate

    for role in plan.roles:
        for group in range(role.replicas):
            rendezvous = str(distinct_port())
            for pod in role.pods:
                pod_port = distinct_port()
                argv = [runtime, *pod.command[1:]]
                argv = set_flag(argv, "--host", LOOPBACK)
                argv = set_flag(argv, "--port", str(pod_port))
                argv = set_flag(argv, "--model", str(model))
                if "--data-parallel-address" in argv:
                    argv = set_flag(argv, "--data-parallel-address", LOOPBACK)
                    argv = set_flag(argv, "--data-parallel-rpc-port", rendezvous)
                argv = _kv_config(argv, kv_dir=kv_dir)
                env = {
                    **(base_env or {}),
                    "KUBEMOE_DEPLOYMENT": plan.name,
                    "KUBEMOE_ROLE": role.role,
                    "KUBEMOE_GROUP": str(group),
                }
                if visible is not None and devices is not None:
                    env[visible] = ",".join(devices[(role.role, group, pod.index)])
                    if plan.resource == "amd.com/gpu":  # not the user's: vLLM (ROCm) wants it == HIP's
                        env["CUDA_VISIBLE_DEVICES"] = env[visible]
                processes.append(
                    LocalProcess(
                        name=f"{role.role}-g{group}-p{pod.index}",
                        role=role.role,
                        group=group,
                        pod=pod.index,
                        leader=pod.leader,
                        ranks=[r.rank for r in pod.ranks],
                        port=pod_port,
                        argv=argv,
                        env=env,
                    )
                )
                if pod.leader:
                    leaders.setdefault(role.role, []).append(f"{LOOPBACK}:{pod_port}")
    argv = [runtime, *router_command(plan=plan, namespace=NAMESPACE)[1:]]
    argv = set_flag(argv, "--host", LOOPBACK)
    argv = set_flag(argv, "--port", str(router_port))
    for role_name, addresses in leaders.items():
        argv = set_flag(argv, f"--{role_name}-service", ",".join(addresses))
    processes.append(
        LocalProcess(
            name="router",
            role="router",
            group=0,
            pod=0,
            leader=True,
            ranks=[],
            port=router_port,
            argv=argv,
            env={**(base_env or {}), "KUBEMOE_DEPLOYMENT": plan.name, "KUBEMOE_ROLE": "router"},
        )
    )
    return processes


def roles_in_order(processes: Sequence[LocalProcess]) -> list[str]:
    seen: list[str] = []
    for p in processes:
        if p.role not in seen:
            seen.append(p.role)
    return seen
