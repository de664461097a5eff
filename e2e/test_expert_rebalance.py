"""Expert rebalancing on the real node (issue 17's e2e): the tiny disaggregated example with
spec.experts (two redundant slots in the decode group of two pods, EP2), skewed traffic (one prompt,
over and over: the same tokens pick the same experts), and the operator checking every 10 s.

Held: the operator rebalances (status.experts.decode.generation 1, an ExpertsRebalanced event, the
role's ConfigMap); the decode group's leader serves that placement (GET /v1/experts/load: generation
and slots equal to the ConfigMap's placement of their layout); `kubectl moe experts` shows it; no
request of the running load failed during the switch; and greedy completions are the same before and after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from e2e.cluster.handle import Cluster
from e2e.real_models import (
    MODEL,
    first_token,
    get_md,
    live_pods,
    models_namespace,
    openai_client,
    tiny_manifest,
    wait_ready,
)
from e2e.reliability import Outcome, RecordProperty, record
from e2e.waiting import eventually

NAME = "experts"
SKEWED = "the same experts, the same experts, the same experts"
PROMPTS = [f"Request {i} asks the experts of layer {i % 2}" for i in range(3)]
MAX_TOKENS = 8
REBALANCE_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def experts_ns(
    cluster: Cluster,
    crd_installed: Cluster,
    operator_cluster: Cluster,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    with models_namespace(
        cluster,
        operator_cluster,
        prefix="experts",
        tmp_path_factory=tmp_path_factory,
        request=request,
        operator_args=("--rebalance-interval-seconds", "10", "--rebalance-tick-seconds", "2"),
    ) as (ns, _checkpoint):
        md = tiny_manifest(ns, NAME)
        md["spec"]["experts"] = {"redundant": 2, "rebalance": {"minImprovement": 0.01}}
        cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(md))
        wait_ready(cluster, ns, NAME)
        first_token(cluster, ns, f"svc/{NAME}")
        yield ns
        cluster.kubectl(
            "delete", "md", NAME, "-n", ns, "--wait=true", "--timeout=120s", check=False, timeout=180
        )


def _greedy(port: int) -> list[str]:
    api = openai_client(port)
    return [
        api.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
        for p in PROMPTS
    ]


def _leader_load(cluster: Cluster, ns: str) -> dict[str, Any]:
    (leader,) = live_pods(
        cluster, ns, f"kubemoe.io/role=decode,kubemoe.io/leader=true,kubemoe.io/deployment={NAME}"
    )
    pod = f"pod/{leader['metadata']['name']}"
    with (
        cluster.port_forward(pod, 8000, namespace=ns, timeout=20) as port,
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/experts/load", timeout=10) as resp,
    ):
        out: dict[str, Any] = json.loads(resp.read())
    return out


def _kubectl_moe(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = cluster.env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        [str(cluster.bin_dir / "kubectl"), "moe", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_skewed_traffic_is_rebalanced_live_without_a_failed_request(
    cluster: Cluster, experts_ns: str, record_property: RecordProperty
) -> None:
    ns = experts_ns
    errors: list[str] = []
    done = [0]
    stop = threading.Event()

    with cluster.port_forward(f"svc/{NAME}", 8000, namespace=ns, timeout=30) as port:
        before = _greedy(port)

        def load() -> None:
            api = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=120
            )
            while not stop.is_set():
                try:
                    text = "".join(
                        c.choices[0].text
                        for c in api.completions.create(
                            model=MODEL,
                            prompt=SKEWED,
                            max_tokens=16,
                            temperature=0,
                            stream=True,
                            extra_body={"ignore_eos": True},
                        )
                        if c.choices
                    )
                    if not text:
                        errors.append("an empty stream")
                    done[0] += 1
                except (openai.APIError, OSError) as err:
                    errors.append(f"{type(err).__name__}: {err}"[:200])

        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            status = eventually(
                lambda: (
                    (get_md(cluster, ns, NAME).get("status", {}).get("experts", {}).get("decode", {})).get(
                        "generation", 0
                    )
                    >= 1
                    and get_md(cluster, ns, NAME)["status"]["experts"]["decode"]
                ),
                timeout=REBALANCE_TIMEOUT_S,
                what="the operator's first rebalance of decode",
                interval=2,
            )
            served = eventually(
                lambda: (load_ := _leader_load(cluster, ns))["placement"]["generation"] >= 1 and load_,
                timeout=120,
                what="the decode group switched to the new placement",
                interval=2,
            )
            time.sleep(5)  # the load runs on the new placement for a while
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=150)
        after = _greedy(port)

    print(f"rebalanced: {status}; {done[0]} streams, {len(errors)} failed")
    assert errors == [], errors[:5]
    assert done[0] > 0
    assert status["predictedImbalance"] < status["imbalance"] or status["imbalance"] <= 1.0
    assert after == before  # placement changes no result
    cm = json.loads(
        cluster.kubectl("get", "configmap", f"{NAME}-decode-experts", "-n", ns, "-o", "json").stdout
    )
    (key,) = [k for k in cm["data"] if k.startswith("placement-")]  # this layout's (one, as it runs)
    placement = json.loads(cm["data"][key])
    assert placement["generation"] == served["placement"]["generation"]
    assert [layer["slots"] for layer in placement["layers"]] == [layer["slots"] for layer in served["layers"]]
    events = json.loads(
        cluster.kubectl(
            "get", "events", "-n", ns, "--field-selector", "reason=ExpertsRebalanced", "-o", "json"
        ).stdout
    )["items"]
    assert events, "no ExpertsRebalanced event"
    shown = _kubectl_moe(cluster, "experts", NAME, "-n", ns)
    assert shown.returncode == 0, shown.stderr
    assert "decode" in shown.stdout
    record(
        record_property,
        Outcome(
            fault="experts moved live under skewed traffic on the real node (decode EP2, 2 redundant slots)",
            client_saw=(
                f"every stream answered in full; greedy answers unchanged; imbalance {status['imbalance']}"
                f" -> {status['predictedImbalance']} predicted"
            ),
            lost=f"0 of {done[0]}",
            recover_s=None,
        ),
    )
