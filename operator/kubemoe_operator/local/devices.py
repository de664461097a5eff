"""Which accelerators each pod of a local run gets: what a cluster's device plugin does for a pod.

Every pod (group g, pod p of a role) gets its own range of the machine's devices, in plan order, through
the variable its runtime reads (CUDA_VISIBLE_DEVICES for nvidia.com/gpu, HIP_VISIBLE_DEVICES for
amd.com/gpu); a plan needing more than the machine has is refused before anything starts. The devices
are the ones the variable already lists where it is set (the user's own choice), else the machine's
(`nvidia-smi -L`, else /dev/nvidia0..N; /dev/dri/renderD* for AMD). cpu plans (resource None) take none.
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from kubemoe_operator.plan.model import Plan

# (role, group, pod index) -> the device ids that pod sees.
DeviceKey = tuple[str, int, int]
VISIBLE_DEVICES_ENV = {"nvidia.com/gpu": "CUDA_VISIBLE_DEVICES", "amd.com/gpu": "HIP_VISIBLE_DEVICES"}
NVIDIA_SMI_TIMEOUT_S = 20.0


class DeviceShortageError(ValueError):
    pass


def device_ranges(plan: Plan, available: Sequence[str], *, source: str = "") -> dict[DeviceKey, list[str]]:
    """Each pod's devices, disjoint, in plan order (roles, then groups, then pods): the first pod takes
    the first pod.devices of `available`, and so on. Empty for a cpu plan. DeviceShortageError naming
    what the plan needs per role and what there is (`source`: where `available` came from)."""
    if plan.resource is None:
        return {}
    if plan.resource not in VISIBLE_DEVICES_ENV:
        raise DeviceShortageError(
            f"kubemoe up cannot give {plan.resource} devices to processes (it knows"
            f" {', '.join(VISIBLE_DEVICES_ENV)}); run this manifest on a cluster"
        )
    ranges: dict[DeviceKey, list[str]] = {}
    taken = 0
    needs: list[str] = []
    for role in plan.roles:
        per_group = sum(pod.devices for pod in role.pods)
        needs.append(f"{role.role} {role.replicas}x{per_group}")
        for group in range(role.replicas):
            for pod in role.pods:
                ranges[(role.role, group, pod.index)] = list(available[taken : taken + pod.devices])
                taken += pod.devices
    if taken > len(available):
        where = f" ({source})" if source else ""
        raise DeviceShortageError(
            f"the plan needs {taken} {plan.resource} devices ({', '.join(needs)}: groups x devices per"
            f" group) and this machine has {len(available)}{where}; lower spec.roles.<role>.replicas or"
            " parallelism (or accelerator.perPod) to fit, or run it on a cluster"
        )
    return ranges


def machine_devices(resource: str | None, environ: Mapping[str, str]) -> tuple[list[str], str]:
    """The device ids of `resource` this machine offers, and where that was read; ([], "") for cpu."""
    variable = VISIBLE_DEVICES_ENV.get(resource or "")
    if variable is None:
        return [], ""
    if variable in environ:
        listed = [d.strip() for d in environ[variable].split(",") if d.strip()]
        return listed, f"{variable}={environ[variable]}"
    if resource == "nvidia.com/gpu":
        smi = shutil.which("nvidia-smi")
        if smi is not None:
            try:
                out = subprocess.run(
                    [smi, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False
                ).stdout
            except (OSError, subprocess.TimeoutExpired):
                out = ""
            count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
            if count:
                return [str(i) for i in range(count)], "nvidia-smi -L"
        nodes = [p for p in glob.glob("/dev/nvidia[0-9]*") if re.fullmatch(r"/dev/nvidia\d+", p)]
        return [str(i) for i in range(len(nodes))], "/dev/nvidia[0-9]*"
    nodes = glob.glob("/dev/dri/renderD*")
    return [str(i) for i in range(len(nodes))], "/dev/dri/renderD*"
