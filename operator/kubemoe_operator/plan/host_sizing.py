"""What a serving pod needs from its node besides the accelerators: CPU, memory and /dev/shm.

Every serving pod gets CPU and memory requests, so none runs BestEffort (first to be evicted
under node pressure). On GPUs the figures are floors for vLLM's per-GPU worker processes (CUDA
context, pinned buffers, tokenisation, the scheduler) plus /dev/shm, which NCCL and vLLM's
shared-memory broadcast use between a pod's ranks; /dev/shm is memory-backed, so the memory
request includes it. On the cpu accelerator each rank is a process and the memory request is
the user's (the planner sizes each rank from it). spec.roles.<role>.resources.requests.cpu and
.memory override the planned values.
"""

from __future__ import annotations

from kubemoe_operator.api.problems import Problem
from kubemoe_operator.api.quantity import milli_units
from kubemoe_operator.api.spec import RoleSpec
from kubemoe_operator.catalog.facts import GpuFacts
from kubemoe_operator.plan.model import HostPlan

CPU_PER_GPU = 4
MEMORY_PER_GPU_GIB = 16
SHM_PER_GPU_GIB = 1
CPU_PER_RANK = 1
"""cpu accelerator: one core per rank process."""
CPU_SHM = "1Gi"
"""cpu accelerator: /dev/shm of a pod (an upper bound; tmpfs holds only what is written)."""


def host_plan(*, role: RoleSpec, gpu: GpuFacts, devices_per_pod: int) -> HostPlan:
    """The planned requests of one pod of `role`, with the spec's cpu/memory requests applied."""
    given = role.resources.requests if role.resources is not None else {}
    if gpu.is_cpu:
        limits = role.resources.limits if role.resources is not None else {}
        # The planner refuses a cpu role with neither a memory request nor a limit before this runs.
        memory = given.get("memory", limits.get("memory", "0"))
        planned = HostPlan(cpu=str(CPU_PER_RANK * devices_per_pod), memory=str(memory), shm=CPU_SHM)
    else:
        shm_gib = SHM_PER_GPU_GIB * devices_per_pod
        planned = HostPlan(
            cpu=str(CPU_PER_GPU * devices_per_pod),
            memory=f"{MEMORY_PER_GPU_GIB * devices_per_pod + shm_gib}Gi",
            shm=f"{shm_gib}Gi",
        )
    overrides: dict[str, str] = {k: str(given[k]) for k in ("cpu", "memory") if k in given}
    return planned.model_copy(update=overrides)


def limit_problems(*, role_name: str, role: RoleSpec, planned: HostPlan) -> list[Problem]:
    """A cpu or memory limit below the pod's planned request: Kubernetes refuses such a pod (for a
    LeaderWorkerSet only its controller sees that, and the groups would never start)."""
    limits = role.resources.limits if role.resources is not None else {}
    problems = []
    for key, request in (("cpu", planned.cpu), ("memory", planned.memory)):
        limit = limits.get(key)
        if limit is None or milli_units(str(limit)) >= milli_units(request):
            continue
        problems.append(
            Problem(
                field=f"spec.roles.{role_name}.resources.limits.{key}",
                message=f"{limit} is below the {request} each pod requests (the plan's, or "
                f"resources.requests.{key}); Kubernetes refuses a request above its limit.",
                fix=f"raise the limit to at least {request}, or remove it.",
            )
        )
    return problems
