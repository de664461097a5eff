"""Autoscaling prefill and decode separately, end to end, on real parts only.

- The control plane is real (kube-apiserver, LWS, kwok nodes). The ModelDeployment
  (e2e/manifests/autoscaled.yaml) is the simulated one: its pods are kwok's and run nothing.
- The metrics come from real runtime processes on 127.0.0.1 — the torch engine serving a tiny
  checkpoint, one process per role — whose labels (deployment=autoscaled, role=prefill|decode,
  group=0) are the ones the operator's queries select the ModelDeployment's roles by.
- A real Prometheus (Debian's package, e2e/prometheus.py) scrapes them every second; the operator
  (as the Helm chart's ServiceAccount) queries it every INTERVAL_S seconds.
- The load generator (e2e/runtime_process.py) is bounded in requests and time. With one KV slot
  (--max-num-seqs 1), N clients hold N-1 requests in decode's waiting queue: HEAVY clients ask
  for more decode groups (queue 11 against a target of 5 per group); STEADY clients (queue 5,
  4 while a client is between requests) sit inside what 3 or 4 groups should serve: at 3 or 4
  groups a queue of 4 or 5 asks for no change (ceil(groups * queue / 5) = groups), and a dip to
  3 is outweighed by the scale-down window, which takes the largest recommendation in it.

The tests share one operator, the runtimes and Prometheus, and each starts from a ModelDeployment
of its own (deleted with its children and applied again: a new uid, so an empty autoscaler
history), with Prometheus up and decode's queue empty: each passes on its own and in any order.
Scaling up, the load that holds it and the stale write are staged inside the test that needs them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e import prometheus
from e2e.cluster.handle import Cluster
from e2e.operator_process import (
    OperatorProcess,
    eventually,
    get_json,
    operator_args,
    running_operator,
    scraping_operator,
    scratch_namespace,
)
from e2e.reliability import Outcome, RecordProperty, record
from e2e.runtime_process import LoadGenerator, RuntimeProcess, http_get, tiny_checkpoint
from kubemoe_operator.api.spec import MetricType
from kubemoe_operator.api.status import ModelDeploymentStatus
from kubemoe_operator.autoscale.prometheus import PrometheusSource
from kubemoe_operator.autoscale.signals import HISTOGRAMS, RoleSelector, histogram_quantile
from kubemoe_operator.reconcile.status import status_apply
from kubemoe_operator.run.settings import FIELD_MANAGER as OPERATOR_FIELD_MANAGER
from kubemoe_runtime.pod.ports import free_port

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "e2e" / "manifests" / "autoscaled.yaml"
NAME = "autoscaled"
INTERVAL_S = 2.0
SCALE_DOWN_WINDOW_S = 10.0  # as in the manifest
TARGET = 5.0  # queue depth per group, as in the manifest
DECODE_MIN, DECODE_MAX = 2, 4
HEAVY, STEADY = 12, 6
LATENCY_S = 1.5
"""Allowance for the status write and this test's polling, on top of the evaluation intervals."""
DECODE_QUEUE = f'sum(kubemoe_requests_waiting{{deployment="{NAME}",role="decode"}})'


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RuntimeProcess]]:
    """One runtime process per role, labelled as the ModelDeployment's roles."""
    root = tmp_path_factory.mktemp("runtimes")
    model = tiny_checkpoint(root / "tiny")
    procs = {
        role: RuntimeProcess(
            model=model,
            role=role,
            labels={"KUBEMOE_DEPLOYMENT": NAME, "KUBEMOE_GROUP": "0"},
            log_dir=root,
            args=("--max-num-seqs", "1", "--max-model-len", "256"),
        )
        for role in ("prefill", "decode")
    }
    try:
        for proc in procs.values():
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(scope="module")
def prom(
    runtimes: dict[str, RuntimeProcess], namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[prometheus.PrometheusServer]:
    """Prometheus scraping the runtimes as if they were the deployment's pods: their series carry the
    namespace (the operator's queries match it exactly)."""
    server = prometheus.start(
        [p.target for p in runtimes.values()],
        workdir=tmp_path_factory.mktemp("prometheus"),
        labels={"namespace": namespace},
    )
    try:
        eventually(lambda: server.targets_up() == 2, timeout=30, what="both runtimes scraped")
        eventually(lambda: server.value(DECODE_QUEUE) is not None, timeout=30, what="decode's queue")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> Iterator[str]:
    with scratch_namespace(cluster, prefix="as") as ns:
        yield ns


@pytest.fixture(scope="module")
def operator(
    operator_cluster: Cluster,
    namespace: str,
    prom: prometheus.PrometheusServer,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    with running_operator(
        operator_cluster,
        log=log,
        args=(
            *operator_args(namespace, lease_name="kubemoe-operator-autoscale-e2e", autoscale_s=INTERVAL_S),
            "--prometheus-url",
            prom.url,
            "--metrics-port",
            str(free_port()),
        ),
        request=request,
    ) as proc:
        yield proc


def md(cluster: Cluster, ns: str) -> dict[str, Any]:
    obj: dict[str, Any] = get_json(cluster, "md", NAME, "-n", ns)
    return obj


def condition(obj: dict[str, Any], type: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == type:
            return dict(c)
    return {}


def desired(obj: dict[str, Any], role: str) -> int | None:
    value = ((obj.get("status") or {}).get("roles") or {}).get(role, {}).get("desired")
    return None if value is None else int(value)


def lws_replicas(cluster: Cluster, ns: str, role: str) -> int:
    return int(get_json(cluster, "lws", f"{NAME}-{role}", "-n", ns)["spec"]["replicas"])


def decode_groups(cluster: Cluster, ns: str) -> int:
    """The replicas decode runs now: its desired once the autoscaler set one, else spec's."""
    obj = md(cluster, ns)
    d = desired(obj, "decode")
    return d if d is not None else int(obj["spec"]["roles"]["decode"]["replicas"])


def scaled_events(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    """The autoscaler's Scaled events about this test's ModelDeployment (not an earlier one's)."""
    uid = md(cluster, ns)["metadata"]["uid"]
    items = get_json(cluster, "events", "-n", ns, "--field-selector", f"involvedObject.uid={uid}")["items"]
    return [
        e
        for e in items
        if e["reason"] == "Scaled" and (e.get("source") or {}).get("component") == "kubemoe-autoscaler"
    ]


def operator_metrics(operator: OperatorProcess) -> str:
    port = operator.args[operator.args.index("--metrics-port") + 1]
    return http_get(f"http://127.0.0.1:{port}/metrics")[1]


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in Prometheus text, or None."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


def decode_evaluations(operator: OperatorProcess) -> float:
    """The autoscaler's evaluations of decode so far (every outcome), from its /metrics."""
    text = operator_metrics(operator)
    return sum(
        sample(text, "kubemoe_operator_autoscale_evaluations_total", role="decode", outcome=o) or 0
        for o in ("decided", "unavailable")
    )


def hold_still(cluster: Cluster, ns: str, *, seconds: float) -> list[tuple[float, int, int | None]]:
    """(time, decode groups, prefill desired), polled for `seconds`."""
    seen = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        obj = md(cluster, ns)
        seen.append(
            (
                time.monotonic(),
                desired(obj, "decode") or int(obj["spec"]["roles"]["decode"]["replicas"]),
                desired(obj, "prefill"),
            )
        )
        time.sleep(0.5)
    return seen


def assert_prefill_untouched(cluster: Cluster, ns: str) -> None:
    assert desired(md(cluster, ns), "prefill") in (None, 1)
    assert lws_replicas(cluster, ns, "prefill") == 1


@pytest.fixture
def deployed(
    cluster: Cluster, namespace: str, operator: OperatorProcess, prom: prometheus.PrometheusServer
) -> str:
    """A new ModelDeployment Ready at decode's minimum, with the autoscaler reading its metrics:
    the one an earlier test left is deleted with its children first, Prometheus is up, and
    decode's queue is empty."""
    prom.restart()  # a test before may have stopped it
    eventually(lambda: prom.value(DECODE_QUEUE) == 0, timeout=60, what="decode's queue empty")
    cluster.kubectl("delete", "md", NAME, "-n", namespace, "--ignore-not-found", "--cascade=foreground",
                    "--timeout=120s")  # fmt: skip
    eventually(
        lambda: not get_json(cluster, "lws", "-n", namespace)["items"],
        timeout=60,
        what="the previous deployment's LeaderWorkerSets gone",
    )
    cluster.kubectl("apply", "-n", namespace, "-f", str(MANIFEST))

    def ready() -> dict[str, Any] | None:
        obj = md(cluster, namespace)
        ok = (
            condition(obj, "Ready").get("status") == "True"
            and condition(obj, "MetricsAvailable").get("status") == "True"
        )
        return obj if ok else None

    obj = eventually(ready, timeout=90, what=f"{NAME} Ready with metrics available")
    assert condition(obj, "MetricsAvailable")["reason"] == "MetricsRead"
    assert "Prometheus at http://127.0.0.1" in condition(obj, "MetricsAvailable")["message"]
    assert lws_replicas(cluster, namespace, "decode") == DECODE_MIN
    return namespace


def scale_decode_up(cluster: Cluster, ns: str, runtimes: dict[str, RuntimeProcess]) -> int:
    """HEAVY load until decode runs more than its minimum (the caller's load, if any, included:
    the extra clients make up the difference); the groups it runs then."""
    with LoadGenerator(runtimes["decode"].url, clients=HEAVY - STEADY):
        eventually(
            lambda: decode_groups(cluster, ns) > DECODE_MIN,
            timeout=60,
            interval=0.2,
            what="decode to scale up",
        )
    return decode_groups(cluster, ns)


def _direct_p90(text: str, series: str) -> float | None:
    """The p90 of one role's histogram on a runtime's /metrics page, over every observation so far."""
    buckets = [
        (float(s.labels["le"]), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == f"{series}_bucket" and s.labels.get("role") == "prefill"
    ]
    return histogram_quantile(0.9, buckets)


def test_latency_signals_are_the_engines_histograms_through_prometheus(
    runtimes: dict[str, RuntimeProcess], prom: prometheus.PrometheusServer, namespace: str
) -> None:
    """ttft-p90 and itl-p90, the primary signals, as the operator's Prometheus source reads them (its
    own queries over the torch engine's histograms, scraped by the real Prometheus) equal the same
    quantile taken straight from the runtime's /metrics over the same requests. Prefill's runtime is
    used because no other test loads it: every observation in its histograms is this test's."""
    prefill = runtimes["prefill"]
    with LoadGenerator(prefill.url, clients=2, max_tokens=16, max_requests=12) as load:
        pass
    assert load.failures == []
    status, page = http_get(f"{prefill.url}/metrics")
    assert status == 200
    latency: list[MetricType] = ["ttft-p90", "itl-p90"]
    direct = {m: _direct_p90(page, HISTOGRAMS[m]) for m in latency}
    assert all(v is not None and v > 0 for v in direct.values()), direct
    scraped = f'sum(kubemoe_time_to_first_token_seconds_count{{deployment="{NAME}",role="prefill"}})'
    eventually(lambda: prom.value(scraped) == load.sent, timeout=30, what="Prometheus to scrape the load")

    async def read() -> dict[MetricType, float | None]:
        async with httpx2.AsyncClient() as client:
            source = PrometheusSource(prom.url, client=client, rate_window="5m")
            sel = RoleSelector(namespace=namespace, deployment=NAME, role="prefill")
            return await source.sample(sel, latency)

    via_prometheus = asyncio.run(read())
    for metric, expected in direct.items():
        got = via_prometheus[metric]
        assert got is not None, (metric, via_prometheus)
        assert expected is not None
        # 5%: rate() extrapolates each bucket series to the edges of its window, capped where that
        # counter would reach zero, so buckets that first appear at different values scale a little
        # differently (a clean-clone CI run saw itl-p90 2.6% apart); a wrong series or quantile is far off
        assert abs(got - expected) <= 0.05 * expected, (metric, got, expected)


def test_runtime_metrics_carry_the_labels_and_no_gpu_series_without_a_driver(
    runtimes: dict[str, RuntimeProcess],
) -> None:
    text = runtimes["decode"].metrics()
    assert 'kubemoe_requests_waiting{deployment="autoscaled",group="0",rank="0",role="decode"}' in text
    assert "kubemoe_gpu_" not in text  # this machine has no NVIDIA driver: the GPU gauges are absent
    assert runtimes["decode"].log().count("GPU metrics off") == 1


def test_decode_queue_scales_decode_up_and_its_leader_worker_set_follows(
    cluster: Cluster,
    deployed: str,
    runtimes: dict[str, RuntimeProcess],
    prom: prometheus.PrometheusServer,
    operator: OperatorProcess,
) -> None:
    ns = deployed
    before = decode_groups(cluster, ns)
    assert before == DECODE_MIN
    with LoadGenerator(runtimes["decode"].url, clients=HEAVY) as load:
        eventually(
            lambda: (prom.value(DECODE_QUEUE) or 0) > TARGET * 1.1,
            timeout=30,
            interval=0.1,
            what="Prometheus to see decode's queue above target",
        )
        seen_at = time.monotonic()
        eventually(
            lambda: decode_groups(cluster, ns) > before, timeout=30, interval=0.1, what="decode to scale up"
        )
        took = time.monotonic() - seen_at
        print(f"\ndecode scaled up {took:.1f}s after Prometheus saw the queue (interval {INTERVAL_S}s)")
        assert took <= 2 * INTERVAL_S + LATENCY_S

        assert before < decode_groups(cluster, ns) <= DECODE_MAX
        eventually(
            lambda: lws_replicas(cluster, ns, "decode") == decode_groups(cluster, ns),
            timeout=30,
            what="decode's LeaderWorkerSet to follow desired",
        )
        assert_prefill_untouched(cluster, ns)
        (first, *_) = sorted(scaled_events(cluster, ns), key=lambda e: e["metadata"]["creationTimestamp"])
        assert first["message"].startswith(f"decode: scale up {before} -> {before + 1}: queue-depth"), first
        text = operator_metrics(operator)
        ups = sample(text, "kubemoe_operator_autoscale_decisions_total", role="decode", direction="up")
        assert (ups or 0) >= 1
        assert sample(text, "kubemoe_operator_autoscale_desired_replicas", role="prefill") == 1
        assert (sample(text, "kubemoe_operator_reconciles_total", result="ok") or 0) >= 1
    assert load.failures == []


def test_steady_load_changes_nothing_for_ten_intervals(
    cluster: Cluster,
    deployed: str,
    runtimes: dict[str, RuntimeProcess],
    prom: prometheus.PrometheusServer,
    operator: OperatorProcess,
) -> None:
    ns = deployed
    with LoadGenerator(runtimes["decode"].url, clients=STEADY):
        scale_decode_up(cluster, ns, runtimes)
        eventually(
            lambda: 3 <= (prom.value(DECODE_QUEUE) or 0) <= STEADY,
            timeout=30,
            interval=0.1,
            what="decode's queue at the steady level",
        )
        # Two evaluations on the steady queue: any decision made while the extra load drained is
        # written by then.
        seen_evaluations = decode_evaluations(operator)
        eventually(
            lambda: decode_evaluations(operator) >= seen_evaluations + 2,
            timeout=4 * INTERVAL_S + 20,
            what="two evaluations of decode on the steady queue",
        )
        groups = decode_groups(cluster, ns)
        events = len(scaled_events(cluster, ns))
        seen = hold_still(cluster, ns, seconds=10 * INTERVAL_S)
        queue = prom.value(DECODE_QUEUE)
    assert DECODE_MIN < groups <= DECODE_MAX  # held above the minimum by the load, not by the bounds
    assert {g for _, g, _ in seen} == {groups}, seen
    assert {p for _, _, p in seen} <= {None, 1}
    assert len(scaled_events(cluster, ns)) == events
    assert queue is not None
    assert queue >= 3
    eventually(
        lambda: lws_replicas(cluster, ns, "decode") == groups, timeout=30, what="decode's LWS at its groups"
    )
    assert_prefill_untouched(cluster, ns)


def test_load_stops_decode_scales_back_after_the_window_not_below_min(
    cluster: Cluster, deployed: str, runtimes: dict[str, RuntimeProcess], prom: prometheus.PrometheusServer
) -> None:
    """HEAVY load to the end: every recommendation made under it asks for more groups than decode
    runs, so the last of them (at most one interval before the stop) holds decode until it leaves
    the scale-down window."""
    ns = deployed
    load = LoadGenerator(runtimes["decode"].url, clients=HEAVY).start()
    try:
        eventually(
            lambda: decode_groups(cluster, ns) > DECODE_MIN,
            timeout=60,
            interval=0.2,
            what="decode to scale up",
        )
        start = decode_groups(cluster, ns)
        stopped_at = time.monotonic()
    finally:
        load.stop()
    assert start > DECODE_MIN
    eventually(
        lambda: decode_groups(cluster, ns) < start, timeout=SCALE_DOWN_WINDOW_S + 30, what="a scale-down"
    )
    first_down = time.monotonic() - stopped_at
    eventually(
        lambda: decode_groups(cluster, ns) == DECODE_MIN,
        timeout=(start - DECODE_MIN) * INTERVAL_S + 30,
        what="decode back at minReplicas",
    )
    print(f"\ndecode first scaled down {first_down:.1f}s after the load stopped")
    # The last recommendation made under load is at most one interval older than the stop, and
    # only its leaving the scale-down window lets decode scale down.
    assert first_down >= SCALE_DOWN_WINDOW_S - INTERVAL_S - 0.5, [
        e["message"] for e in scaled_events(cluster, ns)
    ]
    seen = hold_still(cluster, ns, seconds=4 * INTERVAL_S)
    assert {g for _, g, _ in seen} == {DECODE_MIN}, seen
    assert prom.value(DECODE_QUEUE) == 0  # an empty queue asks for fewer: minReplicas holds it
    eventually(
        lambda: lws_replicas(cluster, ns, "decode") == DECODE_MIN,
        timeout=30,
        what="decode's LeaderWorkerSet back at minReplicas",
    )
    downs = [e["message"] for e in scaled_events(cluster, ns) if "scale down" in e["message"]]
    assert downs
    assert all(m.startswith("decode: scale down") for m in downs), downs
    assert_prefill_untouched(cluster, ns)


def test_prometheus_unreachable_scales_nothing_and_says_so(  # noqa: PLR0917 (fixtures)
    cluster: Cluster,
    deployed: str,
    runtimes: dict[str, RuntimeProcess],
    prom: prometheus.PrometheusServer,
    operator: OperatorProcess,
    record_property: RecordProperty,
) -> None:
    ns = deployed
    before = decode_groups(cluster, ns)
    events = len(scaled_events(cluster, ns))
    prom.stop()
    stopped_at = time.monotonic()
    with LoadGenerator(runtimes["decode"].url, clients=HEAVY):
        cond = eventually(
            lambda: (c := condition(md(cluster, ns), "MetricsAvailable")).get("status") == "False" and c,
            timeout=4 * INTERVAL_S + 20,
            what="MetricsAvailable=False",
        )
        seen = hold_still(cluster, ns, seconds=4 * INTERVAL_S)
    assert cond["reason"] == "MetricsUnavailable"
    assert "unreachable" in cond["message"], cond
    assert prom.url in cond["message"], cond
    assert {g for _, g, _ in seen} == {before}, seen
    assert len(scaled_events(cluster, ns)) == events
    assert lws_replicas(cluster, ns, "decode") == before
    assert_prefill_untouched(cluster, ns)
    assert operator.alive()
    print("\ncondition:", json.dumps(cond))
    prom.restart()
    restarted_at = time.monotonic()
    eventually(
        lambda: condition(md(cluster, ns), "MetricsAvailable").get("status") == "True",
        timeout=4 * INTERVAL_S + 60,
        what="MetricsAvailable=True once Prometheus is back",
    )
    record(
        record_property,
        Outcome(
            fault="Prometheus down under load",
            client_saw=(
                "MetricsAvailable=False naming the unreachable URL; no scaling, no Scaled event; "
                f"True again {time.monotonic() - restarted_at:.1f} s after Prometheus came back"
            ),
            lost=f"none (serving does not depend on it; the decode group stayed at {before})",
            recover_s=time.monotonic() - stopped_at,
        ),
    )


def test_turning_autoscaling_off_hands_the_roles_back_to_spec(
    cluster: Cluster, deployed: str, runtimes: dict[str, RuntimeProcess]
) -> None:
    ns = deployed
    with LoadGenerator(runtimes["decode"].url, clients=STEADY):
        scale_decode_up(cluster, ns, runtimes)
    # What a reconcile may have read just before autoscaling goes: the autoscaler's condition and
    # desired in it.
    snapshot = md(cluster, ns)
    assert condition(snapshot, "MetricsAvailable")
    assert (desired(snapshot, "decode") or 0) > DECODE_MIN  # 3, or 4 if a tick saw the load drain
    by_spec = DECODE_MIN - 1  # a count no autoscaling decision could have left behind
    patch = {
        "spec": {
            "roles": {
                "prefill": {"autoscaling": None},
                "decode": {"autoscaling": None, "replicas": by_spec},
            }
        }
    }
    cluster.kubectl("patch", "md", NAME, "-n", ns, "--type=merge", "-p", json.dumps(patch))

    def handed_back() -> dict[str, Any] | None:
        obj = md(cluster, ns)
        left = {desired(obj, role) for role in ("prefill", "decode")}
        return obj if not condition(obj, "MetricsAvailable") and left == {None} else None

    eventually(handed_back, timeout=4 * INTERVAL_S + 20, what="the autoscaler's status fields removed")
    eventually(
        lambda: lws_replicas(cluster, ns, "decode") == by_spec,
        timeout=30,
        what="decode's LeaderWorkerSet at spec.replicas",
    )

    # The race issue 12 found, staged: the reconciler writes status from that stale snapshot, as its
    # own field manager, with the reconciler's own code. Its apply names only the reconciler's
    # fields, so the API server has nothing of the autoscaler's to bring back.
    stale = status_apply(old=None, new=ModelDeploymentStatus.model_validate(snapshot["status"]))
    assert stale is not None
    body = {"apiVersion": snapshot["apiVersion"], "kind": snapshot["kind"],
            "metadata": {"name": NAME, "namespace": ns}, "status": stale}  # fmt: skip
    after = json.loads(
        cluster.kubectl(
            "apply", "--server-side", "--force-conflicts", "--subresource=status", "-o", "json",
            f"--field-manager={OPERATOR_FIELD_MANAGER}", "-f", "-", stdin=json.dumps(body),
        ).stdout
    )  # fmt: skip
    # The object as the API server stored it by that apply: the stale write landed (the old
    # generation), and neither the autoscaler's condition nor any desired came back with it.
    assert after["status"]["observedGeneration"] == snapshot["status"]["observedGeneration"]
    assert not condition(after, "MetricsAvailable"), after["status"]
    assert {desired(after, role) for role in ("prefill", "decode")} == {None}, after["status"]
    # The reconciler's next pass puts its own fields right; the autoscaler's stay gone meanwhile.
    generation = after["metadata"]["generation"]

    def current() -> dict[str, Any] | None:
        obj = handed_back()
        assert obj is not None, md(cluster, ns)["status"]
        return obj if obj["status"]["observedGeneration"] == generation else None

    eventually(current, timeout=30, what="the reconciler's status at the current generation")
    assert lws_replicas(cluster, ns, "decode") == by_spec
    assert condition(md(cluster, ns), "Ready")


def test_without_prometheus_the_operator_scrapes_the_role_pods(
    cluster: Cluster, operator_cluster: Cluster, tmp_path: Path
) -> None:
    """No --prometheus-url: the operator reads the /metrics of each role's running group leaders,
    found by label (as the chart's ServiceAccount). kwok's pods have addresses but serve nothing,
    so the condition names the pods it tried, and nothing scales."""
    ns = f"as-scrape-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    proc = scraping_operator(
        operator_cluster,
        ns,
        log=tmp_path / "operator.log",
        lease_name="kubemoe-operator-scrape-e2e",
        interval_s=INTERVAL_S,
    )
    proc.start()
    try:
        cluster.kubectl("apply", "-n", ns, "-f", str(MANIFEST))

        def pods_tried() -> dict[str, Any] | None:
            c = condition(md(cluster, ns), "MetricsAvailable")
            return c if "none of the 2 pods of role decode answered" in c.get("message", "") else None

        cond = eventually(pods_tried, timeout=90, what="MetricsAvailable naming decode's two leaders")
        assert (cond["status"], cond["reason"]) == ("False", "MetricsUnavailable")
        assert "none of the 1 pods of role prefill answered /metrics" in cond["message"]
        obj = md(cluster, ns)
        assert {desired(obj, r) for r in ("prefill", "decode")} == {None}
        assert "Forbidden" not in proc.text()
    finally:
        proc.stop()
        cluster.kubectl("delete", "namespace", ns, "--wait=false")
