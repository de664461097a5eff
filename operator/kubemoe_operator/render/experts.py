"""spec.experts in a serving pod: the engine's expert-placement flags, and for the torch engine the
placement its pods load at start (docs/expert-load.md). Only expert-parallel roles take part.

torch: `--redundant-experts N` (each rank allocates its (E + N) / EP slots from the start) and
`--expert-placement`, a file of the role's ConfigMap (names.experts_configmap_name), which the
operator's rebalance loop creates and rewrites, never render. The volume is optional: until the
loop writes it the file is absent and the pods start with the default placement. Only the
placement of the pods' own layout is projected (placement_key), as placement.json; the ConfigMap's
records of the load and of past rebalances stay out of the pods. The directory, not the file, is
mounted (no subPath), so the kubelet keeps it current.

vLLM: `--enable-eplb` and `--eplb-config` with the redundant slots and the load window and interval
the planner counted (planner.vllm_eplb_step_interval): vLLM places, measures and rearranges its
experts itself; no ConfigMap is mounted.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kubemoe_operator.api.spec import ModelDeploymentSpec
from kubemoe_operator.plan.model import RolePlan
from kubemoe_operator.plan.planner import VLLM_EPLB_WINDOW_STEPS, vllm_eplb_step_interval
from kubemoe_operator.render.names import experts_configmap_name

EXPERTS_VOLUME = "experts"
EXPERTS_DIR = "/etc/kubemoe/experts"
PLACEMENT_FILE = "placement.json"
"""The file, in the pods, holding the placement document they load at start."""
PLACEMENT_PATH = f"{EXPERTS_DIR}/{PLACEMENT_FILE}"
PLACEMENT_KEY_PREFIX = "placement-"


def placement_key(*, ranks: int, slots_per_rank: int, source: str) -> str:
    """The ConfigMap key of the placement for one layout: the group's expert-parallel ranks, the
    slots of each, and the model (spec.model.source). A pod reads only its own layout's key, so
    after a change of spec.experts.redundant, of the role's parallelism or of the model, the new
    pods start with the default placement (their key is not written yet) instead of refusing the
    old layout's, and the rebalancer writes theirs once every group runs the new layout."""
    return f"{PLACEMENT_KEY_PREFIX}{ranks}x{slots_per_rank}-{model_digest(source)}.json"


def model_digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:12]


def balanced(spec: ModelDeploymentSpec, role: RolePlan) -> bool:
    """Whether `role` takes part in expert placement: spec.experts is set and the role is expert-parallel."""
    return spec.experts is not None and role.expert_parallel


def eplb_config(*, redundant: int, interval_seconds: int) -> str:
    """vLLM's --eplb-config (vllm.config.parallel.EPLBConfig's fields, as JSON)."""
    config = {
        "num_redundant_experts": redundant,
        "window_size": VLLM_EPLB_WINDOW_STEPS,
        "step_interval": vllm_eplb_step_interval(interval_seconds),
    }
    return json.dumps(config, separators=(",", ":"))


def expert_args(spec: ModelDeploymentSpec, role: RolePlan) -> list[str]:
    """The engine flags spec.experts sets for `role`: none unless it is expert-parallel."""
    if spec.experts is None or not role.expert_parallel or spec.engine.kind not in ("vllm", "torch"):
        return []
    if spec.engine.kind == "vllm":
        interval = spec.experts.rebalance.interval_seconds
        config = eplb_config(redundant=role.redundant_experts, interval_seconds=interval)
        return ["--enable-eplb", "--eplb-config", config]
    return ["--redundant-experts", str(role.redundant_experts), "--expert-placement", PLACEMENT_PATH]


def expert_volumes(
    *, owner: str, spec: ModelDeploymentSpec, role: RolePlan
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, volumeMounts) of the placement file, for the torch engine's expert-parallel roles."""
    if not balanced(spec, role) or spec.engine.kind != "torch":
        return [], []
    key = placement_key(ranks=role.data, slots_per_rank=role.slots_per_rank, source=spec.model.source)
    source = {
        "name": experts_configmap_name(owner, role.role),
        "optional": True,
        "items": [{"key": key, "path": PLACEMENT_FILE}],
    }
    volume = {"name": EXPERTS_VOLUME, "configMap": source}
    mount = {"name": EXPERTS_VOLUME, "mountPath": EXPERTS_DIR, "readOnly": True}
    return [volume], [mount]


def with_expert_args(command: list[str], *, extra: list[str], args: list[str]) -> list[str]:
    """The plan's pod `command` with `args` before the user's `extra` arguments (which end it), so
    that the plan's flags come first and the user's last, as in plan/command.py."""
    cut = len(command) - len(extra)
    if command[cut:] != extra:
        raise ValueError("the pod command does not end with spec.engine.extraArgs")
    return [*command[:cut], *args, *command[cut:]]
