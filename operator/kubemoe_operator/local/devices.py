"""Which accelerators each pod of a local run gets: what a cluster's device plugin does for a pod.

Every pod (group g, pod p of a role) gets its own range of the machine's devices, in plan order, through
the variable its runtime reads (CUDA_VISIBLE_DEVICES for nvidia.com/gpu, HIP_VISIBLE_DEVICES for
amd.com/gpu, and CUDA_VISIBLE_DEVICES with the same value: vLLM's ROCm platform refuses the two when they
differ); a plan needing more than the machine has is refused before anything starts. The devices are the
ones the user's environment already lists (CUDA_VISIBLE_DEVICES for NVIDIA; HIP_VISIBLE_DEVICES, else
CUDA_VISIBLE_DEVICES, else ROCR_VISIBLE_DEVICES for AMD), else the machine's (`nvidia-smi -L`, else
/dev/nvidia0..N; AMD: the GPU nodes of the kfd topology). cpu plans (resource None) take none.
"""

from __future__ import annotations

import contextlib
import glob
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from kubemoe_operator.plan.model import Plan

# (role, group, pod index) -> the device ids that pod sees.
DeviceKey = tuple[str, int, int]
VISIBLE_DEVICES_ENV = {"nvidia.com/gpu": "CUDA_VISIBLE_DEVICES", "amd.com/gpu": "HIP_VISIBLE_DEVICES"}
# Where AMD's user-chosen devices are read, first found first. ROCR_VISIBLE_DEVICES narrows what HIP sees
# (HIP's ids count from 0 within it), so each pod keeps it and gets positions in it.
AMD_DEVICE_ENVS = ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
KFD = Path("/dev/kfd")
KFD_NODES = Path("/sys/class/kfd/kfd/topology/nodes")
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
    for name in AMD_DEVICE_ENVS if resource == "amd.com/gpu" else (variable,):
        if name in environ:
            listed = [d.strip() for d in environ[name].split(",") if d.strip()]
            if name == "ROCR_VISIBLE_DEVICES":
                listed = [str(i) for i in range(len(listed))]
            return listed, f"{name}={environ[name]}"
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
    return [str(i) for i in range(amd_gpu_count())], f"{KFD_NODES}/*/properties"


def amd_gpu_count(kfd: Path = KFD, nodes: Path = KFD_NODES) -> int:
    """The AMD GPUs the ROCm driver (amdgpu's kfd) offers: its topology's nodes with a gfx_target_version
    (CPU nodes have 0), as HIP counts them; 0 without /dev/kfd. (/dev/dri/renderD* is not that: every
    display driver's render node is one, an Intel or NVIDIA GPU's too.)"""
    if not kfd.exists():
        return 0
    count = 0
    for properties in nodes.glob("*/properties"):
        with contextlib.suppress(OSError, ValueError):
            fields = dict(
                line.split(maxsplit=1) for line in properties.read_text().splitlines() if " " in line
            )
            count += int(fields.get("gfx_target_version", "0")) != 0
    return count
