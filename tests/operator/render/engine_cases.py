"""The manifests the engine tests render: examples/engines/, and every example of examples/ as each
engine that can serve it (the admission table's changes made: an image, a source the engine loads,
no spec.experts where it has none)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from kubemoe_operator.api.manifest import parse_manifest
from kubemoe_operator.api.resource import ModelDeployment
from kubemoe_operator.plan.model import Plan
from kubemoe_operator.plan.planner import plan_manifest
from kubemoe_operator.render import Owner, render
from tests.operator.helpers import EXAMPLES, REPO

ENGINE_EXAMPLES = sorted((REPO / "examples" / "engines").glob("*.yaml"))
RUNTIME_IMAGE = "kubemoe/kubemoe-runtime:test"
SGLANG_IMAGE = "lmsysorg/sglang:v0.5.23"
UID = "00000000-0000-4000-8000-000000000000"
NAMESPACE = "ns"
LEADER_ADDRESS = "10.0.0.1"


def load(path: Path) -> dict[str, Any]:
    """The ModelDeployment of an example file (some carry other objects it needs beside it)."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return dict(next(d for d in docs if d.get("kind") == "ModelDeployment"))


def as_sglang(data: dict[str, Any]) -> dict[str, Any]:
    """An example as SGLang serves it: its image, a pvc:// source for a file:// one, no spec.experts,
    nixl for a connector SGLang lacks, no API key Secret on a P/D router (sglang-router's), an HPA's
    replicas rather than the operator's metrics (SGLang exports no kubemoe_* series)."""
    data = copy.deepcopy(data)
    spec = data["spec"]
    spec["engine"] = {**spec.get("engine", {}), "kind": "sglang", "image": SGLANG_IMAGE}
    source = spec["model"]["source"]
    if source.startswith(("file://", "s3://")):
        spec["model"]["source"] = "pvc://models/" + source.split("://", 1)[1].strip("/").split("/")[-1]
    spec.pop("experts", None)
    kv = spec.setdefault("serving", {}).setdefault("kvTransfer", {})
    if kv.get("connector", "nixl") not in ("nixl", "mooncake"):
        kv["connector"] = "nixl"
    spec.get("router", {}).pop("apiKeySecret", None)
    for role in spec.get("roles", {}).values():
        if (role.get("autoscaling") or {}).get("metrics"):
            role["autoscaling"] = {"mode": "external"}
    return data


def sglang_cases() -> list[tuple[str, ModelDeployment]]:
    """Every example as SGLang, and the SGLang examples."""
    cases = [(f"{p.stem}-as-sglang", parse_manifest(as_sglang(load(p)))) for p in EXAMPLES]
    for path in ENGINE_EXAMPLES:
        md = parse_manifest(load(path))
        if md.spec.engine.kind == "sglang":
            cases.append((path.stem, md))
    return cases


def rendered(md: ModelDeployment) -> tuple[Plan, list[dict[str, Any]]]:
    plan = plan_manifest(md)
    owner = Owner(name=md.metadata.name, namespace=NAMESPACE, uid=UID)
    image = md.spec.engine.image or RUNTIME_IMAGE
    return plan, render(spec=md.spec, plan=plan, owner=owner, image=image, runtime_image=RUNTIME_IMAGE)


def kubelet_expand(arg: str, env: dict[str, str]) -> str:
    """What the kubelet passes for a container argument: $(VAR) from `env`, $$ as $."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]) if m[1] else "$", arg)


def pod_argvs(objs: list[dict[str, Any]]) -> list[tuple[str, int, list[str]]]:
    """(role, LeaderWorkerSet worker index, argv as the process gets it) of every serving pod a
    rendering starts: a Deployment's pod, or each pod of a LeaderWorkerSet group (its leader, then the
    worker template once per worker index)."""
    out: list[tuple[str, int, list[str]]] = []
    for obj in objs:
        role = obj["metadata"].get("labels", {}).get("kubemoe.io/role", "")
        if obj["kind"] == "Deployment" and role != "router":
            container = obj["spec"]["template"]["spec"]["containers"][0]
            out.append((role, 0, [*container["command"], *container["args"]]))
        if obj["kind"] == "LeaderWorkerSet":
            lwt = obj["spec"]["leaderWorkerTemplate"]
            for index in range(lwt["size"]):
                template = lwt["leaderTemplate"] if index == 0 else lwt["workerTemplate"]
                container = template["spec"]["containers"][0]
                env = {"LWS_LEADER_ADDRESS": LEADER_ADDRESS, "LWS_WORKER_INDEX": str(index)}
                argv = [kubelet_expand(a, env) for a in [*container["command"], *container["args"]]]
                out.append((role, index, argv))
    return out


def router_argv(objs: list[dict[str, Any]]) -> list[str] | None:
    for obj in objs:
        if (
            obj["kind"] == "Deployment"
            and obj["metadata"].get("labels", {}).get("kubemoe.io/role") == "router"
        ):
            container = obj["spec"]["template"]["spec"]["containers"][0]
            return [*container["command"], *container["args"]]
    return None
