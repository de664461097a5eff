"""A ModelDeployment served from real pods (issue 13 §3.2-3.4): the tiny disaggregated example
(torch engine, prefill EP1 as a Deployment, decode EP2 as a LeaderWorkerSet of two pods) on the
runtime image built from runtime/Dockerfile.cpu, its checkpoint on a `pvc://` source (a hostPath
PersistentVolume this module fills). Through the router Service (kubectl port-forward: the
kubelet's streaming), with the official openai client, greedy completions equal transformers' on
the same checkpoint in float32. Deleting the decode worker pod: the router ejects the group within
5 s, LeaderWorkerSet recreates it, serving resumes."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
import yaml

from e2e.cluster.handle import Cluster
from e2e.conftest import E2E_CLUSTER_NAME, pinned_to_real_nodes
from e2e.operator_process import running_operator
from e2e.real_images import image_ref
from e2e.waiting import eventually
from kubemoe_runtime.checkpoints import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny-moe"
MODEL = "tiny-qwen3-moe"
PROMPTS = [f"The router sends request {i} to the experts of layer {i % 3}" for i in range(4)]
MAX_TOKENS = 8
READY_TIMEOUT_S = 900  # four pods each import torch on a 2-core machine


@dataclass(frozen=True)
class Served:
    namespace: str
    checkpoint: Path
    apply_to_ready_s: float
    apply_to_first_token_s: float


def _checkpoint(root: Path) -> Path:
    """The tiny checkpoint, readable by the image's user (uid 65532) through the hostPath volume."""
    out = write_tiny_checkpoint(root / MODEL, arch="qwen3_moe", dtype=torch.float32)
    for d, _dirs, files in os.walk(root):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(Path(d) / f, 0o644)
    return out


def _volume(ns: str, path: Path) -> list[dict[str, Any]]:
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"models-{ns}"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadOnlyMany"],
            "storageClassName": "",
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": str(path), "type": "Directory"},
            "claimRef": {"namespace": ns, "name": "models"},
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "models", "namespace": ns},
        "spec": {
            "accessModes": ["ReadOnlyMany"],
            "storageClassName": "",
            "volumeName": f"models-{ns}",
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    return [pv, pvc]


def _manifest(ns: str) -> dict[str, Any]:
    md: dict[str, Any] = yaml.safe_load((REPO / "examples" / "tiny-moe.yaml").read_text())
    md["metadata"]["namespace"] = ns
    md["spec"]["model"]["source"] = f"pvc://models/{MODEL}"
    for role in md["spec"]["roles"].values():  # four pods on two cores: ask for what they use
        role["resources"] = {"requests": {"cpu": "250m", "memory": "2Gi"}}
    return md


def _md(cluster: Cluster, ns: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(cluster.kubectl("get", "md", NAME, "-n", ns, "-o", "json").stdout)
    return out


def _condition(md: dict[str, Any], kind: str) -> str | None:
    for c in md.get("status", {}).get("conditions", []):
        if c["type"] == kind:
            return str(c["status"])
    return None


def _pods(cluster: Cluster, ns: str, selector: str = "") -> list[dict[str, Any]]:
    args = ["get", "pods", "-n", ns, "-o", "json", *(["-l", selector] if selector else [])]
    items: list[dict[str, Any]] = json.loads(cluster.kubectl(*args).stdout)["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def _diagnose(cluster: Cluster, ns: str) -> str:
    parts = [cluster.kubectl("get", "md,pods,svc,lws", "-n", ns, "-o", "wide", check=False).stdout]
    for pod in _pods(cluster, ns):
        name = pod["metadata"]["name"]
        logs = cluster.kubectl("logs", "-n", ns, name, "--all-containers", "--tail=30", check=False)
        parts.append(
            f"--- {name}: {json.dumps(pod['status'].get('containerStatuses'))[:1500]}\n{logs.stdout}"
        )
    return "\n".join(parts)


def _client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def served(
    cluster: Cluster,
    crd_installed: Cluster,
    operator_cluster: Cluster,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    runtime = image_ref(E2E_CLUSTER_NAME, "runtime-cpu")
    root = tmp_path_factory.mktemp("real-models")
    checkpoint = _checkpoint(root)
    log = tmp_path_factory.mktemp("real-operator") / "operator.log"
    with pinned_to_real_nodes(cluster, prefix="serve") as ns:
        cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(_volume(ns, root)))
        args = ("--namespace", ns, "--image", runtime, "--resync-seconds", "5", "--no-leader-election")
        with running_operator(operator_cluster, log=log, args=args, request=request):
            t0 = time.monotonic()
            cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(_manifest(ns)))
            try:
                eventually(
                    lambda: _condition(_md(cluster, ns), "Ready") == "True",
                    timeout=READY_TIMEOUT_S,
                    what=f"ModelDeployment {NAME} Ready",
                    interval=2,
                )
            except AssertionError:
                print(_diagnose(cluster, ns))
                raise
            ready_s = time.monotonic() - t0
            with cluster.port_forward(f"svc/{NAME}", 8000, namespace=ns) as port:
                _client(port).completions.create(model=MODEL, prompt="hello", max_tokens=1, temperature=0)
            first_token_s = time.monotonic() - t0
            print(f"kubectl apply -> Ready {ready_s:.1f}s, -> first token {first_token_s:.1f}s")
            yield Served(ns, checkpoint, ready_s, first_token_s)
            cluster.kubectl("delete", "md", NAME, "-n", ns, "--wait=true", "--timeout=120s", check=False)
        cluster.kubectl("delete", "pv", f"models-{ns}", "--wait=false", check=False)


def test_ready_in_kubectl_get_md(cluster: Cluster, served: Served) -> None:
    out = cluster.kubectl("get", "md", "-n", served.namespace).stdout
    row = next(line for line in out.splitlines() if line.startswith(NAME))
    assert "Ready" in row, out
    kinds = {p["metadata"]["labels"].get("kubemoe.io/role") for p in _pods(cluster, served.namespace)}
    assert {"prefill", "decode", "router"} <= kinds, kinds


def test_every_container_runs_as_the_images_user(cluster: Cluster, served: Served) -> None:
    pods = _pods(cluster, served.namespace)
    assert len(pods) >= 4  # prefill, decode leader and worker, router
    for pod in pods:
        for c in pod["spec"]["containers"]:
            name = pod["metadata"]["name"]
            uid = cluster.kubectl("exec", "-n", served.namespace, name, "-c", c["name"], "--", "id", "-u")
            assert uid.stdout.strip() == "65532", (name, c["name"])


def test_worker_reaches_the_leader_by_its_dns_name(cluster: Cluster, served: Served) -> None:
    ns = served.namespace
    workers = [
        p
        for p in _pods(cluster, ns, "kubemoe.io/role=decode")
        if p["metadata"]["labels"].get("leaderworkerset.sigs.k8s.io/worker-index") != "0"
    ]
    (worker,) = workers
    leader_name = worker["metadata"]["annotations"]["leaderworkerset.sigs.k8s.io/leader-name"]
    leader_ip = next(p for p in _pods(cluster, ns) if p["metadata"]["name"] == leader_name)["status"]["podIP"]
    script = "import os, socket; a = os.environ['LWS_LEADER_ADDRESS']; print(a, socket.gethostbyname(a))"
    out = cluster.kubectl("exec", "-n", ns, worker["metadata"]["name"], "--", "python", "-c", script).stdout
    address, ip = out.split()
    assert address.startswith(f"{leader_name}."), out
    assert ip == leader_ip, out


def _reference(checkpoint: Path) -> list[str]:
    """transformers' greedy continuations of PROMPTS, float32, the same checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    model: Any = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    model.eval()
    texts = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
            texts.append(str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)))
    return texts


def test_greedy_completions_equal_transformers(cluster: Cluster, served: Served) -> None:
    expected = _reference(served.checkpoint)
    with cluster.port_forward(f"svc/{NAME}", 8000, namespace=served.namespace) as port:
        c = _client(port)
        plain = [
            c.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
            for p in PROMPTS
        ]
        streamed = []
        for p in PROMPTS:
            stream = c.completions.create(
                model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0, stream=True
            )
            streamed.append("".join(ch.choices[0].text for ch in stream if ch.choices))
    assert all(expected), expected  # something to compare: every prompt continues
    assert plain == expected
    assert streamed == expected


def _decode_backends_healthy(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = {}
    for m in re.finditer(r"kubemoe_router_backend_healthy\{([^}]*)\} ([0-9.]+)", text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("role") == "decode":
            found[labels["backend"]] = float(m.group(2))
    return found


def test_deleting_the_decode_worker_recovers(cluster: Cluster, served: Served) -> None:
    """Run last in this module: it restarts the decode group."""
    ns = served.namespace
    (router,) = _pods(cluster, ns, "kubemoe.io/role=router")
    (worker,) = [
        p
        for p in _pods(cluster, ns, "kubemoe.io/role=decode")
        if p["metadata"]["labels"].get("leaderworkerset.sigs.k8s.io/worker-index") != "0"
    ]
    with cluster.port_forward(f"pod/{router['metadata']['name']}", 8000, namespace=ns) as port:
        assert set(_decode_backends_healthy(port).values()) == {1.0}
        t0 = time.monotonic()
        cluster.kubectl("delete", "pod", "-n", ns, worker["metadata"]["name"], "--wait=false")
        eventually(
            lambda: 0.0 in _decode_backends_healthy(port).values() or not _decode_backends_healthy(port),
            timeout=5,
            what="the router ejecting the decode group",
            interval=0.2,
        )
        ejected_s = time.monotonic() - t0

        def serves() -> bool:
            try:
                r = _client(port).completions.create(
                    model=MODEL, prompt=PROMPTS[0], max_tokens=2, temperature=0
                )
            except openai.APIError:
                return False
            return bool(r.choices)

        eventually(serves, timeout=600, what="serving again after the worker's deletion", interval=2)
        print(
            f"decode worker deleted: ejected after {ejected_s:.1f}s, "
            f"serving again after {time.monotonic() - t0:.1f}s"
        )
