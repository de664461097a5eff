"""model.cache end to end on the real node (issue 20): a Job from the runtime image fills a claim from a
hub on this machine, status shows its progress while it runs, the serving pods start only then, load the
model from the claim and answer through the router.

The hub is tests/runtime/fake_hub.py, the one stand-in here: huggingface.co cannot be reached from this
machine, so a local server answers the Hub's HTTP calls (those huggingface_hub makes) from the tiny
checkpoint, holding the largest file after its first 32 KiB until the test has seen the fill's progress
in status (a fill of 1 MB would otherwise be over between two reads of it). Pods reach it at the
real node's bridge address; everything else is real: the operator, the Job controller, the kubelet,
containerd, the runtime image built from runtime/Dockerfile.cpu, and the OpenAI client."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.cluster.handle import Cluster
from e2e.cluster.node_config import RealNode
from e2e.conftest import E2E_CLUSTER_NAME, pinned_to_real_nodes
from e2e.operator_process import model_volume, running_operator
from e2e.real_images import image_ref
from e2e.real_models import MODEL, get_md, openai_client, tiny_checkpoint, tiny_manifest, wait_ready
from e2e.waiting import eventually
from tests.runtime.fake_hub import FakeHub, Repo

REPO_ID = f"kubemoe/{MODEL}"
NAME = "cached"


@pytest.fixture
def cache_ns(
    cluster: Cluster,
    crd_installed: Cluster,
    operator_cluster: Cluster,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, Path, FakeHub]]:
    """A real-node namespace with an empty claim `model-cache` (a hostPath folder the image's user may
    write), the hub serving the tiny checkpoint (paused mid-file until hub.resume is set), and the
    operator watching the namespace."""
    checkpoint = tiny_checkpoint(tmp_path_factory.mktemp("hub-models"))
    cache = tmp_path_factory.mktemp("model-cache")
    os.chmod(cache, 0o777)  # the fill runs as the image's user (uid 65532)
    log = tmp_path_factory.mktemp("cache-operator") / "operator.log"
    hub = FakeHub({REPO_ID: Repo.of_folder(checkpoint)}, resume=threading.Event(), host="0.0.0.0")
    with hub.running(), pinned_to_real_nodes(cluster, prefix="cache") as ns:
        volume = model_volume(
            ns, host_path=str(cache), size="1Gi", claim="model-cache", access="ReadWriteMany"
        )
        cluster.kubectl("apply", "-f", "-", stdin=volume)
        runtime = image_ref(E2E_CLUSTER_NAME, "runtime-cpu")
        args = ("--namespace", ns, "--image", runtime, "--resync-seconds", "2", "--no-leader-election")
        with running_operator(operator_cluster, log=log, args=args, request=request):
            yield ns, cache, hub
        cluster.kubectl("delete", "pv", f"model-cache-{ns}", "--wait=false", check=False)


def cached_manifest(ns: str, hub: FakeHub) -> dict[str, Any]:
    md = tiny_manifest(ns, NAME)
    spec = md["spec"]
    port = hub.server.server_address[1]
    spec["model"]["source"] = f"hf://{REPO_ID}"
    spec["model"]["cache"] = {"claim": "model-cache", "hubEndpoint": f"http://{RealNode('').node_ip}:{port}"}
    spec["serving"] = {"mode": "colocated"}
    spec["roles"] = {
        "worker": {
            "replicas": 1,
            "parallelism": {"tensor": 1, "data": 1, "expert": 1},
            "resources": {"requests": {"cpu": "500m", "memory": "2Gi"}},
        }
    }
    return md


def test_a_job_fills_the_cache_then_the_groups_serve_from_it(
    cluster: Cluster, cache_ns: tuple[str, Path, FakeHub]
) -> None:
    ns, cache, hub = cache_ns
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(cached_manifest(ns, hub)))

    # status.cache as it went, with whether a worker pod existed and whether the fill Job had succeeded.
    # Pods are read first, then the Job: a worker seen at t1 means its Deployment was applied before t1,
    # which the operator does only for a succeeded Job, so the Job read after t1 shows it. status.cache
    # itself is written after the Deployment in the same reconcile, so it may still say Filling then.
    seen: list[dict[str, Any]] = []

    def kube_items(kind: str, *selector: str) -> list[dict[str, Any]]:
        out = cluster.kubectl("get", kind, "-n", ns, *selector, "-o", "json").stdout
        return list(json.loads(out)["items"])

    def cache_status() -> dict[str, Any]:
        workers = kube_items("pods", "-l", "kubemoe.io/role=worker")
        filled = any((j.get("status") or {}).get("succeeded") for j in kube_items("jobs"))
        status = get_md(cluster, ns, NAME).get("status") or {}
        if status.get("cache"):
            seen.append({**status["cache"], "workers": len(workers), "filled": filled})
        return dict(status.get("cache") or {})

    def counting() -> bool:
        cache = cache_status()
        return cache.get("phase") == "Filling" and bool(cache.get("bytesTotal"))

    t0 = time.monotonic()
    eventually(
        counting, timeout=300, what="the fill pod's progress (bytesTotal) in status.cache", interval=0.5
    )
    assert hub.resume is not None
    hub.resume.set()  # the hub held the largest file mid-way until now
    eventually(
        lambda: cache_status().get("phase") == "Filled",
        timeout=300,
        what="the model cache filled",
        interval=0.5,
    )
    fill_s = time.monotonic() - t0
    assert all(s["filled"] for s in seen if s["workers"]), seen  # nothing served before the fill succeeded
    filling = [s for s in seen if s["phase"] == "Filling"]
    assert any(not s["filled"] for s in filling), seen  # the fill was watched while it ran
    counted = [s for s in filling if s.get("bytesTotal")]
    assert counted, filling
    assert all(0 <= s["bytes"] <= s["bytesTotal"] for s in counted)
    print(f"fill: {fill_s:.1f}s; progress seen: {[(s['bytes'], s['bytesTotal']) for s in counted]}")

    ready_s = wait_ready(cluster, ns, NAME)
    folder = cache / "kubemoe-cache" / REPO_ID
    for name, data in hub.repos[REPO_ID].files.items():
        assert (folder / name).read_bytes() == data, name
    assert sorted(hub.downloads()) == sorted(set(hub.downloads()))  # each file downloaded once

    with cluster.port_forward(f"svc/{NAME}", 8000, namespace=ns) as port:
        r = openai_client(port).completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0)
    assert r.choices[0].text
    print(f"model cache: filled in {fill_s:.1f}s, Ready {ready_s:.1f}s after, answered {r.choices[0].text!r}")
    cluster.kubectl("delete", "md", NAME, "-n", ns, "--wait=true", "--timeout=180s", timeout=240)
