"""The tiny model on the real node: its checkpoint on a hostPath PersistentVolume (a `pvc://`
source), ModelDeployment manifests from examples/tiny-moe.yaml, and what the tests read back."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
import yaml

from e2e.cluster.handle import Cluster
from e2e.conftest import E2E_CLUSTER_NAME, pinned_to_real_nodes
from e2e.operator_process import model_volume, running_operator
from e2e.real_images import image_ref
from e2e.waiting import eventually
from kubemoe_runtime.tools.checkpoints import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-qwen3-moe"
READY_TIMEOUT_S = 600  # pods import torch on 2 cores; under pytest-timeout (900 s), so diagnose() prints


def tiny_checkpoint(root: Path) -> Path:
    """The tiny checkpoint, readable by the image's user (uid 65532) through the hostPath volume."""
    out = write_tiny_checkpoint(root / MODEL, arch="qwen3_moe", dtype=torch.float32)
    for d, _dirs, files in os.walk(root):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(Path(d) / f, 0o644)
    return out


def tiny_manifest(ns: str, name: str) -> dict[str, Any]:
    md: dict[str, Any] = yaml.safe_load((REPO / "examples" / "tiny-moe.yaml").read_text())
    md["metadata"]["namespace"] = ns
    md["metadata"]["name"] = name
    md["spec"]["model"]["source"] = f"pvc://models/{MODEL}"
    for role in md["spec"]["roles"].values():  # four pods on two cores: ask for what they use
        role["resources"] = {"requests": {"cpu": "250m", "memory": "2Gi"}}
    return md


def get_md(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(cluster.kubectl("get", "md", name, "-n", ns, "-o", "json").stdout)
    return out


def condition(md: dict[str, Any], kind: str) -> str | None:
    for c in md.get("status", {}).get("conditions", []):
        if c["type"] == kind:
            return str(c["status"])
    return None


def live_pods(cluster: Cluster, ns: str, selector: str = "") -> list[dict[str, Any]]:
    args = ["get", "pods", "-n", ns, "-o", "json", *(["-l", selector] if selector else [])]
    items: list[dict[str, Any]] = json.loads(cluster.kubectl(*args).stdout)["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def diagnose(cluster: Cluster, ns: str) -> str:
    parts = [cluster.kubectl("get", "md,pods,svc,lws", "-n", ns, "-o", "wide", check=False).stdout]
    for pod in live_pods(cluster, ns):
        name = pod["metadata"]["name"]
        logs = cluster.kubectl("logs", "-n", ns, name, "--all-containers", "--tail=30", check=False)
        parts.append(
            f"--- {name}: {json.dumps(pod['status'].get('containerStatuses'))[:1500]}\n{logs.stdout}"
        )
    return "\n".join(parts)


def openai_client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)


def wait_ready(cluster: Cluster, ns: str, name: str) -> float:
    """Seconds until ModelDeployment `name` is Ready (its pods' state and logs printed if never)."""
    t0 = time.monotonic()
    try:
        eventually(
            lambda: condition(get_md(cluster, ns, name), "Ready") == "True",
            timeout=READY_TIMEOUT_S,
            what=f"ModelDeployment {name} Ready",
            interval=2,
        )
    except AssertionError:
        print(diagnose(cluster, ns))
        raise
    return time.monotonic() - t0


def first_token(cluster: Cluster, ns: str, target: str, *, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll `target` (svc/NAME, port 8000, through kubectl port-forward) until a completion returns."""

    def answered() -> bool:
        try:
            with cluster.port_forward(target, 8000, namespace=ns, timeout=20) as port:
                r = openai_client(port).completions.create(
                    model=MODEL, prompt="hello", max_tokens=1, temperature=0
                )
                return bool(r.choices)
        except (AssertionError, openai.APIError):
            return False

    eventually(answered, timeout=timeout, what=f"a first token from {target}", interval=1)


def reference_greedy(checkpoint: Path, prompts: list[str], max_tokens: int) -> list[str]:
    """transformers' greedy continuations of `prompts`, float32, the same checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    model: Any = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    model.eval()
    texts = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
            texts.append(str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)))
    return texts


@contextlib.contextmanager
def models_namespace(
    cluster: Cluster,
    operator_cluster: Cluster,
    *,
    prefix: str,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
    operator_args: tuple[str, ...] = (),
) -> Iterator[tuple[str, Path]]:
    """A namespace pinned to the real nodes with the tiny checkpoint as claim `models` (and its
    path here), the runtime image imported, and the operator (as the chart's identity) watching it
    with that image; all removed after."""
    root = tmp_path_factory.mktemp(f"{prefix}-models")
    checkpoint = tiny_checkpoint(root)
    log = tmp_path_factory.mktemp(f"{prefix}-operator") / "operator.log"
    with pinned_to_real_nodes(cluster, prefix=prefix) as ns:  # skips first if there is no real node
        runtime = image_ref(E2E_CLUSTER_NAME, "runtime-cpu")
        cluster.kubectl("apply", "-f", "-", stdin=model_volume(ns, host_path=str(root), size="1Gi"))
        base = ("--namespace", ns, "--image", runtime, "--resync-seconds", "5", "--no-leader-election")
        args = (*base, *operator_args)
        with running_operator(operator_cluster, log=log, args=args, request=request):
            yield ns, checkpoint
        cluster.kubectl("delete", "pv", f"models-{ns}", "--wait=false", check=False)
