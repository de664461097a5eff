"""`kubectl moe experts`: the report from fixed ConfigMap data (numbers worked out in the test), and the
command end to end through a stand-in kubectl: its output, and each error as one line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubemoe_operator.cli.experts import ExpertsError, build_report, render_report, select_roles
from kubemoe_operator.cli.kubectl_moe import main
from tests.operator.cli import expert_objects as objs
from tests.operator.cli.kubectl_stub import calls, install, keyed

MD_KEY = "modeldeployments.kubemoe.io/prod/tiny-moe"
CM_KEY = "configmaps/prod/tiny-moe-decode-experts"


def _layer_rows(out: str) -> dict[str, list[str]]:
    """The table's rows by layer: [NOW, BEFORE, PREDICTED, hottest...] split on whitespace."""
    rows = [line.split() for line in out.splitlines() if line.startswith("  ") and line.split()[0].isdigit()]
    return {r[0]: r[1:] for r in rows}


def test_table_numbers_from_the_configmap() -> None:
    md = objs.deployment()
    report = build_report(md, {"decode": objs.config_map()}, roles=["decode"], top=3)
    out = render_report(report)
    rows = _layer_rows(out)
    assert set(rows) == {"0", "1"}
    for layer in (0, 1):
        now = objs.busiest_over_mean(objs.OBSERVED_TOKENS[layer], objs.SLOTS[layer])
        before = objs.busiest_over_mean(objs.TOKENS[layer], objs.PREVIOUS[layer])
        predicted = objs.busiest_over_mean(objs.TOKENS[layer], objs.SLOTS[layer])
        assert rows[str(layer)][:3] == [f"{now:.2f}", f"{before:.2f}", f"{predicted:.2f}"]
    # Layer 0 observed: 600 tokens; e5 420 (70.0%) in slots 3, 4 (rank 0) and 7 (rank 1); e0 90 (15.0%)
    # in slot 5 (rank 1); e7 40 (6.7%) in slot 9 (rank 1).
    assert rows["0"][3:] == ["e5", "70.0%", "r0x2,r1", "e0", "15.0%", "r1", "e7", "6.7%", "r1"]
    # Layer 1 observed: 555 tokens; e1 300 (54.1%) only on rank 0; e6 200 (36.0%) in slots 4, 7, 8.
    assert rows["1"][3:] == ["e1", "54.1%", "r0", "e6", "36.0%", "r0,r1x2", "e4", "5.4%", "r1"]
    assert (
        "decode: placement generation 1, 2 ranks x 5 slots  (ConfigMap prod/tiny-moe-decode-experts)" in out
    )
    assert "last rebalance: generation 1 at 2026-11-29T06:00:00Z (300 s window)" in out
    worst_before = max(objs.busiest_over_mean(t, s) for t, s in zip(objs.TOKENS, objs.PREVIOUS, strict=True))
    worst_after = max(objs.busiest_over_mean(t, s) for t, s in zip(objs.TOKENS, objs.SLOTS, strict=True))
    assert f"worst layer {worst_before:.2f} -> {worst_after:.2f} predicted" in out
    assert "status:         generation 1 applied on every decode group" in out  # status.experts.decode


def test_imbalance_now_is_computed_when_observed_json_leaves_it_out() -> None:
    cm = objs.config_map(observed=objs.observed(with_imbalance=False))
    report = build_report(objs.deployment(), {"decode": cm}, roles=["decode"])
    nows = [row.imbalance for row in report.roles[0].rows]
    expected = [objs.busiest_over_mean(t, s) for t, s in zip(objs.OBSERVED_TOKENS, objs.SLOTS, strict=True)]
    assert nows == pytest.approx(expected)
    assert expected[1] > 1.3  # layer 1's single-copy hot expert shows


def test_before_the_first_rebalance_and_before_any_observation() -> None:
    cm = objs.config_map(rebalance=None, observed=None, placement=objs.placement(objs.PREVIOUS, generation=0))
    out = render_report(build_report(objs.deployment(), {"decode": cm}, roles=["decode"]))
    assert "last rebalance: none yet" in out
    assert "observed:       no load yet" in out
    assert _layer_rows(out) == {"0": ["-", "-", "-", "-"], "1": ["-", "-", "-", "-"]}


def test_hottest_falls_back_to_the_rebalance_load_and_top_limits_it() -> None:
    cm = objs.config_map(observed=None)
    rows = build_report(objs.deployment(), {"decode": cm}, roles=["decode"], top=1).roles[0].rows
    assert [(h.expert, round(h.share, 4), h.ranks) for h in rows[0].hottest] == [
        (5, round(400 / 600, 4), (0, 0, 1))
    ]
    assert rows[0].imbalance is None


def test_an_observation_under_an_older_generation_is_flagged() -> None:
    cm = objs.config_map(placement=objs.placement(generation=2))
    out = render_report(build_report(objs.deployment(), {"decode": cm}, roles=["decode"]))
    assert "observed under generation 1, before the move to generation 2" in out


@pytest.mark.parametrize(
    ("docs", "wanted"),
    [
        ({"observed": "{not json"}, "key observed.json is not valid JSON"),
        ({"rebalance": '{"generation": 1'}, "key rebalance.json is not valid JSON"),
        ({"placement": None}, "has no placement yet (placement-RANKSxSLOTS-MODEL.json)"),
        (
            {"placement": {**objs.placement(), "slotsPerRank": 4}},
            f"key {objs.PLACEMENT_KEY}: layers[0].slots has 10 entries, not ranks x slotsPerRank = 8",
        ),
        (
            {"placement": {**objs.placement(), "ranks": "two"}},
            f"key {objs.PLACEMENT_KEY}: ranks: Input should be",
        ),
        (
            {"observed": {**objs.observed(), "tokens": [objs.OBSERVED_TOKENS[0]]}},
            "key observed.json: the per-layer lists differ in length (layers 2, tokens 1, imbalance 2)",
        ),
        (
            {"observed": {**objs.observed(), "tokens": [[1, 2, 3], [1, 2, 3]]}},
            "key observed.json: layer 0: slot holds 4, not an expert id in 0..2",
        ),
    ],
)
def test_malformed_documents_name_the_key(docs: dict[str, Any], wanted: str) -> None:
    with pytest.raises(ExpertsError) as err:
        build_report(objs.deployment(), {"decode": objs.config_map(**docs)}, roles=["decode"])
    assert wanted in str(err.value)
    assert "\n" not in str(err.value)


def test_a_configmap_from_before_layout_keys_is_still_read() -> None:
    cm = objs.config_map()
    cm["data"]["placement.json"] = cm["data"].pop(objs.PLACEMENT_KEY)
    report = build_report(objs.deployment(), {"decode": cm}, roles=["decode"])
    (role,) = report.roles
    assert role.load.placement.generation == objs.placement()["generation"]


def _old_layout_record(**fields: Any) -> dict[str, Any]:
    """rebalance.json of the layout before a change to 2 redundant slots: 2 ranks x 4 slots."""
    old = [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]]
    return {**objs.rebalance(), "previousSlots": old, "slots": old, **fields}


@pytest.mark.parametrize(
    ("record", "why"),
    [
        # written by the rebalancer now: it names its layout
        (
            {
                **objs.rebalance(),
                "placementKey": "placement-2x4-0123456789ab.json",
                "ranks": 2,
                "slotsPerRank": 4,
            },
            "it is of another layout (placement-2x4-0123456789ab.json) than the placement's "
            f"({objs.PLACEMENT_KEY})",
        ),
        (
            {**objs.rebalance(), "ranks": 5, "slotsPerRank": 2},
            "it is of 5 ranks x 2 slots, the placement of 2 ranks",
        ),
        # written before records named it: told by its length, which the ranks divide ...
        (_old_layout_record(), "its layers have 8 slots, the placement's 10 (2 ranks x 5 slots)"),
        # ... or not (this failed the whole report: "not a multiple of the 2 ranks")
        (
            _old_layout_record(
                previousSlots=[[0, 1, 2, 3, 4, 5, 6, 7, 0]] * 2, slots=[[0, 1, 2, 3, 4, 5, 6, 7, 0]] * 2
            ),
            "its layers have 9 slots, the placement's 10",
        ),
    ],
)
def test_the_record_of_another_layout_is_not_read_against_this_ones_placement(
    record: dict[str, Any], why: str
) -> None:
    cm = objs.config_map(rebalance=record)
    report = build_report(objs.deployment(), {"decode": cm}, roles=["decode"])
    (role,) = report.roles
    assert role.load.rebalance is None
    assert role.load.rebalance_ignored is not None
    assert why in role.load.rebalance_ignored
    out = render_report(report)
    assert "last rebalance: none of this layout yet (rebalance.json not shown: " in out
    assert why in out
    rows = _layer_rows(out)
    assert [rows[layer][1:3] for layer in ("0", "1")] == [["-", "-"], ["-", "-"]]  # no BEFORE, PREDICTED
    assert rows["0"][0] != "-"  # NOW, from observed.json (this layout's)


def test_a_record_of_this_layout_is_read_and_one_given_up_says_so() -> None:
    record = {**objs.rebalance(), "placementKey": objs.PLACEMENT_KEY, "ranks": 2, "slotsPerRank": 5}
    report = build_report(objs.deployment(), {"decode": objs.config_map(rebalance=record)}, roles=["decode"])
    assert report.roles[0].load.rebalance is not None
    out = render_report(report)
    assert "last rebalance: generation 1 at 2026-11-29T06:00:00Z" in out
    assert "not applied" not in out
    why = "md-decode-1: generation 1 was not applied (generation 0 stays): rank 1: OutOfMemoryError"
    cm = objs.config_map(rebalance={**record, "notApplied": why})
    out = render_report(build_report(objs.deployment(), {"decode": cm}, roles=["decode"]))
    assert f"not applied:    the groups gave it up: {why}" in out


def test_roles_with_expert_parallelism() -> None:
    assert select_roles(objs.deployment(), None) == ["decode"]  # prefill is EP1
    with pytest.raises(
        ExpertsError, match=r"role prefill of ModelDeployment tiny-moe has no expert parallelism"
    ):
        select_roles(objs.deployment(), "prefill")
    with pytest.raises(
        ExpertsError, match=r"tiny-moe has no role with expert parallelism \(roles: prefill, decode\)"
    ):
        select_roles(objs.deployment(decode={"tensor": 1, "data": 1, "expert": 1}), None)


def test_no_configmap_yet_names_it_and_the_interval() -> None:
    with pytest.raises(ExpertsError) as err:
        build_report(objs.deployment(), {"decode": None}, roles=["decode"])
    assert str(err.value) == (
        "no expert load yet: the operator writes tiny-moe-decode-experts at its first rebalance interval"
        " (spec.experts.rebalance.intervalSeconds, 300 s)"
    )
    with pytest.raises(ExpertsError, match=r"spec\.experts is not set on tiny-moe"):
        build_report(objs.deployment(experts={}), {"decode": None}, roles=["decode"])
    vllm = objs.deployment()
    vllm["spec"]["engine"]["kind"] = "vllm"
    with pytest.raises(ExpertsError, match=r"runs the vllm engine, which balances its own experts"):
        build_report(vllm, {"decode": None}, roles=["decode"])


# --- the command, through a stand-in kubectl on PATH -------------------------------------------------


@pytest.fixture
def kubectl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    def setup(objects: dict[str, Any]) -> Path:
        log = install(tmp_path, keyed(objects))
        monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
        return log

    return setup


def test_command_prints_the_table(kubectl: Any, capsys: pytest.CaptureFixture[str]) -> None:
    log = kubectl({MD_KEY: objs.deployment(), CM_KEY: objs.config_map()})
    assert main(["experts", "tiny-moe", "-n", "prod", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert _layer_rows(out)["0"][3:] == ["e5", "70.0%", "r0x2,r1", "e0", "15.0%", "r1"]
    made = calls(log)
    assert [c[c.index("get") + 1 :][:2] for c in made] == [
        ["modeldeployments.kubemoe.io", "tiny-moe"],
        ["configmaps", "tiny-moe-decode-experts"],
    ]
    assert all(c[c.index("--namespace") + 1] == "prod" for c in made)


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_command_machine_readable(kubectl: Any, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    kubectl({MD_KEY: objs.deployment(), CM_KEY: objs.config_map()})
    assert main(["experts", "tiny-moe", "-n", "prod", "-o", fmt]) == 0
    out = capsys.readouterr().out
    data = json.loads(out) if fmt == "json" else yaml.safe_load(out)
    (role,) = data["roles"]
    assert (role["role"], role["generation"], role["lastRebalanceTime"]) == (
        "decode",
        1,
        "2026-11-29T06:00:00Z",
    )
    layer1 = role["layers"][1]
    assert layer1["hottest"][0] == {
        "expert": 1,
        "tokens": 300,
        "share": pytest.approx(300 / 555),
        "ranks": [0],
    }
    assert layer1["imbalanceBefore"] == pytest.approx(
        objs.busiest_over_mean(objs.TOKENS[1], objs.PREVIOUS[1])
    )


def test_command_uses_the_deployments_namespace_for_the_configmap(
    kubectl: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No -n: the stand-in answers the ModelDeployment in "default" and the ConfigMap only where it is.
    md = objs.deployment()
    md["metadata"]["namespace"] = "default"
    cm = objs.config_map()
    log = kubectl(
        {"modeldeployments.kubemoe.io/default/tiny-moe": md, "configmaps/default/tiny-moe-decode-experts": cm}
    )
    assert main(["experts", "tiny-moe"]) == 0
    assert "default/tiny-moe-decode-experts" in capsys.readouterr().out
    assert "--namespace" not in calls(log)[0]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize(
    ("objects", "argv", "wanted"),
    [
        ({}, ["-n", "prod"], "kubectl moe experts: ModelDeployment tiny-moe not found in namespace prod"),
        ({}, [], "kubectl moe experts: ModelDeployment tiny-moe not found in the current namespace"),
        (
            {MD_KEY: objs.deployment()},
            ["-n", "prod"],
            "kubectl moe experts: no expert load yet: the operator writes tiny-moe-decode-experts at its"
            " first rebalance interval (spec.experts.rebalance.intervalSeconds, 300 s)",
        ),
        (
            {MD_KEY: objs.deployment(decode={"tensor": 1, "data": 1, "expert": 1})},
            ["-n", "prod"],
            "kubectl moe experts: ModelDeployment tiny-moe has no role with expert parallelism",
        ),
        (
            {MD_KEY: objs.deployment(), CM_KEY: objs.config_map(observed="[1,")},
            ["-n", "prod"],
            "kubectl moe experts: ConfigMap prod/tiny-moe-decode-experts: key observed.json is not valid"
            " JSON",
        ),
        (
            {MD_KEY: objs.deployment()},
            ["-n", "prod", "--role", "prefill"],
            "kubectl moe experts: role prefill of ModelDeployment tiny-moe has no expert parallelism",
        ),
        (
            {"error": 'Error from server (Forbidden): modeldeployments.kubemoe.io "tiny-moe" is forbidden'},
            ["-n", "prod"],
            "kubectl moe experts: Error from server (Forbidden): modeldeployments.kubemoe.io"
            ' "tiny-moe" is forbidden',
        ),
        ({}, ["--top", "-1"], "kubectl moe experts: --top must be 0 or more, not -1"),
    ],
)
def test_command_errors_are_one_line(
    kubectl: Any, capsys: pytest.CaptureFixture[str], objects: dict[str, Any], argv: list[str], wanted: str
) -> None:
    kubectl(objects)
    assert main(["experts", "tiny-moe", *argv]) == 1
    assert _one_line_error(capsys).startswith(wanted)


def test_help_lists_the_experts_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "experts" in capsys.readouterr().out
