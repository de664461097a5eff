"""Colocated serving on the real node (issue 13 §3.5-3.6), from the runtime image built from
runtime/Dockerfile.cpu: `engine: vllm` (vLLM's CPU build in that image) answers greedy
completions, streaming and not, equal to transformers' on the same checkpoint (float32); and the
time from `kubectl apply` to the first token of a kubemoe ModelDeployment against the same image
started by a hand-written Deployment (what a user would write without kubemoe). The times are
printed for the notes; the tests assert that both serve."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.cluster.handle import Cluster
from e2e.conftest import E2E_CLUSTER_NAME
from e2e.real_images import image_ref
from e2e.real_models import (
    MODEL,
    first_token,
    models_namespace,
    openai_client,
    reference_greedy,
    tiny_manifest,
    wait_ready,
)

PROMPTS = [
    f"Request {i}: the experts route every token across ranks while a cache keeps state" for i in range(3)
]
MAX_TOKENS = 6


def colocated(ns: str, name: str, *, engine: str, memory: str) -> dict[str, Any]:
    md = tiny_manifest(ns, name)
    spec = md["spec"]
    spec["engine"]["kind"] = engine
    spec["serving"] = {"mode": "colocated"}
    spec["roles"] = {
        "worker": {
            "replicas": 1,
            "parallelism": {"tensor": 1, "data": 1, "expert": 1},
            "resources": {"requests": {"cpu": "500m", "memory": memory}},
        }
    }
    return md


def hand_written(ns: str, image: str) -> list[dict[str, Any]]:
    """The Deployment and Service a user writes by hand for the same image and checkpoint."""
    labels = {"app": "by-hand"}
    container = {
        "name": "serve",
        "image": image,
        "imagePullPolicy": "Never",
        "args": [
            "serve",
            "--engine=torch",
            f"--model=/models/{MODEL}",
            f"--served-model-name={MODEL}",
            "--dtype=float32",
            "--port=8000",
        ],
        "ports": [{"containerPort": 8000}],
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
        "resources": {"requests": {"cpu": "500m", "memory": "2Gi"}},
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "by-hand", "namespace": ns},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [container],
                    "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "by-hand", "namespace": ns},
        "spec": {"selector": labels, "ports": [{"port": 8000, "targetPort": 8000}]},
    }
    return [deployment, service]


@pytest.fixture(scope="module")
def models_ns(
    cluster: Cluster,
    crd_installed: Cluster,
    operator_cluster: Cluster,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, Path]]:
    """A namespace on the real node with the tiny checkpoint as claim `models` (and its path
    here), and the operator watching it."""
    with models_namespace(
        cluster, operator_cluster, prefix="colo", tmp_path_factory=tmp_path_factory, request=request
    ) as found:
        yield found


def _delete(cluster: Cluster, ns: str, *what: str) -> None:
    cluster.kubectl("delete", "-n", ns, *what, "--wait=true", "--timeout=180s", timeout=240)


def test_apply_to_first_token_against_a_hand_written_deployment(
    cluster: Cluster, models_ns: tuple[str, Path]
) -> None:
    ns, _ = models_ns
    image = image_ref(E2E_CLUSTER_NAME, "runtime-cpu")
    t0 = time.monotonic()
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(hand_written(ns, image)))
    first_token(cluster, ns, "svc/by-hand")
    by_hand_s = time.monotonic() - t0
    _delete(cluster, ns, "deployment/by-hand", "service/by-hand")

    t0 = time.monotonic()
    md = colocated(ns, "colo-torch", engine="torch", memory="2Gi")
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(md))
    ready_s = wait_ready(cluster, ns, "colo-torch")
    first_token(cluster, ns, "svc/colo-torch")
    kubemoe_s = time.monotonic() - t0
    print(
        f"kubectl apply -> first token: hand-written Deployment {by_hand_s:.1f}s; "
        f"kubemoe colocated torch ModelDeployment {kubemoe_s:.1f}s (Ready at {ready_s:.1f}s)"
    )
    _delete(cluster, ns, "md/colo-torch")


def test_vllm_colocated_serves(cluster: Cluster, models_ns: tuple[str, Path]) -> None:
    ns, checkpoint = models_ns
    # vLLM's CPU KV cache is VLLM_CPU_KVCACHE_SPACE (4 GiB in the image) on top of the model.
    md = colocated(ns, "colo-vllm", engine="vllm", memory="6Gi")
    t0 = time.monotonic()
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(md))
    ready_s = wait_ready(cluster, ns, "colo-vllm")
    print(f"vLLM colocated: kubectl apply -> Ready {ready_s:.1f}s")
    with cluster.port_forward("svc/colo-vllm", 8000, namespace=ns) as port:
        c = openai_client(port)
        plain, streamed = [], []
        for p in PROMPTS:
            r = c.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0)
            assert r.usage is not None
            assert r.usage.completion_tokens == MAX_TOKENS or r.choices[0].finish_reason == "stop"
            plain.append(r.choices[0].text)
            stream = c.completions.create(
                model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0, stream=True
            )
            streamed.append("".join(ch.choices[0].text for ch in stream if ch.choices))
    print(f"vLLM colocated answered in {time.monotonic() - t0:.1f}s after apply: {plain}")
    assert all(plain), plain
    assert streamed == plain
    assert plain == reference_greedy(checkpoint, PROMPTS, MAX_TOKENS)  # vLLM's CPU build, float32
    _delete(cluster, ns, "md/colo-vllm")
