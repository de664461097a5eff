"""`kubectl moe experts` reads what the operator's real rebalancer writes: the rebalance loop
(rebalance/loop.py) run against stand-in group leaders and MemoryKube (its own tests' helpers), then
the ConfigMap and status it left fed to the report and the plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import yaml
from matplotlib import image as mpimg

from kubemoe_operator.cli.experts import build_report, render_report
from kubemoe_operator.cli.plot import write_plot
from kubemoe_operator.kube.pods import Leader
from kubemoe_operator.rebalance.failures import MAX_PLACEMENT_TRIES
from kubemoe_operator.rebalance.loop import Rebalancer
from tests.operator.cli.expert_objects import busiest_over_mean
from tests.operator.helpers import REPO
from tests.operator.rebalance.groups import Group, serving
from tests.operator.reconcile.memory_kube import MemoryKube

HOT = [[900, 20, 20, 20, 20, 20, 20, 20], [300, 300, 10, 10, 10, 10, 10, 10]]


async def test_the_report_reads_the_rebalancers_configmap_and_status(tmp_path: Path) -> None:
    md: dict[str, Any] = yaml.safe_load((REPO / "examples" / "tiny-moe.yaml").read_text())
    md["metadata"].update(namespace="ns", uid="uid-1", generation=1)
    md["spec"]["experts"] = {"redundant": 2}
    kube = MemoryKube()
    groups = [Group(tokens=HOT, ranks=2, redundant=2), Group(tokens=HOT, ranks=2, redundant=2)]

    async def listed(namespace: str, deployment: str, role: str) -> list[Leader]:
        return leaders if role == "decode" else []

    async with httpx2.AsyncClient() as client:
        with serving(groups) as leaders:
            checks = await Rebalancer(kube=kube, client=client, leaders=listed).evaluate(md, force=True)
    assert checks["decode"].applied
    cm = kube.get("ConfigMap", "ns", "tiny-moe-decode-experts")
    md["status"] = json.loads(json.dumps(kube.statuses[("ns", "tiny-moe")], default=str))

    report = build_report(md, {"decode": cm}, roles=["decode"], top=2)
    (role,) = report.roles
    (key,) = [k for k in cm["data"] if k.startswith("placement-")]
    placement = json.loads(cm["data"][key])
    assert role.load.placement.generation == placement["generation"] == 1
    rows = {row.layer: row for row in role.rows}
    assert sorted(rows) == [layer["layer"] for layer in placement["layers"]]
    summed = [[2 * v for v in layer] for layer in HOT]  # two groups' load
    for layer, tokens, entry in zip(sorted(rows), summed, placement["layers"], strict=True):
        row = rows[layer]
        # The observation was made under the default placement (generation 0), before the move.
        assert row.imbalance is not None
        assert row.imbalance_before is not None
        assert row.imbalance_predicted is not None
        assert row.imbalance == row.imbalance_before
        assert row.imbalance_predicted == round(busiest_over_mean(tokens, entry["slots"]), 4)
        assert row.imbalance_predicted < row.imbalance_before
        hottest = row.hottest[0]
        assert hottest.expert == max(range(8), key=lambda e: (tokens[e], -e))
        assert hottest.share == tokens[hottest.expert] / sum(tokens)
        per_rank = placement["slotsPerRank"]
        assert hottest.ranks == tuple(
            p // per_rank for p, e in enumerate(entry["slots"]) if e == hottest.expert
        )
    out = render_report(report)
    assert "last rebalance: generation 1 at " in out
    assert "observed under generation 0, before the move to generation 1" in out
    assert role.load.status["generation"] == 1

    write_plot(report, tmp_path / "experts.png")
    assert mpimg.imread(tmp_path / "experts.png").shape[1] >= 1200


async def test_the_report_after_the_groups_gave_a_placement_up() -> None:
    """Every group gave the placement up, three times: the rebalancer put the ConfigMap back to what they
    run and marked its record; the report shows that placement, the record and why it was not applied."""
    md: dict[str, Any] = yaml.safe_load((REPO / "examples" / "tiny-moe.yaml").read_text())
    md["metadata"].update(namespace="ns", uid="uid-1", generation=1)
    md["spec"]["experts"] = {"redundant": 2}
    kube = MemoryKube()
    oom = "rank 1: OutOfMemoryError: CUDA out of memory"
    groups = [Group(tokens=HOT, ranks=2, redundant=2, fail_with=oom) for _ in range(2)]

    async def listed(namespace: str, deployment: str, role: str) -> list[Leader]:
        return leaders if role == "decode" else []

    async with httpx2.AsyncClient() as client:
        with serving(groups) as leaders:
            rebalancer = Rebalancer(kube=kube, client=client, leaders=listed)
            for _ in range(1 + MAX_PLACEMENT_TRIES):
                await rebalancer.evaluate(md, force=True)
    cm = kube.get("ConfigMap", "ns", "tiny-moe-decode-experts")
    md["status"] = json.loads(json.dumps(kube.statuses[("ns", "tiny-moe")], default=str))
    out = render_report(build_report(md, {"decode": cm}, roles=["decode"]))
    assert "decode: placement generation 0, 2 ranks x 5 slots" in out
    assert "last rebalance: generation 1 at " in out
    assert "not applied:    the groups gave it up: md-decode-0: generation 1 was not applied" in out
    assert oom in out
    assert "failed 3 times, not sent again" in out  # status.experts.decode.message
